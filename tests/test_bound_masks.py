"""The variance bounds with a position mask are the bounds over the observed positions alone.

A masked position's output enters no moment of the score (``u`` and ``Λ`` are 0 there), so each bound's per-input
terms are over the observed rows of the Jacobian: ``K = J_O J_Oᵀ``, ``‖j_p‖²`` and ``d_a = tr ∇²o_a`` over observed
output numbers ``a``. Before, those norms counted the masked rows too: still upper bounds, but looser than stated,
and moved by a masked position's output alone. Oracles, in float64:

* the formulas of :mod:`torchfim.bounds` written out with ``torch.func`` Jacobians and Hessians restricted to the
  observed rows and fourth moments by enumeration of the observed positions' labels (a model that mixes positions);
* for models that treat positions independently (a per-position MLP on ``(B, T, d)``, 1×1 convolutions on images
  with ``class_dim=1``), the same bounds computed input by input on the observed positions alone, no mask:
  ``(1/n²) Σᵢ Bᵢ``, with ``Bᵢ`` the bound of input ``i`` by itself;
* invariance to a masked position's input, and each bound ≥ :func:`torchfim.fisher_variance` with the mask.
"""

from __future__ import annotations

import pytest
import torch
from oracles import flat_function, joint_label_support
from test_engine_oracles import _close, _view
from torch import Tensor, nn
from torch.func import jacrev

import torchfim
from torchfim.trace_summary import hessian_trace_variances, score_trace_variances

STRUCTURES = ("full", "diag", "trace", "blocks")
BOUND_FUNCTIONS = {
    "spectral": lambda *a, **k: torchfim.score_variance_bound_spectral(*a, **k),
    "kurtosis": lambda *a, **k: torchfim.score_variance_bound_kurtosis(*a, **k),
    "hessian": lambda *a, **k: torchfim.hessian_variance_bound_spectral(*a, **k),
    "tightest score": lambda *a, **k: torchfim.variance_bound(*a, estimator="score", **k),
    "tightest hessian": lambda *a, **k: torchfim.variance_bound(*a, estimator="hessian", **k),
}


class Mixing(nn.Module):
    """Per-position outputs ``(B, L, C)`` that read every position (a mean over positions before the tanh)."""

    def __init__(self, d: int, h: int, c: int) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.a, self.b = nn.Linear(d, h), nn.Linear(h, c)

    def forward(self, x: Tensor) -> Tensor:
        z = self.a(x)
        return self.b(torch.tanh(z + z.mean(1, keepdim=True)))


def per_position_mlp(d: int, c: int) -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(nn.Linear(d, 4), nn.Tanh(), nn.Linear(4, c)).double()


def pixel_mlp(d: int, c: int) -> nn.Module:
    """1×1 convolutions: each pixel's ``c`` logits from its own ``d`` channels (outputs ``(B, c, H, W)``)."""
    torch.manual_seed(3)
    return nn.Sequential(nn.Conv2d(d, 4, 1), nn.Tanh(), nn.Conv2d(4, c, 1)).double()


