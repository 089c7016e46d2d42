"""The exact penalty on a model with an operation that has no second derivative in torch.

``nn.EmbeddingBag(mode="max")`` has a first derivative but no second one. The exact penalty's gradient
is a double backprop, so torch only fails in the caller's ``loss.backward()`` (a raw
``NotImplementedError``); the penalty takes that gradient itself on its first computed step and refuses
with the fix. The fix, ``grad_method="finite_difference"``, is checked on that model against the
penalty's gradient by central differences of its value in float64 (every coordinate).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_train_penalty import SEED, assert_close_list, brute_penalty, labels, penalty_grad
from torch import nn
from torch.func import functional_call

import torchfim.train.penalty_terms as penalty_module
from torchfim import TorchfimError
from torchfim.families import get_family
from torchfim.train import FisherPenalty

ALPHA = 0.3


class MaxBag(nn.Module):
    """Bags of 5 tokens, max-pooled embeddings, a linear head to 3 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(20, 6, mode="max"), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bag(x)))


def max_bag() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(5)
    return MaxBag().double(), torch.randint(0, 20, (12, 5))


def _compute(pen: FisherPenalty, x: torch.Tensor, shared: bool) -> torch.Tensor:
    if shared:
        return pen.penalised_loss(x, lambda out: out.square().mean(), step=0)
    return pen(x, step=0)


@pytest.mark.parametrize("shared", [False, True], ids=["call", "penalised_loss"])
@pytest.mark.parametrize("every", [1, 10])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_exact_penalty_names_the_missing_second_derivative_and_the_fix(kind: str, every: int, shared: bool) -> None:
    """Refused inside the call, naming torch's operation and ``finite_difference``; before: the term came back
    and the caller's ``backward()`` raised torch's ``NotImplementedError``."""
    model, x = max_bag()
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, every=every)
    with pytest.raises(TorchfimError, match=r"(?s)no\s+second derivative.*_embedding_bag(_dense)?_backward.*finite_difference"):
        _compute(pen, x, shared)


def test_the_check_runs_on_the_first_computed_step_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Later steps add no backward: the double-backprop gradient is taken once per penalty (every=1)."""
    calls = []
    original = penalty_module.penalty_gradients
    monkeypatch.setattr(penalty_module, "penalty_gradients", lambda *a, **k: calls.append(1) or original(*a, **k))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    pen, x = FisherPenalty(model, alpha=ALPHA), torch.randn(8, 4)
    for step in range(4):
        pen(x, step=step).backward()
    assert len(calls) == 1


def _value(model: nn.Module, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor, kind: str) -> float:
    """The penalty's value at the parameters ``flat`` on fixed labels ``y``: α‖∇L‖² or α (1/B) Σᵢ ‖∇ℓᵢ‖²."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    params = dict(zip(names, (t.reshape(s).requires_grad_(True) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
    nll = get_family("categorical").nll
    if kind == "batch_gradient":
        grads = torch.autograd.grad(nll(functional_call(model, params, (x,)), y[:, None]), list(params.values()))
        return ALPHA * sum(float(g.square().sum()) for g in grads)
    total = 0.0
    for i in range(len(x)):
        grads = torch.autograd.grad(nll(functional_call(model, params, (x[i:i + 1],)), y[i:i + 1, None]),
                                    list(params.values()))
        total += sum(float(g.square().sum()) for g in grads)
    return ALPHA * total / len(x)


def _central_differences(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str,
                         h: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's parameters ``θ`` flat, and the central differences of :func:`_value` at ``θ`` along every
    coordinate (step ``h``, the labels ``y``): the oracle of the penalty's gradient."""
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])
    oracle = torch.zeros_like(theta)
    for k in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[k] = h
        oracle[k] = (_value(model, theta + e, x, y, kind) - _value(model, theta - e, x, y, kind)) / (2 * h)
    return theta, oracle


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_finite_difference_penalty_gradient_on_that_model(kind: str) -> None:
    """The fix works there: the finite-difference gradient agrees with central differences of the value
    (step 1e-6, error O(1e-12) on a function smooth away from ties of the max) to 1e-5 relative norm."""
    model, x = max_bag()
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method="finite_difference",
                        generator=torch.Generator().manual_seed(SEED))
    grads = torch.autograd.grad(pen(x, step=0), list(model.parameters()))
    got = torch.cat([g.flatten() for g in grads])
    theta, oracle = _central_differences(model, x, y, kind)
    assert float(pen.last_value) == pytest.approx(_value(model, theta, x, y, kind), rel=1e-12)
    assert float((got - oracle).norm()) < 1e-5 * float(oracle.norm())
    assert math.isfinite(float(oracle.norm())) and float(oracle.norm()) > 0


