"""``torchfim.fisher(..., across_processes=True)``: one Fisher computed by the processes of a ``torch.distributed``
run together.

Every process passes the same inputs and computes on its share: process ``r`` of ``W`` takes the rows
``r, r + W, r + 2W, …`` of each mini-batch (``n_r`` of the ``N`` inputs), drawing its own labels. Its estimate
``F_r`` of its share's mean, with variance ``V_r`` for the random estimators, is unbiased and independent of the
other processes', so the Fisher of all the inputs is the stratified combination

    ``F = Σ_r (n_r/N) F_r``,  ``V = Σ_r (n_r/N)² V_r``,

from an ``all_reduce`` of the result (for ``structure="full"`` its ``P × P`` matrix) and of two numbers; every
process returns the same. The exact Fisher is then that of one process computing everything, to rounding. Each
process does about ``1/W`` of the work. Before the result is combined, one ``all_gather`` checks that the
processes held the same inputs (a checksum of every mini-batch, in order: a ``DistributedSampler``'s shard on each
would be refused) and, for the random estimators, that their label generators were in different states: labels
drawn with the same random numbers would make ``V`` too small. Without a generator, each process draws from a
private one seeded from torch's global generator (one draw, the same on every process) plus its rank.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor

from ._processes import collective_device, generator_fingerprint
from .engine.batch import Batch, inputs_checksum
from .engine.session import EMPTY
from .errors import TorchfimError

__all__ = ["RowShare"]

#: A result as the public functions return it: one tensor, or one per parameter tensor.
Result = Tensor | dict[str, Tensor]


class RowShare:
    """Process ``rank`` of ``world``: its rows of each mini-batch, and the combination of the processes' results."""

    def __init__(self, rank: int, world: int) -> None:
        self.rank, self.world = rank, world
        self._checksum, self._rows_seen = 0.0, 0
        self._labels: float | None = None  # the label generator's fingerprint before any draw; None: no labels

    def rows(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """This process's rows of each mini-batch (those with none for it skipped), every whole one checksummed."""
        for batch in batches:
            self._checksum += inputs_checksum([batch], self._rows_seen)
            self._rows_seen += batch.size
            if batch.size > self.rank:
                yield batch.rows(slice(self.rank, None, self.world))

    def generator(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
        """The labels' generator: ``generator``, or where there is none a private one on ``device`` seeded from
        torch's global generator plus the rank; its state noted before any draw, for :meth:`check`."""
        if generator is None:
            generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,))) + self.rank)
        self._labels = generator_fingerprint(generator)
        return generator

    def check(self, device: torch.device) -> None:
        """Refuse processes that held other inputs, or whose label generators were in the same state."""
        mine = torch.tensor([self._checksum, -1.0 if self._labels is None else self._labels],
                            dtype=torch.float64, device=collective_device(device))
        every = [torch.empty_like(mine) for _ in range(self.world)]
        torch.distributed.all_gather(every, mine)
        sums, states = [float(t[0]) for t in every], [float(t[1]) for t in every]
        if any(not math.isclose(s, sums[0], rel_tol=1e-9, abs_tol=1e-12) for s in sums):
            raise TorchfimError(
                "fisher(across_processes=True) needs the same inputs on every process (each computes on its share "
                "of every mini-batch), but they differ; pass every process the whole data set (not a "
                "DistributedSampler's shard), or across_processes=False for each process's Fisher of its own inputs"
            )
        if self._labels is not None and len(set(states)) < len(states):
            raise TorchfimError(
                "fisher(across_processes=True): two processes' label generators are in the same state, so their "
                "labels would share random numbers and the standard error would be too small; seed each process's "
                "generator differently (e.g. manual_seed(seed + rank)), or pass none"
            )

    def mean(self, value: Result, n: int, device: torch.device) -> tuple[Result, int]:
        """``(Σ_r n_r F_r / N, N)`` from this process's mean ``value`` over its ``n`` inputs."""
        total = self._sum(torch.tensor(float(n), dtype=torch.float64), device)
        if not total:
            raise TorchfimError(EMPTY)
        return _map(value, lambda t: self._sum(t.double() * n, device).div_(total).to(t.dtype)), int(total)

    def mean_variance(self, variance: Result, n: int, total: int, device: torch.device) -> Result:
        """``Σ_r (n_r/N)² V_r`` from this process's variance ``variance`` of its mean over ``n`` inputs."""
        return _map(variance, lambda t: self._sum(t.double() * (n / total) ** 2, device).to(t.dtype))

    def _sum(self, t: Tensor, device: torch.device) -> Tensor:
        """``t`` summed over the processes, on ``t``'s device."""
        where = t.device
        t = t.to(collective_device(device)).contiguous()
        torch.distributed.all_reduce(t)
        return t.to(where)


def _map(value: Result, fn) -> Result:
    return {name: fn(t) for name, t in value.items()} if isinstance(value, dict) else fn(value)