def _formulas(model: nn.Module, x: Tensor, mask: Tensor, family: str, c: int) -> dict[str, Tensor]:
    """Every bound of :mod:`torchfim.bounds` as a ``P×P`` matrix (entries) and a number (trace), written out."""
    f, theta = flat_function(model)
    n, positions = mask.shape
    with torch.no_grad():
        outs = f(theta, x)
    keep = mask.repeat_interleave(c, 1).to(torch.float64)  # (n, L·C): the observed output numbers
    jac = jacrev(lambda th: f(th, x))(theta) * keep.unsqueeze(-1)  # (n, L·C, P), observed rows
    hess = torch.stack([jacrev(jacrev(lambda th, i=i: f(th, x[i : i + 1])[0]))(theta) for i in range(n)])
    hess = hess * keep[..., None, None]
    out = {key: 0.0 for key in ("spectral", "kurtosis", "hessian", "spectral_trace", "kurtosis_trace",
                                "tightest_trace", "hessian_trace")}
    for i in range(n):
        lam, prob, u = joint_label_support(family, outs[i], mask[i], c)  # u: (S, L·C)
        pairs = (u.unsqueeze(2) * u.unsqueeze(1)).flatten(1)
        top_m = torch.linalg.eigvalsh((pairs * prob.unsqueeze(1)).T @ pairs)[-1]  # λ_max(M)
        fourth = (prob * u.square().sum(1).square()).sum()  # E‖u‖⁴
        top_lam = torch.linalg.eigvalsh(lam)[-1]
        j, h = jac[i], hess[i]
        fisher = j.T @ lam @ j
        norms = j.square().sum(0)
        gram = j @ j.T
        out["spectral"] = out["spectral"] + top_m * torch.outer(norms, norms) - fisher.square()
        out["kurtosis"] = out["kurtosis"] + fourth * torch.outer(norms, norms) - fisher.square()
        out["hessian"] = out["hessian"] + top_lam * h.square().sum(0)
        spectral = top_m * gram.square().sum() - fisher.trace() ** 2
        kurtosis = fourth * torch.linalg.eigvalsh(gram)[-1] ** 2 - fisher.trace() ** 2
        out["spectral_trace"] = out["spectral_trace"] + spectral
        out["kurtosis_trace"] = out["kurtosis_trace"] + kurtosis
        out["tightest_trace"] = out["tightest_trace"] + torch.minimum(spectral, kurtosis)
        d = torch.diagonal(h, dim1=-2, dim2=-1).sum(-1)
        out["hessian_trace"] = out["hessian_trace"] + top_lam * d.square().sum()
    return {key: value / n**2 for key, value in out.items()}


def _want(res: dict[str, Tensor], name: str, structure: str, model: nn.Module) -> object:
    key = {"tightest score": "spectral", "tightest hessian": "hessian"}.get(name, name)
    if structure == "trace":
        return res["tightest_trace" if name == "tightest score" else key + "_trace"]
    return _view(res[key], structure, model)


@pytest.mark.parametrize("backend", ("modules", "functional"))
@pytest.mark.parametrize("family,c", [("categorical", 3), ("bernoulli", 1)])
def test_every_bound_equals_its_formula_over_the_observed_rows(family: str, c: int, backend: str) -> None:
    model = Mixing(2, 3, c).double()
    x = torch.randn(3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[True, False, True], [False, True, False], [True, True, True]])
    res = _formulas(model, x, mask, family, c)
    for name, bound in BOUND_FUNCTIONS.items():
        for structure in STRUCTURES:
            got = bound(model, x, family, structure=structure, mask=mask, backend=backend)
            _close(got, _want(res, name, structure, model), 1e-9)


def _sum_by_input(function, model: nn.Module, pieces: list[Tensor], **options) -> object:
    """``(1/n²) Σᵢ Bᵢ``: ``function``'s value on each input by itself (its observed positions, no mask)."""
    values = [function(model, piece, **options) for piece in pieces]
    scale = 1.0 / len(pieces) ** 2
    if isinstance(values[0], dict):
        return {name: scale * sum(v[name] for v in values) for name in values[0]}
    return scale * sum(values)


def _observed_tokens(x: Tensor, mask: Tensor) -> list[Tensor]:
    return [x[i, mask[i]].unsqueeze(0) for i in range(len(x))]


def _observed_pixels(x: Tensor, mask: Tensor) -> list[Tensor]:
    """Each image's observed pixels as a ``1 × m`` image of their own (the model reads each pixel alone)."""
    return [x[i][:, mask[i]].reshape(1, x.shape[1], 1, -1) for i in range(len(x))]


