"""Categorical logits of −Inf: classes masked out (action masking, a constrained vocabulary).

``torch.distributions.Categorical`` and ``F.cross_entropy`` read a −Inf logit as a class of probability 0;
before, torchfim refused such outputs as "non-finite (NaN or Inf) ... divergence". Oracles: the Fisher of the
model restricted to its unmasked classes, by ``torch.func`` Jacobians in float64 (a fixed mask); the twin that
masks with −1e30 instead, whose probabilities are the same to the last bit in float64 (masks that depend on the
input), for every estimator, variance, bound and training tool, with the same seeds.
"""

from __future__ import annotations

import pytest
import torch
from oracles import exact_fisher
from torch import Tensor, nn

import torchfim
from torchfim import report
from torchfim.train import FisherPenalty, FisherTraceMonitor

_X = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


class _Masked(nn.Module):
    """A tanh MLP with 5 logits, some masked with ``fill``: classes 3 and 4 (``fixed``), or, by the sign of the
    input's first entry, classes 3–4 or 0–1 (masked additively, so gradients reach the masked logits)."""

    def __init__(self, fill: float, fixed: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fill, self.fixed = fill, fixed
        self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 5)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))

    def forward(self, x: Tensor) -> Tensor:
        o = self.logits(x)
        if self.fixed:
            return o.masked_fill(torch.arange(5) >= 3, self.fill)
        up = x[:, :1] > 0
        masked = torch.where(up, torch.arange(5) >= 3, torch.arange(5) < 2)
        return o + torch.zeros_like(o).masked_fill(masked, self.fill)


class _Unmasked(_Masked):
    """The same weights, the three unmasked logits only."""

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)[:, :3]


def _seed() -> torch.Generator:
    return torch.Generator().manual_seed(3)


def test_the_fisher_of_masked_logits_is_that_of_the_unmasked_classes() -> None:
    got = torchfim.fisher(_Masked(float("-inf")).double(), _X, structure="full")
    want = exact_fisher(_Unmasked(0.0).double(), _X, "categorical")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


_CALLS = {
    "exact": lambda m: torchfim.fisher(m, _X, structure="full"),
    "exact-functional": lambda m: torchfim.fisher(m, _X, structure="diag", backend="functional"),
    "score": lambda m: torchfim.fisher(m, _X, estimator="score", structure="diag", n_samples=3, generator=_seed()),
    "hessian": lambda m: torchfim.fisher(m, _X, estimator="hessian", structure="full", n_samples=3, generator=_seed()),
    "combined": lambda m: torchfim.fisher(m, _X, estimator="combined", structure="diag", n_samples=3,
                                          generator=_seed()),
    "variance": lambda m: torchfim.fisher_variance(m, _X, estimator="hessian", structure="diag"),
    "covariance": lambda m: torchfim.fisher_covariance(m, _X, structure="diag"),
    "bound": lambda m: torchfim.variance_bound(m, _X, estimator="score", structure="diag"),
    "monitor": lambda m: torch.tensor(FisherTraceMonitor(m, _X, generator=_seed(), control_variate=True).measure(0).trace),
    "penalty": lambda m: torch.autograd.grad(FisherPenalty(m, generator=_seed())(_X, step=0), list(m.parameters())),
    "penalty-fd": lambda m: torch.autograd.grad(FisherPenalty(m, generator=_seed(), grad_method="finite_difference")
                                                (_X, step=0), list(m.parameters())),
}


@pytest.mark.parametrize("call", list(_CALLS))
def test_masked_logits_give_what_a_finite_mask_does(call: str) -> None:
    got = _CALLS[call](_Masked(float("-inf"), fixed=False).double())
    want = _CALLS[call](_Masked(-1e30, fixed=False).double())
    for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert bool(torch.isfinite(g).all()) and torch.allclose(g, w, rtol=1e-12, atol=0)


class _UsedOutside(_Masked):
    """The body's weight used a second time outside its module (no rule sees that use): the engine's check of its
    rules, which masked logits skipped, moves it to a rule that does."""

    def __init__(self, fill: float) -> None:
        super().__init__(fill)
        self.body, self.head = nn.Linear(4, 4), nn.Linear(4, 5)

    def logits(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(nn.functional.linear(torch.tanh(self.body(x)), self.body.weight)))


@pytest.mark.filterwarnings("ignore:torchfim. the module rules")
def test_masked_logits_keep_the_check_of_the_module_rules() -> None:
    got = torchfim.fisher(_UsedOutside(float("-inf")).double(), _X, structure="diag")
    assert torch.allclose(got, torchfim.fisher(_UsedOutside(-1e30).double(), _X, structure="diag"), rtol=1e-12, atol=0)


