"""A call of ``FisherPenalty`` whose term is never back-propagated (the penalty of a validation batch, logged with
gradients on) leaves the gradient kept for the steps between computed ones as it was.

Oracle (float64): :func:`oracles.penalty_definition` (double backprop of the definition) on each training
micro-batch at the parameters of step 0, with the labels the penalty draws for it (one
``family.sample(o.detach(), 1, generator)`` per computed call, in call order, the logging call's included); the
mean over the micro-batches is what the steps between computed ones must reuse.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from oracles import penalty_definition
from test_penalised_loss import grads_of, rel_error, squared_task
from test_train_penalty import SEED, labels
from torch import nn

from torchfim.train import FisherPenalty

ALPHA = 0.37
CASES = [(kind, method, shared) for kind in ("batch_gradient", "trace") for method in ("exact", "finite_difference")
         for shared in (False, True)]


def _term(pen: FisherPenalty, x: torch.Tensor, step: int, shared: bool) -> torch.Tensor:
    """The loss of a training call (a task loss and the penalty), or a logging call's penalty."""
    task = squared_task(3, x.shape[0])
    return pen.penalised_loss(x, task, step=step) if shared else task(pen.model(x)) + pen(x, step=step)


def _definition(model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """Value and gradient of the penalty of ``x`` on the labels ``y``, from its definition."""

    def log_p(rows: slice) -> torch.Tensor:
        return torch.log_softmax(model(x[rows]), -1).gather(-1, y[rows, None]).sum()

    return penalty_definition(log_p, list(model.parameters()), len(x), kind, ALPHA)


def _mean(model: nn.Module, xs: list[torch.Tensor], logged: torch.Tensor | None, kind: str) -> list[torch.Tensor]:
    """The mean over the micro-batches ``xs`` of their penalties' values and gradients, on the labels a generator
    seeded as the penalty's draws for them (the logging call of ``logged`` draws between the first two)."""
    generator, parts = torch.Generator().manual_seed(SEED), []
    for j, x in enumerate(xs):
        parts.append(_definition(model, x, labels(model, x, "categorical", generator), kind))
        if j == 0 and logged is not None:
            labels(model, logged, "categorical", generator)
    return [sum(column) / len(parts) for column in zip(*parts)]


@pytest.mark.parametrize("after_step", [False, True], ids=["before-opt-step", "after-opt-step"])
@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_a_logged_penalty_never_back_propagated_leaves_the_kept_gradient(case: tuple, after_step: bool) -> None:
    """every=10, two micro-batches at step 0 and, between them or after the optimiser's step, the penalty of a
    validation batch in eval mode, with gradients on and no backward: steps 1-9 reused its gradient (a review: 149 %
    off the training batches' after the optimiser's step, 75 % before it, averaged into their mean)."""
    kind, method, shared = case
    model = tanh_mlp(3, seed=80)
    xs, x_val = [mlp_inputs(6, seed=81 + j) for j in range(2)], 3 * mlp_inputs(6, seed=83)
    at_start = copy.deepcopy(model)
    pen = FisherPenalty(model, alpha=ALPHA, every=10, kind=kind, grad_method=method,
                        generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    for j, x in enumerate(xs):
        _term(pen, x, 0, shared).backward()
        if j == 0 and not after_step:
            model.eval()
            _term(pen, x_val, 0, shared)  # logged, never back-propagated
            model.train()
    opt.step()
    if after_step:
        model.eval()
        _term(pen, x_val, 0, shared)
        model.train()
    value, *want = _mean(at_start, xs, None if after_step else x_val, kind)
    tol = 1e-10 if method == "exact" else 1e-5
    torch.testing.assert_close(pen.last_value, value, rtol=tol, atol=0)
    assert pen.last_step == 0
    between = pen(xs[0], step=1)
    assert float(between.detach()) == pytest.approx(float(value), rel=tol)
    assert rel_error(grads_of(between, model), want) < tol


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_a_term_back_propagated_twice_counts_once_in_the_mean(method: str) -> None:
    """``backward(retain_graph=True)`` twice on one micro-batch's loss, then a second micro-batch: the kept gradient
    is the mean of the two micro-batches' (the first one counted once, not twice)."""
    model = tanh_mlp(3, seed=80)
    xs = [mlp_inputs(6, seed=81 + j) for j in range(2)]
    at_start = copy.deepcopy(model)
    pen = FisherPenalty(model, alpha=ALPHA, every=10, grad_method=method, generator=torch.Generator().manual_seed(SEED))
    first = _term(pen, xs[0], 0, shared=False)
    first.backward(retain_graph=True)
    first.backward()
    _term(pen, xs[1], 0, shared=False).backward()
    value, *want = _mean(at_start, xs, None, "batch_gradient")
    tol = 1e-10 if method == "exact" else 1e-5
    torch.testing.assert_close(pen.last_value, value, rtol=tol, atol=0)
    assert rel_error(grads_of(pen(xs[0], step=1), model), want) < tol
