"""A model wrapped in ``nn.DataParallel`` (here on the CPU, where its forward calls the module it holds).

The engine computes on the module inside; the penalty runs the wrapper's forward, and for ``kind="trace"`` its
per-input gradients call the module inside too: torch's stateless calls refuse ``DataParallel``, so that
penalty raised a ``RuntimeError`` from inside torch (after a warning that it would go one input at a time).

Oracles: ``oracles.exact_fisher`` (``torch.func`` Jacobians, float64) for the Fisher; for the penalty and the
monitor, the same call on the unwrapped model with the same generator, to rounding.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor

X = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def test_the_fisher_of_a_data_parallel_model_is_its_modules() -> None:
    model = _model()
    want = exact_fisher(model, X, "categorical")
    wrapped = nn.DataParallel(model)
    assert torch.allclose(torchfim.fisher(wrapped, X, structure="full"), want, rtol=1e-10, atol=1e-14)
    layers = torchfim.fisher(wrapped, X, structure="layers")
    assert list(layers) == [n for n, _ in model.named_parameters()]
    record = FisherTraceMonitor(wrapped, X, generator=torch.Generator().manual_seed(1)).measure(0)
    alone = FisherTraceMonitor(model, X, generator=torch.Generator().manual_seed(1)).measure(0)
    assert record.trace == pytest.approx(alone.trace, rel=1e-12)


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_the_penalty_of_a_data_parallel_model_is_its_modules(kind: str, grad_method: str, depth: int) -> None:
    """``depth``: wrappers around the model (``DataParallel(DataParallel(model))`` for 2)."""
    results = []
    for wrap in (0, depth):
        model = held = _model()
        for _ in range(wrap):
            held = nn.DataParallel(held)
        pen = FisherPenalty(held, alpha=0.5, kind=kind, grad_method=grad_method,
                            generator=torch.Generator().manual_seed(2))
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # not "one input at a time"
            value = pen(X, step=0)
        value.backward()
        results.append((value.detach(), [p.grad for p in model.parameters()]))
    (value, grads), (wrapped_value, wrapped_grads) = results
    assert torch.allclose(wrapped_value, value, rtol=1e-12, atol=0)
    assert all(torch.allclose(w, g, rtol=1e-9, atol=1e-14) for w, g in zip(wrapped_grads, grads, strict=True))
