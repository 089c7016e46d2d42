"""A penalty call moves a model's running statistics as many times as it runs the model over the batch, whatever its
kind: ``kind="trace"``'s per-input gradient passes used to update an ``InstanceNorm(track_running_stats=True)`` once
more per input (eight times for a batch of eight), so the statistics an evaluation reads drifted with the penalty.
The oracle is a copy of the model run forward over the batch the same number of times."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchfim.families
import torchfim.train


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv1d(2, 3, 3), torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
        torch.nn.Tanh(), torch.nn.Flatten(), torch.nn.Linear(18, 4),
    ).double().train()


def _statistics(model: torch.nn.Module) -> torch.Tensor:
    norm = model[1]
    return torch.cat([norm.running_mean, norm.running_var])


@pytest.mark.filterwarnings("ignore:torchfim. torch.func cannot vmap")  # InstanceNorm's in-place update: looped
@pytest.mark.parametrize("kind", ["trace", "batch_gradient"])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("shared", [True, False])
def test_one_call_moves_the_statistics_as_its_forwards_over_the_batch_do(kind: str, grad_method: str,
                                                                         shared: bool) -> None:
    x = torch.randn(8, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model, oracle = _model(), _model()
    pen = torchfim.train.FisherPenalty(model, alpha=0.1, kind=kind, grad_method=grad_method,
                                       generator=torch.Generator().manual_seed(0))
    if shared:  # one forward, the task loss's and the penalty's
        pen.penalised_loss(x, lambda out: out.square().mean(), step=0).backward()
        oracle(x)
    else:  # the task loss's forward, then the penalty's own over the batch
        (model(x).square().mean() + pen(x, step=0)).backward()
        oracle(x)
        oracle(x)
    moved = _statistics(oracle) - _statistics(_model())
    assert moved.abs().max() > 1e-3  # the statistics do move: else this test could not fail
    torch.testing.assert_close(_statistics(model), _statistics(oracle), rtol=1e-12, atol=1e-12)


def test_the_penalty_is_unchanged_by_the_clones() -> None:
    """The per-input passes run on clones of the buffers: the value and gradient of ``kind="trace"`` are those of
    per-sample autograd gradients on the same labels (InstanceNorm in training mode normalises by each input's own
    statistics, so its running ones do not enter)."""
    x = torch.randn(6, 2, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    model = _model()
    pen = torchfim.train.FisherPenalty(model, alpha=0.5, kind="trace", generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="one input at a time"):
        value = pen(x, step=0)
    y = torchfim.families.Categorical().sample(_model()(x).detach(), 1, torch.Generator().manual_seed(0)).reshape(-1)
    oracle = _model()
    params = list(oracle.parameters())
    squares = []
    for i in range(len(x)):
        grads = torch.autograd.grad(-F.cross_entropy(oracle(x[i : i + 1]), y[i : i + 1]), params, create_graph=True)
        squares.append(sum(g.square().sum() for g in grads))
    expected = 0.5 * torch.stack(squares).mean()
    torch.testing.assert_close(value, expected, rtol=1e-10, atol=0)
    value.backward()
    for p, g in zip(model.parameters(), torch.autograd.grad(expected, params)):
        torch.testing.assert_close(p.grad, g, rtol=1e-8, atol=1e-12)
