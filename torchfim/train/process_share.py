"""``FisherTraceMonitor(..., across_processes=True)``: one measurement shared by the processes of a
``torch.distributed`` run.

Every process holds the same inputs and measures its share of them: process r of W the rows
``r, r + W, r + 2W, …`` of each held mini-batch (``N_r`` of the ``N`` held inputs), with its own labels (the
private generator is seeded ``DEFAULT_SEED + r``; a generator passed in must differ between processes). Each
process's estimate ``T_r`` of its share's mean, with variance ``V_r`` (and the fresh-label variance ``P_r`` of
the control variate), is unbiased and independent of the others', so the record of the whole held set is the
stratified combination

    ``T = Σ_r (N_r/N) T_r``,  ``V = Σ_r (N_r/N)² V_r``,  ``variance_ratio = V / Σ_r (N_r/N)² P_r``,

from one ``all_gather`` of twenty-three numbers per measurement; every process gets the same record, and the first
alone writes the files. A large measurement costs each process about ``1/W`` of a whole one; a small one keeps its fixed
costs (the engine's set-up, the collective). Measured, two processes of one thread against one process measuring
everything, MLP 64-256-256-10, gloo on one CPU: 0.45× at 8192 held inputs, 0.81× at 2048, 1.09× at 512. With ``subset=m``, each process
measures windows of ``⌈m/W⌉`` of its share. The same ``all_gather`` checks that the processes' monitors have the
same settings and train the same parameters, that they hold the same inputs (a digest of every held mini-batch's
bytes, in order) cut into the same mini-batches (their sizes compared first, naming a cut that differs; the processes'
shares must add up to the held set) and the same weights
(:func:`torchfim._processes.weights_fingerprint`) and that their generators were in different states (refused otherwise, with the fix): a share of other inputs, or labels drawn with the same
random numbers, would make ``V`` too small, and shares of other models would make a trace of no model. A process
that fails anywhere in its measurement (building the engine included) raises its error there, and the others say
that it failed.
Every process must measure at the same steps, as it takes every optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .._process_checks import (
    CUT_NUMBERS,
    check_same_cut,
    check_same_kind,
    check_same_outputs,
    check_same_wrapping,
    cut_numbers,
    model_numbers,
    model_parts,
)
from .._processes import (
    Attempt,
    check_same_weights,
    gather_numbers,
    process_place,
    same_weights,
    trained_names,
    weights_fingerprint,
)
from .._settings_digest import digest_number, generator_fingerprint, settings_number
from .._words import counted
from ..engine.batch import Batch
from ..engine.output_probe import probe_rows
from ..errors import TorchfimError
from .checkpoint import held_digest

#: The call, in the messages.
WHAT = "FisherTraceMonitor(across_processes=True)"
SETTINGS_DIFFER = (
    "FisherTraceMonitor(across_processes=True) needs the same monitor on every process (the same family, every, "
    "n_samples, subset, control_variate, class_dim, mask and output, and the same parameters trained), but the "
    "processes' monitors differ; build it the same way on each (a setting chosen by rank, an output or mask "
    "function holding a value chosen by rank, or a layer frozen on one process alone, differs between them)"
)


#: A process's numbers in :meth:`ProcessShare.built`'s collective where its monitor failed to be built
#: (:func:`torchfim._processes.announced`).
FAILED_BEFORE = [1.0]


@dataclass(frozen=True)
class ProcessShare:
    """Process ``rank`` of ``world``, holding ``share`` of ``total`` inputs in mini-batches of ``sizes``, whose digest
    is ``digest`` (:func:`.checkpoint.held_digest`); the fewest any process holds, ``smallest`` (every process
    knows it: what one alone would refuse or warn of, all do); ``first``, the first rows of the whole held set, on
    which the processes' models must give the same outputs."""

    rank: int
    world: int
    share: int
    total: int
    sizes: list[int]
    digest: float
    smallest: int
    first: Batch

    @property
    def largest(self) -> int:
        """The most inputs any process holds: the first process's share, ``Σ ⌈size/world⌉`` over the held
        mini-batches."""
        return sum(len(range(0, size, self.world)) for size in self.sizes)

    def measured(self, measure: Callable[[], tuple[float, float, float, int]], generator: torch.Generator,
                 model: nn.Module, settings: tuple,
                 probe: Callable[[], list[float]]) -> tuple[float, float, float, int]:
        """``(T, V, P, inputs measured)`` of all processes from this one's ``measure()`` of ``model``, which draws its
        labels from ``generator``; see the module docstring. The one ``all_gather`` also counts the processes that
        failed (one that did raises its error, the others say so: none waits for a collective that would never
        come) and checks the monitors' ``settings`` with the parameters trained, the held inputs, the weights,
        the generators' states as they were before the draw and, where the buffers agree, the models' outputs on
        :attr:`first` (``probe()``: :func:`torchfim.engine.output_probe.output_digest`)."""
        state, weights = generator_fingerprint(generator), weights_fingerprint(model)
        buffers = weights_fingerprint(model, buffers=True)
        # The settings' digest inside the attempt too: a process that fails to take it says so to the others
        attempt = Attempt(lambda: (settings_number((settings, trained_names(model))), *measure(), probe()))
        call, trace, variance, plain, measured, outputs = attempt.result or (0.0, 0.0, 0.0, 0.0, 0,
                                                                             [math.nan] * 4)
        weight = self.share / self.total
        every = gather_numbers([weight * trace, weight**2 * variance, weight**2 * plain, float(measured),
                                float(attempt.failed), self.digest, state, weights, call, buffers, float(self.share),
                                *cut_numbers(self.sizes), *model_numbers(model, outputs)], model, WHAT)
        t, v, p, n, failed = (sum(e[i] for e in every) for i in range(5))  # in rank order: the same on every one
        attempt.settle(int(failed) - attempt.failed, "FisherTraceMonitor(across_processes=True)")
        digests, kinds, names = model_parts(every)
        check_same_wrapping(names, WHAT)
        if len({e[8] for e in every}) > 1:  # before any record: the shares would be of other measurements
            raise TorchfimError(SETTINGS_DIFFER)
        check_same_kind(kinds, WHAT)  # before the weights, which another dtype moves
        # before the inputs: a cut of the same inputs is named as such; the record's weights share/total need the
        # shares to add up to the total
        check_same_cut([e[11:11 + CUT_NUMBERS] for e in every], self.sizes, self.rank, WHAT, [e[10] for e in every])
        _check_alike([e[5] for e in every], [e[6] for e in every], [e[7] for e in every], [e[9] for e in every])
        if same_weights([e[9] for e in every]):  # other buffers (warned of) move the outputs too
            check_same_outputs(digests, WHAT)
        return t, v, p, int(n)

    def built(self, model: nn.Module) -> None:
        """The one collective of the monitors' construction, on every process: where one process's monitor was
        refused when built (its :func:`~torchfim._processes.announced` constructor gathers :data:`FAILED_BEFORE`),
        the others stop here, naming it, before any training step (they waited for it at their first measurement,
        while its process went on to the training's own collectives)."""
        every = gather_numbers([0.0], model, WHAT)
        failed = sum(e[0] for e in every)
        if failed:
            others = counted(int(failed), "other process", "other processes")
            raise TorchfimError(f"FisherTraceMonitor(across_processes=True): {others} failed to build it (the error is "
                                "raised there), so this one stops too")


