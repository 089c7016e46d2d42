"""``FisherPenalty`` on a ``DistributedDataParallel`` model trained by two processes (gloo, CPU).

Each rank draws its own labels (its own generator) on its own data; DDP averages the gradients of
``task + penalty`` over the ranks, through the penalty's internal forwards and differentiations (the
double-backprop graph, the finite difference's two passes, the per-sample gradients of the trace kind,
the cached-gradient surrogate between computed steps). The oracle is one process that computes each
rank's step on an unwrapped copy with the same generator and applies the mean gradient: after three SGD
steps the ranks hold the same parameters, equal to the oracle's to 1e-12 (double backprop) and to 1e-7
of their scale (the finite difference divides the reduction's rounding by its step ε ≈ 1e-8·(1 + ‖θ‖)). The
finite-difference term on a DDP module that finds unused parameters is checked against the definitions
(:func:`oracles.penalty_definition`): each step's gradient is the mean over the ranks of theirs; each penalty (both
kinds, both grad methods) on such a module against one process computing each rank's gradient without DDP at the
parameters the ranks held, then their mean, to 1e-10; and so on a module with a Linear its forward never uses, which
keeps no gradient.
"""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from oracles import penalty_definition
from processes import over_loopback, run_processes
from test_penalty_unused_parameters import WithUnused
from test_train_penalty import labels
from torch import nn

from torchfim.train import FisherPenalty

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")

CASES = list(itertools.product(("batch_gradient", "trace"), ("exact", "finite_difference"), (False, True), (1, 2)))
STEPS, LR, ALPHA, WORLD = 3, 0.1, 0.3, 2


def _setting() -> tuple[nn.Module, list[list[tuple[torch.Tensor, torch.Tensor]]]]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    g = torch.Generator().manual_seed(5)
    data = [[(torch.randn(16, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (16,), generator=g))
             for _ in range(STEPS)] for _ in range(WORLD)]
    return model, data


def _penalty(model: nn.Module, case: tuple, rank: int) -> FisherPenalty:
    kind, grad_method, _, every = case
    return FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=grad_method, every=every,
                         generator=torch.Generator().manual_seed(1 + rank))


def _loss(model: nn.Module, pen: FisherPenalty, batch: tuple, step: int, shared: bool) -> torch.Tensor:
    x, y = batch
    if shared:
        return pen.penalised_loss(x, lambda out: F.cross_entropy(out, y), step=step)
    return F.cross_entropy(model(x), y) + pen(x, step=step)


