"""``penalised_loss(..., model=ddp)`` where the penalty takes a forward of its own, in two processes (gloo, CPU).

That route serves inputs that carry a graph (features of a trunk the step also trains) and models with module
backward hooks: the penalty runs on detached inputs, the task loss on the caller's forward of the
``DistributedDataParallel`` module. The oracle is one process: each rank's gradient at the common parameters (the task
through the trunk and the head, the penalty by exact double backprop on the head), their mean, an SGD step. After three
steps both ranks hold the oracle's parameters, to 1e-12 (exact) and 1e-7 of their scale (finite differences).
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

CASES = list(itertools.product(("graph", "hook"), ("exact", "finite_difference")))
STEPS, LR, ALPHA, WORLD = 3, 0.1, 0.3, 2


def _setting(route: str) -> tuple[nn.Module, nn.Module, list]:
    """A trunk, a head (with a module backward hook for ``route="hook"``), and each rank's mini-batches."""
    torch.manual_seed(0)
    trunk = nn.Linear(4, 4).double()
    head = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    if route == "hook":
        head[0].register_full_backward_hook(lambda module, grad_in, grad_out: None)
    g = torch.Generator().manual_seed(5)
    data = [[(torch.randn(16, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (16,), generator=g))
             for _ in range(STEPS)] for _ in range(WORLD)]
    return trunk, head, data


def _features(trunk: nn.Module, x: torch.Tensor, route: str) -> torch.Tensor:
    return trunk(x) if route == "graph" else x


def _rank(rank: int, store: str, out: str) -> None:
    over_loopback()
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    warnings.simplefilter("ignore")
    trained = {}
    for route, grad_method in CASES:
        trunk, head, data = _setting(route)
        ddp = nn.parallel.DistributedDataParallel(head)
        pen = FisherPenalty(head, alpha=ALPHA, grad_method=grad_method, generator=torch.Generator().manual_seed(1 + rank))
        opt = torch.optim.SGD([*trunk.parameters(), *head.parameters()], lr=LR)
        for step in range(STEPS):
            x, y = data[rank][step]
            opt.zero_grad()
            loss = pen.penalised_loss(_features(trunk, x, route), lambda o, y=y: F.cross_entropy(o, y), step=step,
                                      model=ddp)
            loss.backward()
            for p in trunk.parameters():  # DDP averages the head's gradients; the trunk's by hand
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= WORLD
            opt.step()
        trained[route, grad_method] = torch.cat([p.detach().flatten() for p in [*trunk.parameters(), *head.parameters()]])
    torch.save(trained, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def _one_process(route: str) -> torch.Tensor:
    """Each rank's gradient at the common parameters (its labels from its own generator), their mean, SGD."""
    trunk, head, data = _setting(route)
    params = [*trunk.parameters(), *head.parameters()]
    copies = [copy.deepcopy(head) for _ in range(WORLD)]
    pens = [FisherPenalty(c, alpha=ALPHA, generator=torch.Generator().manual_seed(1 + r)) for r, c in enumerate(copies)]
    for step in range(STEPS):
        total = [torch.zeros_like(p) for p in params]
        for rank, (pen, twin) in enumerate(zip(pens, copies)):
            x, y = data[rank][step]
            with torch.no_grad():
                for a, b in zip(twin.parameters(), head.parameters()):
                    a.copy_(b)
            feats = _features(trunk, x, route)
            task = torch.autograd.grad(F.cross_entropy(head(feats), y), params, allow_unused=True)
            penalty = torch.autograd.grad(pen(feats.detach(), step=step), list(twin.parameters()))
            penalty = [torch.zeros_like(p) for p in trunk.parameters()] + list(penalty)
            total = [t + ((0 if a is None else a) + b) / WORLD for t, a, b in zip(total, task, penalty)]
        with torch.no_grad():
            for p, g in zip(params, total):
                p -= LR * g
    return torch.cat([p.detach().flatten() for p in params])


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    where: Path = tmp_path_factory.mktemp("ddp_own_forward")
    run_processes(_rank, (str(where / "store"), str(where / "trained")), WORLD)
    return [torch.load(where / f"trained.{rank}") for rank in range(WORLD)]


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, for the oracle's hooked head
@pytest.mark.parametrize("case", CASES, ids=["-".join(c) for c in CASES])
def test_the_penaltys_own_forward_beside_a_ddp_model_is_the_mean_of_the_ranks_steps(trained: list[dict],
                                                                                     case: tuple) -> None:
    first, second = (t[case] for t in trained)
    assert torch.equal(first, second)
    want = _one_process(case[0])
    tolerance = 1e-12 if case[1] == "exact" else 1e-7 * float(want.abs().max())
    assert float((first - want).abs().max()) < tolerance
