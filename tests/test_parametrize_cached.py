"""torchfim called inside ``torch.nn.utils.parametrize.cached()``, as torch's docs suggest for a training step
of a model with parametrized weights (orthogonal recurrent kernels, weight norm).

The cache keeps the first value of each parametrized weight for the rest of the block, while torchfim calls
the model at other parameters: before, ``backend="functional"`` (``functional_call``) returned a Fisher of
zeros where the parametrized weights are, the finite-difference penalty's shifted pass read θ's weights (a
gradient 10⁸ times too large) and the trace penalty's per-input gradients were 98 % off, all silently. The
oracles are the dense float64 definition and the same computations outside the block.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from oracles import exact_fisher
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, weight_norm

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor


def parametrized_mlp() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    weight_norm(model[0])
    orthogonal(model[2])
    return model, torch.randn(6, 4, dtype=torch.float64)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_fisher_and_variance_inside_the_cache_are_the_definition_and_the_values_outside(backend: str) -> None:
    """The Fisher against the dense definition; the variance (whose oracle's output Hessians would need
    forward-mode derivatives of weight norm, which torch lacks) against the same call outside the block."""
    model, x = parametrized_mlp()
    dense = exact_fisher(model, x, "categorical")
    outside = torchfim.fisher_variance(model, x, structure="diag", backend=backend)
    with parametrize.cached():
        got = torchfim.fisher(model, x, structure="full", backend=backend)
        got_variance = torchfim.fisher_variance(model, x, structure="diag", backend=backend)
    torch.testing.assert_close(got, dense, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got_variance, outside, rtol=1e-10, atol=1e-14)


def _penalty_gradient(model: nn.Module, x: torch.Tensor, kind: str, grad_method: str, shared: bool) -> list:
    pen = FisherPenalty(model, alpha=0.4, kind=kind, grad_method=grad_method,
                        generator=torch.Generator().manual_seed(1))
    term = pen.penalised_loss(x, lambda out: 0.0 * out.sum(), step=0) if shared else pen(x, step=0)
    return list(torch.autograd.grad(term, list(model.parameters())))


@pytest.mark.parametrize("shared", [False, True], ids=["call", "penalised_loss"])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_penalty_inside_the_cache_is_the_penalty_outside(kind: str, grad_method: str, shared: bool) -> None:
    model, x = parametrized_mlp()
    want = _penalty_gradient(model, x, kind, grad_method, shared)
    with parametrize.cached():
        got = _penalty_gradient(model, x, kind, grad_method, shared)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_monitor_inside_the_cache_is_the_monitor_outside() -> None:
    model, x = parametrized_mlp()
    records = []
    for cached in (False, True):
        monitor = FisherTraceMonitor(model, x, n_samples=4, generator=torch.Generator().manual_seed(2))
        with parametrize.cached() if cached else contextlib.nullcontext():
            records.append(monitor.measure(0))
    assert records[1].trace == pytest.approx(records[0].trace, rel=1e-12)


def test_the_callers_cache_works_again_after_a_computation() -> None:
    """The block is the caller's again: the cache on, and a parametrized weight read twice is one tensor."""
    model, x = parametrized_mlp()
    with parametrize.cached():
        torchfim.fisher(model, x, backend="functional")
        assert parametrize._cache_enabled == 1
        assert model[2].weight is model[2].weight
    assert parametrize._cache_enabled == 0 and not parametrize._cache
