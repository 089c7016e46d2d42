"""``FisherPenalty`` on a ``DistributedDataParallel`` model trained by two processes (gloo, CPU).

Each rank draws its own labels (its own generator) on its own data; DDP averages the gradients of
``task + penalty`` over the ranks, through the penalty's internal forwards and differentiations (the
double-backprop graph, the finite difference's two passes, the per-sample gradients of the trace kind,
the cached-gradient surrogate between computed steps). The oracle is one process that computes each
rank's step on an unwrapped copy with the same generator and applies the mean gradient: after three SGD
steps the ranks hold the same parameters, equal to the oracle's to 1e-12 (double backprop) and to 1e-7
of their scale (the finite difference divides the reduction's rounding by its step ε ≈ 1e-8·(1 + ‖θ‖)).
"""

from __future__ import annotations

import copy
import itertools
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from processes import over_loopback, run_processes
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
