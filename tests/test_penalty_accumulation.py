"""FisherPenalty under gradient accumulation: the gradient it reuses between computed steps is the mean over the
calls of the computed step (one per micro-batch, at the same parameters), not the last call's.

Oracle (float64): ``test_train_penalty.brute_penalty`` (hand-written log-likelihoods, double backprop) on each
micro-batch with the labels the penalty draws for it (one ``family.sample(o.detach(), 1, generator)`` per call, in
call order); the mean of those gradients and values is what a step between computed ones must reuse.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from test_penalised_loss import grads_of, rel_error, squared_task
from test_train_penalty import SEED, brute_penalty, labels
from torch_versions import FUSED_ADAM_ON_CPU

from torchfim.train import FisherPenalty

ALPHA = 0.37
CASES = [(kind, method, shared) for kind in ("batch_gradient", "trace") for method in ("exact", "finite_difference")
         for shared in (False, True)]


def _computed(pen: FisherPenalty, x: torch.Tensor, step: int, shared: bool) -> None:
    """One micro-batch's computed call and its backward, as a training loop does it."""
    task = squared_task(3, x.shape[0])
    term = pen.penalised_loss(x, task, step=step) if shared else task(pen.model(x)) + pen(x, step=step)
    term.backward()


def _brute(model, xs: list[torch.Tensor], kind: str) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """The value and gradient of each micro-batch's penalty, on the labels a penalty seeded alike draws in order."""
    generator = torch.Generator().manual_seed(SEED)
    return [brute_penalty(model, x, labels(model, x, "categorical", generator), "categorical", ALPHA, kind) for x in xs]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_the_reused_gradient_is_the_mean_over_the_computed_steps_micro_batches(case) -> None:
    kind, method, shared = case
    model = tanh_mlp(3, seed=80)
    xs = [mlp_inputs(6, seed=81 + j) for j in range(3)]
    pen = FisherPenalty(model, alpha=ALPHA, every=4, kind=kind, grad_method=method,
                        generator=torch.Generator().manual_seed(SEED))
    for x in xs:  # step 0: three micro-batches, no optimiser step between them
        _computed(pen, x, 0, shared)
    brute = _brute(model, xs, kind)
    mean_value = sum(value for value, _ in brute) / len(brute)
    mean_grads = [sum(parts) / len(brute) for parts in zip(*(grads for _, grads in brute))]
    tol = 1e-10 if method == "exact" else 1e-5
    torch.testing.assert_close(pen.last_value, mean_value, rtol=tol, atol=0)
    between = pen(xs[0], step=1)  # the term a step between computed ones adds
    assert float(between.detach()) == pytest.approx(float(mean_value), rel=tol)
    assert rel_error(grads_of(between, model), mean_grads) < tol
    last_alone = brute[-1][1]  # what was reused before: one micro-batch's gradient, far from the mean
    assert rel_error(last_alone, mean_grads) > 0.1


def _in_place(model) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)  # an L-BFGS line search's write (version counters advance)


def _fused_adam(model) -> None:
    optimiser = torch.optim.Adam(model.parameters(), lr=0.1, fused=True)  # version counters stay as they were
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimiser.step()
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("move", [_in_place, pytest.param(_fused_adam, marks=pytest.mark.skipif(
    not FUSED_ADAM_ON_CPU, reason="this torch fuses Adam on accelerators only"))], ids=["in-place", "fused-adam"])
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_a_call_after_the_parameters_moved_starts_the_mean_over(method: str, move) -> None:
    """An optimiser's closure (L-BFGS), or a step counter that does not advance, calls at the same step number at new
    parameters: the reused gradient is that call's alone, at the parameters it was taken at. Its labels: the step's
    first numbers again after a write in place (a line search), the stream's next after an optimiser step
    (:mod:`torchfim.train.step_draws`)."""
    model = tanh_mlp(3, seed=84)
    x = mlp_inputs(6, seed=85)
    pen = FisherPenalty(model, alpha=ALPHA, every=4, grad_method=method, generator=torch.Generator().manual_seed(SEED))
    _computed(pen, x, 0, shared=True)
    model.zero_grad(set_to_none=True)
    move(model)
    _computed(pen, x, 0, shared=True)
    generator = torch.Generator().manual_seed(SEED)
    if move is _fused_adam:
        labels(model, x, "categorical", generator)  # the first call's draw; the second call draws on
    drawn = labels(model, x, "categorical", generator)
    value, grads = brute_penalty(model, x, drawn, "categorical", ALPHA, "batch_gradient")
    tol = 1e-10 if method == "exact" else 1e-5
    torch.testing.assert_close(pen.last_value, value, rtol=tol, atol=0)
    assert rel_error(grads_of(pen(x, step=1), model), grads) < tol


def test_a_resumed_penalty_reuses_the_saved_mean_and_starts_a_new_one() -> None:
    """The saved state carries the mean; calls of the resumed penalty, even at the saved step with the parameters as
    they were, average their own gradients only (as a penalty without a kept gradient and the same generator)."""
    model = tanh_mlp(3, seed=86)
    xs = [mlp_inputs(6, seed=87 + j) for j in range(2)]
    pen = FisherPenalty(model, alpha=ALPHA, every=2, generator=torch.Generator().manual_seed(SEED))
    for x in xs:
        _computed(pen, x, 0, shared=True)
    resumed = FisherPenalty(model, alpha=ALPHA, every=2, generator=torch.Generator())
    resumed.load_state_dict(pen.state_dict())
    assert rel_error(grads_of(resumed(xs[0], step=1), model), grads_of(pen(xs[0], step=1), model)) == 0.0
    fresh = FisherPenalty(model, alpha=ALPHA, every=2, generator=torch.Generator())
    fresh.generator.set_state(pen.generator.get_state())
    for x in xs:
        _computed(resumed, x, 0, shared=True)
        _computed(fresh, x, 0, shared=True)
    assert math.isclose(float(resumed.last_value), float(fresh.last_value), rel_tol=1e-12)
    assert rel_error(grads_of(resumed(xs[0], step=1), model), grads_of(fresh(xs[0], step=1), model)) < 1e-12


def test_another_models_optimiser_does_not_break_the_mean() -> None:
    """An optimiser of other parameters stepping between the micro-batches (another model trained beside) leaves this
    model's parameters unmoved: the mean goes on over the step's calls."""
    model = tanh_mlp(3, seed=90)
    xs = [mlp_inputs(6, seed=91 + j) for j in range(2)]
    pen = FisherPenalty(model, alpha=ALPHA, every=4, generator=torch.Generator().manual_seed(SEED))
    other = torch.nn.Linear(3, 3)
    other_optimiser = torch.optim.SGD(other.parameters(), lr=0.1)
    for x in xs:
        _computed(pen, x, 0, shared=True)
        other(torch.randn(2, 3)).sum().backward()
        other_optimiser.step()
    brute = _brute(model, xs, "batch_gradient")
    mean_grads = [sum(parts) / len(brute) for parts in zip(*(grads for _, grads in brute))]
    assert pen._kept.calls == 2 and rel_error(grads_of(pen(xs[0], step=1), model), mean_grads) < 1e-10
