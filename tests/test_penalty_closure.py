"""An optimiser that evaluates its closure several times per step (L-BFGS) sees one penalty function per step.

Before, each call drew new labels, so a line search compared values of a different random function at each point: two
evaluations at the same parameters within one step gave different values. Now a call at the same step after the
parameters moved draws from the random numbers of the step's first call (:mod:`torchfim.train.step_draws`), and
micro-batches at the same parameters go on drawing from the stream.

Oracles: the first evaluation's value, to the last bit, at the same parameters written back; the penalty's definition
differentiated twice in float64 (``test_train_penalty.brute_penalty``) on labels drawn from a generator seeded as the
penalty's.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp_inputs, tanh_mlp
from test_train_penalty import SEED, brute_penalty, labels
from torch import nn
from torch_versions import optimiser_step_hooks_run

from torchfim.train import FisherPenalty

ALPHA = 0.37
SETTINGS = [("batch_gradient", "exact"), ("batch_gradient", "finite_difference"), ("trace", "exact"),
            ("trace", "finite_difference")]


def _value(pen: FisherPenalty, x: torch.Tensor, step: int, shared: bool) -> float:
    if shared:
        pen.penalised_loss(x, lambda out: out.sum() * 0.0, step=step)
    else:
        pen(x, step=step)
    return float(pen.last_value)


def _written_back(model: torch.nn.Module, saved: list[torch.Tensor]) -> None:
    """The parameters written back in place to ``saved``, as a line search returns to a point."""
    with torch.no_grad():
        for p, was in zip(model.parameters(), saved, strict=True):
            p.copy_(was)


@pytest.mark.parametrize("seeded", [True, False], ids=["generator", "global"])
@pytest.mark.parametrize("shared", [False, True], ids=["call", "penalised_loss"])
@pytest.mark.parametrize(("kind", "method"), SETTINGS)
def test_evaluations_of_one_step_at_the_same_parameters_agree(kind: str, method: str, shared: bool,
                                                              seeded: bool) -> None:
    torch.manual_seed(5)
    model, x = tanh_mlp(3, seed=91), mlp_inputs(40, seed=92)
    generator = torch.Generator().manual_seed(SEED) if seeded else None
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=method, generator=generator)
    saved = [p.detach().clone() for p in model.parameters()]
    first = _value(pen, x, 0, shared)
    with torch.no_grad():
        model[0].weight.add_(0.5)  # a point of the line search
    moved = _value(pen, x, 0, shared)
    _written_back(model, saved)
    assert _value(pen, x, 0, shared) == first != moved
    assert _value(pen, x, 1, shared) != first  # the next step draws anew


def test_a_closure_evaluation_is_the_penalty_of_the_steps_first_numbers_at_the_new_parameters() -> None:
    model, x = tanh_mlp(3, seed=93), mlp_inputs(40, seed=94)
    pen = FisherPenalty(model, alpha=ALPHA, generator=torch.Generator().manual_seed(SEED))
    pen(x, step=0)
    with torch.no_grad():
        model[2].bias.sub_(0.4)
    got = pen(x, step=0)
    value, _ = brute_penalty(model, x, labels(model, x, "categorical", torch.Generator().manual_seed(SEED)),
                             "categorical", ALPHA, "batch_gradient")
    torch.testing.assert_close(got.detach(), value.to(got.dtype), rtol=1e-10, atol=0)


def test_micro_batches_at_the_same_parameters_draw_on_and_the_global_stream_is_left_as_found() -> None:
    """Gradient accumulation: calls at one step and the same parameters each draw their own numbers. A replayed call
    with torch's global generator leaves it where it was."""
    model, x = tanh_mlp(3, seed=95), mlp_inputs(40, seed=96)
    pen = FisherPenalty(model, alpha=ALPHA)
    torch.manual_seed(7)
    values = [float(pen(x, step=0).detach()) for _ in range(2)]
    assert values[0] != values[1]
    with torch.no_grad():
        model[0].bias.add_(0.1)
    before = torch.get_rng_state()
    pen(x, step=0)
    assert torch.equal(torch.get_rng_state(), before)