class _WrittenWeightNorm(nn.Module):
    """``Linear(5, 8)`` under ``parametrizations.weight_norm`` written out, ``w = g·v/‖v‖`` per row, then tanh and a
    ``Linear(8, 3)``: its parameters in the weight-normed model's order (bias, g, v, head)."""

    def __init__(self, normed: nn.Sequential) -> None:
        super().__init__()
        self.bias, self.g, self.v = (nn.Parameter(normed[0].bias.detach().clone()),
                                     nn.Parameter(normed[0].parametrizations.weight.original0.detach().clone()),
                                     nn.Parameter(normed[0].parametrizations.weight.original1.detach().clone()))
        self.head = normed[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.g * self.v / self.v.norm(dim=1, keepdim=True)
        return self.head(torch.tanh(x @ weight.T + self.bias))


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_the_exact_penalty_through_weight_norm_equals_the_brute_force_of_its_written_out_twin(kind: str) -> None:
    """torch's double backward of ``torch._weight_norm`` is wrong (2.13): the exact penalty's gradient on the
    direction ``v`` was 75% (batch_gradient) and 110% (trace) off, silently; it now runs through the composite."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    nn.utils.parametrizations.weight_norm(model[0])
    x = torch.randn(8, 5, dtype=torch.float64)
    term = FisherPenalty(model, alpha=ALPHA, kind=kind, generator=torch.Generator().manual_seed(SEED))(x, step=0)
    twin = _WrittenWeightNorm(model)
    _, want = brute_penalty(twin, x, labels(model, x, "categorical", torch.Generator().manual_seed(SEED)),
                            "categorical", ALPHA, kind)
    assert_close_list(penalty_grad(term, model), want)


class _Bag(nn.Module):
    """Bags of 5 tokens, summed or averaged embeddings (ids 0 are padding), tanh and a linear head to 3 classes."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag, self.head = nn.EmbeddingBag(20, 4, mode=mode, padding_idx=0), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.bag(x)))


@pytest.mark.parametrize("shared", [False, True], ids=["call", "penalised_loss"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_exact_penalty_through_a_summing_or_averaging_bag_equals_central_differences(mode: str, kind: str,
                                                                                      shared: bool) -> None:
    """torch's ``_embedding_bag_backward`` has no derivative (2.13), so the exact penalty refused
    ``nn.EmbeddingBag(mode="sum")`` and ``"mean"``; through the composite bag its gradient is central differences
    of the value (step 1e-6, every coordinate, same labels) to 1e-7 relative norm (measured ~1e-10)."""
    torch.manual_seed(5)
    model, x = _Bag(mode).double(), torch.randint(0, 20, (12, 5))
    x[:3, :2] = 0  # padding in some bags
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, generator=torch.Generator().manual_seed(SEED))
    term = _compute(pen, x, shared)
    task = model(x).square().mean() if shared else 0.0
    got = torch.cat([g.flatten() for g in torch.autograd.grad(term - task, list(model.parameters()))])
    theta, oracle = _central_differences(model, x, y, kind)
    assert float(pen.last_value) == pytest.approx(_value(model, theta, x, y, kind), rel=1e-12)
    assert float((got - oracle).norm()) < 1e-7 * float(oracle.norm())


@pytest.mark.parametrize("shared", [False, True], ids=["call", "penalised_loss"])
def test_exact_trace_penalty_through_an_instance_norm_equals_central_differences(shared: bool) -> None:
    """torch's double backward of ``vmap(grad)`` through ``F.instance_norm`` is wrong (2.13) on the gradient that
    reaches its input: the exact ``kind="trace"`` penalty's gradient on a convolution before an ``InstanceNorm1d``
    was off central differences of the value by 0.6 % of its norm, silently (the convolution's bias, which the norm
    removes, got a gradient where it has none; its weight's was 0.08 % off); through the composite norm it agrees to
    1e-7 (measured ~1e-9)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 2, 2), nn.InstanceNorm1d(2, affine=True), nn.Flatten(), nn.Linear(10, 3))
    model, x = model.double(), torch.randn(5, 2, 6, dtype=torch.float64)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    pen = FisherPenalty(model, alpha=ALPHA, kind="trace", generator=torch.Generator().manual_seed(SEED))
    term = _compute(pen, x, shared)
    task = model(x).square().mean() if shared else 0.0
    got = torch.cat([g.flatten() for g in torch.autograd.grad(term - task, list(model.parameters()))])
    _, oracle = _central_differences(model, x, y, "trace")
    assert float((got - oracle).norm()) < 1e-7 * float(oracle.norm())
    assert float(got[8:10].norm()) < 1e-7 * float(oracle.norm())  # the bias before the norm: no gradient


@pytest.mark.parametrize("shared", [False, True], ids=["call", "penalised_loss"])
def test_the_composite_instance_norm_updates_running_statistics_as_a_forward_does(shared: bool) -> None:
    """The penalty's forward is the training step's (``penalised_loss`` shares it with the task loss): an instance
    norm tracking running statistics in training mode updates them as a plain forward of the model does, through
    the composite norm too (it left them at 0 and 1 without the update)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 2, 2), nn.InstanceNorm1d(2, affine=True, track_running_stats=True),
                          nn.Flatten(), nn.Linear(10, 3)).double()
    twin, x = copy.deepcopy(model), torch.randn(5, 2, 6, dtype=torch.float64)
    twin(x)
    _compute(FisherPenalty(model, alpha=ALPHA, generator=torch.Generator().manual_seed(SEED)), x, shared).backward()
    torch.testing.assert_close(model[1].running_mean, twin[1].running_mean, rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(model[1].running_var, twin[1].running_var, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_exact_penalty_through_a_power_average_pool_of_zero_windows_equals_central_differences(kind: str) -> None:
    """``LPPool1d(3, 2)`` after a ReLU has windows of zeros, where torch's double backward of ``t^(1/p)`` is NaN: the
    exact penalty's gradient was NaN in every parameter, without a warning; through the composite pool
    (:mod:`torchfim.engine.composite_pooling`) it is central differences of the value to 1e-7 relative norm."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(1, 2, 2), nn.ReLU(), nn.LPPool1d(3, 2), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 1, 9, dtype=torch.float64)
    windows = model[1](model[0](x)).unfold(-1, 2, 2)
    assert int((windows.abs().sum(-1) == 0).sum()) > 0  # the case: some windows are all zero
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, generator=torch.Generator().manual_seed(SEED))
    got = torch.cat([g.flatten() for g in torch.autograd.grad(pen(x, step=0), list(model.parameters()))])
    _, oracle = _central_differences(model, x, y, kind)
    assert bool(got.isfinite().all())
    assert float((got - oracle).norm()) < 1e-7 * float(oracle.norm())


@pytest.mark.parametrize("norm_type", [1.0, 1.5, 2.0, 3.0, float("inf")])
def test_the_composite_power_average_pools_give_torchs_values_and_first_derivatives(norm_type: float) -> None:
    """Same values and first derivatives as torch's ``lp_pool1d/2d`` (windows of zeros included), finite second
    derivatives where torch's are NaN."""
    from torchfim.engine.composite_pooling import LP_POOLS

    g = torch.Generator().manual_seed(0)
    for pool, shape, kernel in ((torch.nn.functional.lp_pool1d, (2, 3, 8), 2),
                                (torch.nn.functional.lp_pool2d, (2, 3, 4, 6), (2, 3))):
        x = torch.relu(torch.randn(*shape, dtype=torch.float64, generator=g)).requires_grad_(True)
        upstream = torch.randn_like(pool(x, norm_type, kernel))
        ours, theirs = LP_POOLS[pool](x, norm_type, kernel), pool(x, norm_type, kernel)
        assert torch.equal(ours, theirs)
        (d_ours,) = torch.autograd.grad(ours, x, upstream, create_graph=True)
        (d_theirs,) = torch.autograd.grad(theirs, x, upstream)
        torch.testing.assert_close(d_ours, d_theirs, rtol=1e-12, atol=0)
        if norm_type > 1:
            (second,) = torch.autograd.grad(d_ours.square().sum(), x)
            assert bool(second.isfinite().all())