def _rank(rank: int, store: str, out: str) -> None:
    over_loopback()
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    warnings.simplefilter("ignore")
    base, data = _setting()
    trained = {}
    for case in CASES:
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(base))
        pen, opt = _penalty(model, case, rank), torch.optim.SGD(model.parameters(), lr=LR)
        for step in range(STEPS):
            opt.zero_grad()
            _loss(model, pen, data[rank][step], step, case[2]).backward()
            opt.step()
        trained[case] = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save(trained, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _one_process(case: tuple) -> torch.Tensor:
    """Each rank's step on its own copy, then the mean of the ranks' gradients applied to every copy."""
    base, data = _setting()
    models = [copy.deepcopy(base) for _ in range(WORLD)]
    pens = [_penalty(m, case, r) for r, m in enumerate(models)]
    for step in range(STEPS):
        grads = []
        for r, model in enumerate(models):
            model.zero_grad()
            _loss(model, pens[r], data[r][step], step, case[2]).backward()
            grads.append([p.grad.clone() for p in model.parameters()])
        with torch.no_grad():
            for model in models:
                for p, *per_rank in zip(model.parameters(), *grads):
                    p -= LR * sum(per_rank) / WORLD
    return torch.cat([p.detach().flatten() for p in models[0].parameters()])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    where: Path = tmp_path_factory.mktemp("ddp")
    run_processes(_rank, (str(where / "store"), str(where / "trained")), WORLD)
    return [torch.load(where / f"trained.{rank}") for rank in range(WORLD)]


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_ddp_training_with_the_penalty_is_the_mean_of_the_ranks_steps(trained: list[dict], case: tuple) -> None:
    first, second = (t[case] for t in trained)
    assert torch.equal(first, second)
    want = _one_process(case)
    tolerance = 1e-12 if case[1] == "exact" else 1e-7 * float(want.abs().max())
    assert float((first - want).abs().max()) < tolerance


# ------------------------------------------------ DDP(find_unused_parameters=True)
UNUSED_CASES = list(itertools.product((1, 3), (1, 2)))  # every, micro-batches per optimiser step


def _unused_rank(rank: int, store: str, out: str) -> None:
    """On DDP modules built with ``find_unused_parameters=True``, in one pair of processes: the batch-gradient term by
    finite differences (:func:`_batch_gradient_steps`) and every penalty (:func:`_penalty_steps`), on the MLP and on
    :class:`WithUnused`."""
    over_loopback()
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    warnings.simplefilter("ignore")
    base, data = _setting()
    got = {"definitions": _batch_gradient_steps(rank, base, data), "one_process": _penalty_steps(rank, base, data),
           "with_unused": _penalty_steps(rank, _with_unused(), data, errors=True)}
    torch.save(got, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _batch_gradient_steps(rank: int, base: nn.Module, data: list) -> dict:
    """Two optimiser steps per case of ``ce(ddp(x)) + pen(x)``, the penalty by finite differences: the gradients each
    step hands the optimiser."""
    got = {}
    for every, micro in UNUSED_CASES:
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(base), find_unused_parameters=True)
        pen = FisherPenalty(model, alpha=ALPHA, grad_method="finite_difference", every=every,
                            generator=torch.Generator().manual_seed(1 + rank))
        opt, steps = torch.optim.SGD(model.parameters(), lr=LR), []
        for step in range(2):
            opt.zero_grad()
            for x, y in zip(*(t.chunk(micro) for t in data[rank][step])):
                ((F.cross_entropy(model(x), y) + pen(x, step=step)) / micro).backward()
            steps.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
            opt.step()
        got[every, micro] = steps
    return got


def _definition(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """The penalty's gradient on the labels ``y``, from its definition."""
    _, *grads = penalty_definition(lambda rows: torch.log_softmax(model(x[rows]), -1).gather(-1, y[rows, None]).sum(),
                                   list(model.parameters()), len(x), "batch_gradient", ALPHA)
    return grads


def _definition_steps(every: int, micro: int) -> list[torch.Tensor]:
    """The gradients of :func:`_batch_gradient_steps`'s two steps from the definitions: the mean over the ranks of each rank's
    task gradient and penalty gradient (each micro-batch's on its labels, drawn in order from the rank's generator;
    on a step between computed ones, the mean over the computed step's micro-batches), then an SGD step."""
    base, data = _setting()
    model = copy.deepcopy(base)
    params = list(model.parameters())
    generators = [torch.Generator().manual_seed(1 + rank) for rank in range(WORLD)]
    kept, steps = [None] * WORLD, []
    for step in range(2):
        total = [torch.zeros_like(p) for p in params]
        for rank in range(WORLD):
            parts = []
            for x, y in zip(*(t.chunk(micro) for t in data[rank][step])):
                task = torch.autograd.grad(F.cross_entropy(model(x), y), params)
                if step % every == 0:
                    parts.append(_definition(model, x, labels(model, x, "categorical", generators[rank])))
                penalty = parts[-1] if step % every == 0 else kept[rank]
                total = [t + (a + b) / (micro * WORLD) for t, a, b in zip(total, task, penalty)]
            if step % every == 0:
                kept[rank] = [sum(column) / micro for column in zip(*parts)]
        steps.append(torch.cat([t.flatten() for t in total]))
        with torch.no_grad():
            for p, g in zip(params, total):
                p -= LR * g
    return steps


@pytest.fixture(scope="module")
def unused(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    where: Path = tmp_path_factory.mktemp("ddp_unused")
    run_processes(_unused_rank, (str(where / "store"), str(where / "steps")), WORLD)
    return [torch.load(where / f"steps.{rank}") for rank in range(WORLD)]


@pytest.mark.parametrize("case", UNUSED_CASES, ids=[f"every{e}-micro{m}" for e, m in UNUSED_CASES])
def test_the_finite_difference_term_on_ddp_finding_unused_parameters(unused: list[dict], case: tuple) -> None:
    """``loss = ce(ddp(x)) + pen(x)`` with ``DistributedDataParallel(find_unused_parameters=True)`` raised "Expected
    to mark a variable ready only once" in the caller's backward (a review): the perturbed pass, DDP's last forward,
    ran on detached copies of the parameters, so DDP took every parameter for unused. Each step's gradient is the
    definitions' mean over the ranks."""
    want = _definition_steps(*case)
    for got in (u["definitions"][case] for u in unused):
        for a, b in zip(got, want):
            assert float((a - b).abs().max()) < 1e-7 * float(b.abs().max())  # measured up to 1.9e-8


def _penalty_steps(rank: int, base: nn.Module, data: list, errors: bool = False) -> dict:
    """Three SGD steps per case of :data:`CASES`: the parameters before each step and the gradients the step hands
    the optimiser; with ``errors``, a case whose backward fails has its message instead (DDP fails on every rank)."""
    got = {}
    for case in CASES:
        model = nn.parallel.DistributedDataParallel(copy.deepcopy(base), find_unused_parameters=True)
        pen, opt, steps = _penalty(model, case, rank), torch.optim.SGD(model.parameters(), lr=LR), []
        try:
            for step in range(STEPS):
                at = [p.detach().clone() for p in model.parameters()]
                opt.zero_grad()
                _loss(model, pen, data[rank][step], step, case[2]).backward()
                steps.append((at, [None if p.grad is None else p.grad.clone() for p in model.parameters()]))
                opt.step()
        except RuntimeError as err:
            if not errors:
                raise
            steps = str(err).splitlines()[0]
        got[case] = steps
    return got


def _with_unused() -> nn.Module:
    torch.manual_seed(0)
    return WithUnused().double()


def _mean_of_the_ranks(case: tuple, at: list[list[torch.Tensor]], base: nn.Module | None = None
                       ) -> list[list[torch.Tensor | None]]:
    """Each step's gradient from one process without DDP: at the parameters ``at[step]`` the ranks held, each rank's
    penalised gradient on an unwrapped copy of ``base`` (the MLP by default) with its data and its generator, then
    their mean (DDP's average; None where no rank has one)."""
    mlp, data = _setting()
    base = mlp if base is None else base
    models = [copy.deepcopy(base) for _ in range(WORLD)]
    pens = [_penalty(m, case, r) for r, m in enumerate(models)]
    steps = []
    for step, params in enumerate(at):
        grads = []
        for r, model in enumerate(models):
            for p, v in zip(model.parameters(), params):
                p.data.copy_(v)
            model.zero_grad()
            _loss(model, pens[r], data[r][step], step, case[2]).backward()
            grads.append([p.grad for p in model.parameters()])
        steps.append([None if None in per_rank else sum(per_rank) / WORLD for per_rank in zip(*grads)])
    return steps


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_the_penalty_on_ddp_finding_unused_parameters(unused: list[dict], case: tuple) -> None:
    """``kind="trace"`` by finite differences on ``DistributedDataParallel(find_unused_parameters=True)`` raised
    "Expected to mark a variable ready only once" in the caller's backward: its per-input passes ran through the
    wrapper on detached parameters, the last forward DDP searched, which reached none of them. Each step's gradient
    (both kinds, both grad methods, ``pen(x)`` and ``penalised_loss``, every 1 and 2) is the mean of the ranks'
    gradients computed without DDP at the parameters the ranks held."""
    first, second = (u["one_process"][case] for u in unused)
    want = _mean_of_the_ranks(case, [at for at, _ in first])
    for (at_1, got_1), (at_2, got_2), mean in zip(first, second, want):
        assert all(torch.equal(a, b) for a, b in zip(at_1 + got_1, at_2 + got_2))
        got, mean = torch.cat([g.flatten() for g in got_1]), torch.cat([g.flatten() for g in mean])
        assert float((got - mean).abs().max()) <= 1e-10 * float(mean.abs().max())  # measured 0 (2e-16 for exact before)


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_a_parameter_the_forward_never_uses_on_ddp_finding_unused_parameters(unused: list[dict], case: tuple) -> None:
    """On a module with a Linear its forward never calls, 15 of these 16 penalties raised "marked as ready twice" in
    the caller's backward: the penalty gave every trainable parameter a gradient, zeros for the unused one, which DDP
    had marked ready after the forward. Each step's gradient is the mean of the ranks' without DDP, and the unused
    parameters keep none, on the ranks as in one process."""
    first, second = (u["with_unused"][case] for u in unused)
    assert not isinstance(first, str) and not isinstance(second, str), first
    want = _mean_of_the_ranks(case, [at for at, _ in first], _with_unused())
    for (at_1, got_1), (at_2, got_2), mean in zip(first, second, want):
        assert all(torch.equal(a, b) for a, b in zip(at_1, at_2))
        assert [g is None for g in got_1] == [g is None for g in got_2] == [g is None for g in mean] == [
            name.startswith("unused") for name, _ in WithUnused().named_parameters()]
        got, mean = (torch.cat([g.flatten() for g in grads if g is not None]) for grads in (got_1, mean))
        assert torch.equal(got, torch.cat([g.flatten() for g in got_2 if g is not None]))
        assert float((got - mean).abs().max()) <= 1e-10 * float(mean.abs().max())  # measured 0