TOKEN_CASES = {  # (family, C, positions, observed per input): L·C on both sides of the dense λ_max(M) cut (12)
    "categorical": ("categorical", 3, 3, [[True, False, True], [False, True, True], [True, True, True]]),
    "wide categorical": ("categorical", 5, 4, [[True, False, True, True], [True, True, True, True],
                                               [True, True, False, True]]),
    "gaussian": ("gaussian", 2, 4, [[True, True, False, False], [True, False, True, True],
                                    [False, True, True, True]]),
}


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
def test_a_masked_bound_is_the_bound_of_the_observed_positions_alone(case: str) -> None:
    family, c, positions, observed = TOKEN_CASES[case]
    model, mask = per_position_mlp(2, c), torch.tensor(observed)
    x = torch.randn(len(observed), positions, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    moved = x.clone()
    moved[~mask] = 100 * moved[~mask] + 3  # only masked positions' inputs change
    pieces = _observed_tokens(x, mask)
    for structure in STRUCTURES:
        exact = {estimator: torchfim.fisher_variance(model, x, family, estimator, structure, mask=mask)
                 for estimator in ("score", "hessian")}
        for name, bound in BOUND_FUNCTIONS.items():
            got = bound(model, x, family, structure=structure, mask=mask)
            _close(got, _sum_by_input(bound, model, pieces, family=family, structure=structure), 1e-10)
            _close(bound(model, moved, family, structure=structure, mask=mask), got, 1e-10)
            _at_least(got, exact["hessian" if "hessian" in name else "score"])


def _at_least(bound: object, exact: object) -> None:
    if isinstance(bound, dict):
        for name in bound:
            _at_least(bound[name], exact[name])
        return
    assert bool((bound >= exact - 1e-10 * max(1.0, float(exact.abs().max()))).all())


def test_image_outputs_with_class_dim_1() -> None:
    """Categorical pixels ``(B, C, H, W)``, ``class_dim=1``, a ``(B, H, W)`` mask: the bounds of the observed pixels."""
    model = pixel_mlp(2, 3)
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    mask = torch.tensor([[[True, False], [True, True]], [[False, False], [True, False]],
                         [[True, True], [False, True]]])
    moved = x.clone()
    moved.permute(0, 2, 3, 1)[~mask] *= -50  # only masked pixels' inputs change
    pieces = _observed_pixels(x, mask)
    for structure in STRUCTURES:
        exact = {estimator: torchfim.fisher_variance(model, x, "categorical", estimator, structure, mask=mask,
                                                     class_dim=1) for estimator in ("score", "hessian")}
        for name, bound in BOUND_FUNCTIONS.items():
            got = bound(model, x, "categorical", structure=structure, mask=mask, class_dim=1)
            want = _sum_by_input(bound, model, pieces, family="categorical", structure=structure, class_dim=1)
            _close(got, want, 1e-10)
            _close(bound(model, moved, "categorical", structure=structure, mask=mask, class_dim=1), got, 1e-10)
            _at_least(got, exact["hessian" if "hessian" in name else "score"])


def test_the_reports_trace_bounds_are_those_of_the_observed_positions() -> None:
    """:mod:`torchfim.trace_summary` (the report's one-pass bounds, per tensor too) with a mask and with class
    labels of -100, against the same summaries input by input on the observed positions alone."""
    model, mask = per_position_mlp(2, 3), torch.tensor(TOKEN_CASES["categorical"][3])
    x = torch.randn(3, 3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    labels = torch.where(mask, torch.zeros_like(mask, dtype=torch.long), torch.full_like(mask, -100, dtype=torch.long))
    pieces = _observed_tokens(x, mask)
    for summary in (score_trace_variances, hessian_trace_variances):
        alone = [summary(model, piece) for piece in pieces]
        for got in (summary(model, x, mask=mask), summary(model, [(x, labels)])):
            _close(got.bound, sum(a.bound for a in alone) / 9, 1e-10)
            _close(got.tensor_bounds, {name: sum(a.tensor_bounds[name] for a in alone) / 9
                                       for name in got.tensor_bounds}, 1e-10)
            _close(got.variance, sum(a.variance for a in alone) / 9, 1e-10)


def test_across_processes_the_bounds_are_those_of_the_observed_positions() -> None:
    """``across_processes=True`` (one gloo process here: the processes' path, each summing its own rows' terms) with
    a mask read from each mini-batch (a process cannot take one tensor for the whole data set): masked positions
    carry an input of 1000 in their first feature, which the bounds must not see."""
    from processes import one_process_group

    family, c, positions, observed = TOKEN_CASES["categorical"]
    model, mask = per_position_mlp(2, c), torch.tensor(observed)
    x = torch.randn(len(observed), positions, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    x[..., 0][~mask] = 1000.0
    pieces = _observed_tokens(x, mask)
    with one_process_group():
        for bound in BOUND_FUNCTIONS.values():
            for structure in ("diag", "trace"):
                got = bound(model, [x[:2], x[2:]], family, structure=structure, across_processes=True,
                            mask=lambda batch: batch[..., 0] < 100)
                _close(got, _sum_by_input(bound, model, pieces, family=family, structure=structure), 1e-10)
