"""What a workload is: contenders (setup untimed, call timed), the floor, and the peers' contenders."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn

from . import peers as peer_lib
from .models import Data

__all__ = ["Runner", "Contender", "Workload", "floor_contender", "peer_contenders"]

Runner = Callable[[], object]


@dataclass
class Contender:
    """One way to compute a workload: ``make()`` (untimed setup) returns the call that is timed."""
    name: str
    make: Callable[[], Runner]  # setup (untimed) → runner (timed)
    compare: bool = True  # its result enters the agreement check
    per_call: int = 1  # one timed call covers this many units (training steps)


@dataclass
class Workload:
    """A quantity to compute, on one model and data, by several contenders."""
    name: str
    model: str  # architecture, for the report
    num_params: int
    contenders: list[Contender]
    ratio_to: str = "floor"
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    # for torchfim-only workloads: an independent check of torchfim's result → (rel. error, what)
    check: Callable[[object], tuple[float, str]] | None = None
    # replaces torchfim's own result in the agreement check (score labels that could not be aligned)
    reference_value: Tensor | None = None


def floor_contender(model: nn.Module, data: Data) -> Contender:
    """One forward + backward of the summed NLL (true labels) over all mini-batches."""

    def make() -> Runner:
        params = [p for p in model.parameters() if p.requires_grad]

        def run() -> None:
            for p in params:
                p.grad = None
            for x, y in zip(data.batches, data.targets):
                F.cross_entropy(model(x), y, reduction="sum").backward()
            for p in params:
                p.grad = None

        return run

    return Contender("floor", make, compare=False)


def peer_contenders(kind: str, model: nn.Module, data: Data, labels: list[Tensor], status: dict) -> tuple[list[Contender], dict[str, str]]:
    """The peers that can compute ``kind`` exactly, and why each other peer is left out."""
    contenders, left_out = [], {}
    for name in ("backpack", "nngeometry", "curvlinops"):
        maker = peer_lib.MAKERS.get(kind, {}).get(name)
        if maker is None:
            left_out[name] = peer_lib.LEFT_OUT.get(kind, {}).get(name, f"{name} has no exact {kind} computation")
            continue
        if not status[name]["available"]:
            left_out[name] = f"{name} unavailable: {status[name]['error']}"
            continue
        contenders.append(Contender(name, lambda maker=maker: maker(model, data.batches, labels)))
    return contenders, left_out