class _Mixing(_Masked):
    """Each sample's logits move with the batch's mean: refused, masked or not."""

    def logits(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.head(torch.tanh(h - h.mean(0)))


_FILLS = [float("-inf"), torch.finfo(torch.float64).min, -1e30]


@pytest.mark.parametrize("fill", _FILLS)
def test_a_model_that_mixes_samples_is_refused_with_masked_logits(fill: float) -> None:
    """Before, a tolerance scaled by the largest |logit| (infinite, or 1e95 and more) let any difference pass."""
    with pytest.raises(torchfim.TorchfimError, match="depends on the other samples in its batch"):
        torchfim.fisher(_Mixing(fill).double(), _X, structure="trace")


class _SwappedExperts(nn.Module):
    """Experts laid out as Llama 4's (``gate_up_proj``, ``down_proj``) whose forward swaps gate and up, unlike the
    rule for that layout: the engine's comparison of the two must send them to a generic rule."""

    def __init__(self) -> None:
        super().__init__()
        self.num_experts, self.expert_dim, self.act_fn = 2, 3, nn.SiLU()
        self.gate_up_proj = nn.Parameter(torch.randn(2, 6, 6) * 0.5)
        self.down_proj = nn.Parameter(torch.randn(2, 3, 6) * 0.5)

    def forward(self, h: Tensor) -> Tensor:
        x = h.view(self.num_experts, -1, h.shape[-1])
        gate, up = torch.bmm(x, self.gate_up_proj).chunk(2, dim=-1)
        return torch.bmm(gate * self.act_fn(up), self.down_proj).view(-1, h.shape[-1])


class _WithExperts(_Masked):
    def __init__(self, fill: float, sliced: bool = False) -> None:
        super().__init__(fill)
        self.sliced = sliced
        self.experts = _SwappedExperts()

    def logits(self, x: Tensor) -> Tensor:
        h = self.experts(torch.tanh(self.body(x)).repeat(2, 1)).view(2, x.shape[0], -1).sum(0)
        return self.head(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x)[:, :3] if self.sliced else super().forward(x)


@pytest.mark.filterwarnings("ignore:torchfim")
@pytest.mark.parametrize("fill", _FILLS)
def test_masked_logits_keep_the_engines_comparison_of_a_rule_with_the_forward(fill: float) -> None:
    """Before, the comparison passed with an infinite (or huge) tolerance and the rule's formula was used: trace
    1.2 % off."""
    got = torchfim.fisher(_WithExperts(fill).double(), _X, structure="full")
    want = exact_fisher(_WithExperts(0.0, sliced=True).double(), _X, "categorical")
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-13)


def test_the_report_takes_masked_logits() -> None:
    model = _Masked(float("-inf"), fixed=False).double()
    got = report.compute_report(model, report.Data(_X, None, "masked"), progress=False)
    assert got["trace"]["exact"] == pytest.approx(float(torchfim.fisher(model, _X, structure="trace")), rel=1e-12)


@pytest.mark.parametrize(("fill", "family", "said"), [
    (float("nan"), "categorical", r"non-finite outputs \(NaN or Inf\)"),
    (float("inf"), "categorical", r"non-finite outputs \(NaN or Inf\)"),
    (float("-inf"), "gaussian", r"non-finite outputs \(NaN or Inf\)"),
])
def test_nan_plus_inf_and_inf_outside_the_categorical_are_refused(fill: float, family: str, said: str) -> None:
    with pytest.raises(torchfim.TorchfimError, match=said):
        torchfim.fisher(_Masked(fill).double(), _X, family=family, structure="trace")


def test_a_row_with_every_class_masked_is_refused_with_the_fix() -> None:
    class _AllMasked(_Masked):
        def forward(self, x: Tensor) -> Tensor:
            return self.logits(x).masked_fill((x[:, :1] > 0) & (torch.arange(5) >= 0), float("-inf"))

    with pytest.raises(torchfim.TorchfimError, match="all -inf.*leave at least one class unmasked"):
        torchfim.fisher(_AllMasked(0.0).double(), _X, structure="trace")


def test_true_labels_of_masked_classes_are_named() -> None:
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 4])
    with pytest.warns(RuntimeWarning, match="2 of the 8 targets are classes whose logit is -inf"):
        torchfim.fisher(_Masked(float("-inf")).double(), _X, targets=y, estimator="empirical", structure="trace")