def test_lbfgs_evaluates_each_step_on_its_first_numbers() -> None:
    """torch's L-BFGS with a strong-Wolfe line search (its points all differ): every closure evaluation of a step is
    the penalty, to the last bit, of a fresh penalty at that evaluation's parameters whose generator starts where the
    step's first evaluation started."""
    model, x = tanh_mlp(3, seed=97), mlp_inputs(40, seed=98)
    y = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(99))
    pen = FisherPenalty(model, alpha=ALPHA, grad_method="finite_difference",
                        generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=6, line_search_fn="strong_wolfe")
    seen = []
    for step in range(2):
        start = pen.generator.get_state()

        def closure(step: int = step, start: torch.Tensor = start) -> torch.Tensor:
            opt.zero_grad()
            loss = pen.penalised_loss(x, lambda out: F.cross_entropy(out, y), step=step)
            loss.backward()
            seen.append((start, [p.detach().clone() for p in model.parameters()], float(pen.last_value)))
            return loss

        opt.step(closure)
    assert len(seen) > 4
    for start, params, value in seen:
        twin = tanh_mlp(3, seed=97)
        _written_back(twin, params)
        fresh = FisherPenalty(twin, alpha=ALPHA, grad_method="finite_difference", generator=torch.Generator())
        fresh.generator.set_state(start)
        assert _value(fresh, x, 0, shared=True) == value


def test_a_closure_over_chunks_replays_each_chunk() -> None:
    """A full-batch L-BFGS closure that loops over chunks of the data: each chunk of a later evaluation draws the
    numbers of its counterpart in the first."""
    model, chunks = tanh_mlp(3, seed=100), [mlp_inputs(20, seed=101 + j) for j in range(3)]
    pen = FisherPenalty(model, alpha=ALPHA, generator=torch.Generator().manual_seed(SEED))
    saved = [p.detach().clone() for p in model.parameters()]
    first = [_value(pen, x, 0, shared=False) for x in chunks]
    with torch.no_grad():
        model[0].weight.add_(0.5)
    moved = [_value(pen, x, 0, shared=False) for x in chunks]
    _written_back(model, saved)
    assert [_value(pen, x, 0, shared=False) for x in chunks] == first
    assert all(a != b for a, b in zip(first, moved))
    assert len(set(first)) == 3


def test_a_step_counter_that_does_not_advance_draws_new_numbers_after_each_optimiser_step() -> None:
    if not optimiser_step_hooks_run():
        pytest.skip("this torch's dynamo, having compiled in this process, unwrapped the optimisers' step hooks, by "
                    "which an optimiser step is seen (torch 2.2)")
    model, x = tanh_mlp(3, seed=102), mlp_inputs(40, seed=103)
    pen = FisherPenalty(model, alpha=ALPHA, generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    states = []
    for _ in range(3):
        opt.zero_grad()
        pen(x, step=0).backward()
        opt.step()
        states.append(pen.generator.get_state())
    assert not torch.equal(states[0], states[1]) and not torch.equal(states[1], states[2])


def test_a_run_rolled_back_in_its_process_draws_as_an_uninterrupted_one() -> None:
    """Reloading the state saved before a step (recovery from a loss spike) and redoing that step: the same values as
    a run that never went back. Before, the redone step counted as the step evaluated again (its weights written back),
    so it left the generator where the reload had put it, and the next step drew the redone step's numbers."""
    x = mlp_inputs(40, seed=105)
    runs = [FisherPenalty(tanh_mlp(3, seed=104), alpha=ALPHA, generator=torch.Generator().manual_seed(SEED))
            for _ in range(2)]
    want = [_value(runs[0], x, step, shared=False) for step in range(3)]
    pen = runs[1]
    _value(pen, x, 0, shared=False)
    saved, weights = pen.state_dict(), [p.detach().clone() for p in pen.model.parameters()]
    _value(pen, x, 1, shared=False)  # the step that went wrong
    pen.load_state_dict(saved)
    _written_back(pen.model, weights)
    assert [_value(pen, x, step, shared=False) for step in (1, 2)] == want[1:]


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_a_penalty_with_its_own_generator_replays_dropout_too(method: str) -> None:
    """Dropout draws from torch's global generator, not the penalty's: both are replayed."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 3)).double().train()
    x = mlp_inputs(40, seed=106)
    pen = FisherPenalty(model, alpha=ALPHA, grad_method=method, generator=torch.Generator().manual_seed(SEED))
    saved = [p.detach().clone() for p in model.parameters()]
    first = _value(pen, x, 0, shared=True)
    with torch.no_grad():
        model[0].weight.add_(0.5)
    _value(pen, x, 0, shared=True)
    _written_back(model, saved)
    assert _value(pen, x, 0, shared=True) == first