def _check_alike(digests: list[float], states: list[float], weights: list[float], buffers: list[float]) -> None:
    """Refuse processes that hold other inputs (their :func:`.checkpoint.held_digest`) or other weights, or whose label
    generators were in the same state."""
    if len(set(digests)) > 1:
        raise TorchfimError(
            "FisherTraceMonitor(across_processes=True) needs the same held inputs on every process, in the same "
            "order (each measures its share), but they differ; pass every process the whole held set, unshuffled "
            "and unaugmented (not a DistributedSampler's shard, nor a loader shuffled by each process's own seed, "
            "nor a random flip or crop applied by each)"
        )
    check_same_weights(weights, "FisherTraceMonitor(across_processes=True)", buffers)
    if len(set(states)) < len(states):
        raise TorchfimError(
            "FisherTraceMonitor(across_processes=True): two processes' label generators are in the same state, "
            "so their labels would share random numbers and the standard error would be too small; seed each "
            "process's generator differently (e.g. manual_seed(seed + rank)), or pass none"
        )


def shared_rows(held: list[Batch], rank: int, world: int) -> list[Batch]:
    """Rows ``rank, rank + world, …`` of each held mini-batch (the empty ones dropped); refused on every process
    when one is left none (refused by that one alone, the others waited for it at their first measurement)."""
    if all(b.size < world for b in held):  # the last process, world − 1, gets no row of any mini-batch
        total = sum(b.size for b in held)
        raise TorchfimError(
            f"across_processes=True: {total} held inputs (at most {max(b.size for b in held)} in a mini-batch, "
            f"shared row by row) leave process {world - 1} of {world} none to measure; hold at least {world} "
            "inputs in a mini-batch"
        )
    return [b.rows(slice(rank, None, world)) for b in held if b.size > rank]


def shared(held: list[Batch], across_processes: object) -> tuple[list[Batch], ProcessShare | None]:
    """This process's share of ``held`` and its place (``held`` itself and None unless ``across_processes``)."""
    place = process_place(across_processes)
    if place is None:
        return held, None
    rank, world = place
    mine = shared_rows(held, rank, world)
    smallest = sum(len(range(world - 1, b.size, world)) for b in held)  # the last process holds the fewest
    return mine, ProcessShare(rank, world, sum(b.size for b in mine), sum(b.size for b in held),
                              [b.size for b in held], digest_number(held_digest(held)), smallest, probe_rows(held[0]))
