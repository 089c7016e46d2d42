"""``torchfim.fisher(..., across_processes=True)``: one Fisher computed by the processes of a ``torch.distributed``
run together.

Every process passes the same inputs and computes on its share: process ``r`` of ``W`` takes the rows
``r, r + W, r + 2W, …`` of each mini-batch (``n_r`` of the ``N`` inputs), drawing its own labels. Its estimate
``F_r`` of its share's mean, with variance ``V_r`` for the random estimators, is unbiased and independent of the
other processes', so the Fisher of all the inputs is the stratified combination

    ``F = Σ_r (n_r/N) F_r``,  ``V = Σ_r (n_r/N)² V_r``,

from an ``all_reduce`` of the result (for ``structure="full"`` its ``P × P`` matrix) and of two numbers; every
process returns the same. The exact Fisher is then that of one process computing everything, to rounding. Each
process does about ``1/W`` of the work.

Each process computes its share alone, with no collective until it is done; then one ``all_gather`` says whether
every process succeeded (a process that failed raises its error, the others name it: none waits for a
collective that would never come; a call refused before that, on some processes only, is announced in the same
collective: :func:`torchfim._processes.announced`), checks that the processes held the same inputs (a digest of the bytes of every
mini-batch, targets included, in order: a ``DistributedSampler``'s shard on each would be refused) cut into the
same mini-batches (their sizes compared first, so that another ``batch_size`` on one process is named as such) and
the same weights (:func:`torchfim._processes.weights_fingerprint`: a model built from another seed on each, not wrapped in
``DistributedDataParallel``, would be refused; other floating-point buffers, BatchNorm's statistics, are warned of),
where the buffers agree the same outputs on the first rows of the first mini-batch (a digest,
:func:`torchfim.engine.output_probe.output_digest`: the same weights under another activation, temperature or
forward hook would be refused), the same call (settings, and the
``output`` and ``mask`` functions by their code and the values they hold) and, for the random estimators, that their label generators
started in different states: labels drawn with the same random numbers would make ``V`` too small. Without a
generator, each process draws from a private one seeded from torch's global generator (one draw, the same on
every process) plus its rank. Labels are drawn per process, so a seed gives other labels for another number of
processes. A one-process group draws the labels of the call without ``across_processes`` where a generator is
passed; with ``generator=None``, other ones (its private generator, seeded from one draw of torch's global one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TypeVar

import torch
from torch import Tensor, nn

from ._process_checks import (
    CUT_NUMBERS,
    MODEL_NUMBERS,
    check_same_cut,
    check_same_kind,
    check_same_outputs,
    check_same_wrapping,
    cut_numbers,
    model_numbers,
    model_parts,
)
from ._processes import (
    Attempt,
    check_same_weights,
    collective_device,
    collective_failed,
    gather_numbers,
    keep_until_next,
    model_device,
    process_place,
    same_weights,
    trained_names,
    weights_fingerprint,
)
from ._settings_digest import digest_number, feed_digest, function_settings, generator_fingerprint
from .engine.batch import Batch
from .engine.output_probe import output_digest, probe_rows
from .engine.session import EMPTY
from .engine.view import ModelView
from .errors import TorchfimError
from .structures import PublicValue, entrywise

__all__ = ["RowShare", "row_share"]

Computed = TypeVar("Computed")


#: A process's numbers in :meth:`RowShare.together`'s collective where it failed before reaching it
#: (:func:`torchfim._processes.announced`): the failed flag first.
FAILED_BEFORE = [1.0, 0.0, -1.0, 0.0, 0.0, 0.0, *[0.0] * CUT_NUMBERS, *[float("nan")] * MODEL_NUMBERS]


class RowShare:
    """Process ``rank`` of ``world``: its rows of each mini-batch, and the combination of the processes' results."""

    def __init__(self, rank: int, world: int, call: tuple, what: str = "fisher") -> None:
        self.rank, self.world = rank, world
        self.what = f"{what}(across_processes=True)"  # the public call, in the messages
        self._digest = hashlib.sha1()
        self._sizes: list[int] = []  # of the mini-batches, compared apart from their digest (check_same_cut)
        self._labels: float | None = None  # the label generator's fingerprint before any draw; None: no labels
        self._call = hashlib.sha1()  # the settings the processes must share (row_share)
        feed_digest(self._call, call)
        self._first: Batch | None = None  # the first rows of the first mini-batch, every process's alike
        self._outputs = [float("nan")] * 4  # the model's output digest on them (probe); NaN: none taken

    def rows(self, batches: Iterable[Batch]) -> Iterator[Batch]:
        """This process's rows of each mini-batch (those with none for it skipped), every whole one digested and its
        size noted."""
        for batch in batches:
            feed_digest(self._digest, (batch.args, batch.kwargs, batch.targets))
            self._sizes.append(batch.size)
            if self._first is None and batch.size:
                self._first = probe_rows(batch)
            if batch.size > self.rank:
                yield batch.rows(slice(self.rank, None, self.world))

    def generator(self, generator: torch.Generator | None, device: torch.device) -> torch.Generator:
        """The labels' generator: ``generator``, or where there is none a private one on ``device`` seeded from
        torch's global generator plus the rank; its state noted before any draw."""
        if generator is None:
            generator = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,))) + self.rank)
        self._labels = generator_fingerprint(generator)
        return generator

    def probe(self, view: ModelView) -> None:
        """Take the digest of ``view``'s outputs on the first rows of the first mini-batch (after :meth:`rows` has
        seen it, inside the engine pass), which :meth:`together` compares between the processes."""
        if self._first is not None:
            self._outputs = output_digest(view, self._first)

    def together(self, compute: Callable[[], Computed], model: nn.Module) -> Computed:
        """``compute()`` (this process's share), once every process has finished its own, checked (see the module
        docstring)."""
        weights, buffers = weights_fingerprint(model), weights_fingerprint(model, buffers=True)
        attempt = Attempt(compute)
        # What decides the sums: the call's settings, the parameters trained, the result's shapes (mean's collectives)
        feed_digest(self._call, (trained_names(model), _shapes(attempt.result)))
        labels = -1.0 if self._labels is None else self._labels
        numbers = [attempt.kind, digest_number(self._digest), labels, weights, digest_number(self._call), buffers,
                   *cut_numbers(self._sizes), *model_numbers(model, self._outputs)]
        every = gather_numbers(numbers, model, self.what)
        computed = attempt.settle(sum(bool(e[0]) for e in every) - attempt.failed, self.what,
                                  [e[0] for e in every if e[0]])
        digests, kinds, names = model_parts(every)
        check_same_wrapping(names, self.what)
        if len({e[4] for e in every}) > 1:  # before any sum: the processes' sums would not pair up
            raise TorchfimError(
                f"{self.what} needs the same call on every process (the same estimator, family, structure, n_samples, "
                "return_stderr, class_dim, output and mask, and the same parameters trained), but the processes "
                "called it differently; call it the same way on each (a setting such as return_stderr=(rank == 0), "
                "an output or mask function chosen by rank or holding a value chosen by rank, as lambda o: o * scale "
                "with scale = 1 + rank, or a layer frozen on one process alone, differs between them)"
            )
        check_same_kind(kinds, self.what)  # before the inputs: each takes them in its own
        check_same_cut([e[6:6 + CUT_NUMBERS] for e in every], self._sizes, self.rank, self.what)
        if len({e[1] for e in every}) > 1:
            raise TorchfimError(
                f"{self.what} needs the same inputs in the same order on every process (each computes "
                "on its share of every mini-batch), but they differ; pass every process the whole data set in one "
                "order (not a DistributedSampler's shard, nor a loader shuffled by each process's own seed), or "
                "across_processes=False for each process's Fisher of its own inputs"
            )
        check_same_weights([e[3] for e in every], self.what, [e[5] for e in every])
        if same_weights([e[5] for e in every]):  # other buffers (warned of) move the outputs too
            check_same_outputs(digests, self.what)
        if self._labels is not None and len({e[2] for e in every}) < self.world:
            raise TorchfimError(
                f"{self.what}: two processes' label generators are in the same state, so their "
                "labels would share random numbers and the standard error would be too small; seed each process's "
                "generator differently (e.g. manual_seed(seed + rank)), or pass none"
            )
        return computed  # type: ignore[return-value]

    def mean(self, value: PublicValue | None, variance: PublicValue | None, n: int,
             model: nn.Module) -> tuple[PublicValue | None, PublicValue | None]:
        """``(Σ_r (n_r/N) F_r, Σ_r (n_r/N)² V_r)`` from this process's mean ``value`` over its ``n`` inputs and its
        variance ``variance`` (either None: none), computed in place in those tensors (half precision ones in a
        float32 copy), which the result is."""
        device = model_device(model)
        # Σ_r n_r F_r and Σ_r n_r² V_r first, N = Σ_r n_r last: the collective whose tensor stays held after the
        # call (keep_until_next) is then one number, not a copy of the result (P² numbers for a full Fisher).
        # In place, in the result's dtype: float64 copies and their products held four P × P matrices at once (a
        # trial's full Fisher over three processes peaked at 4× one process's memory); n_r F_r, W terms and the
        # division each round once, a few eps in all.
        value_sum = None if value is None else entrywise(lambda t: self._sum(_wide(t).mul_(n), device), value)
        variance_sum = None if variance is None else entrywise(lambda t: self._sum(_wide(t).mul_(n**2), device),
                                                              variance)
        total = float(self._sum(torch.tensor(float(n), dtype=torch.float64), device))
        if not total:
            raise TorchfimError(EMPTY)
        if value is not None:
            value = entrywise(lambda a, t: a.div_(total).to(t.dtype), value_sum, value)
        if variance is not None:
            variance = entrywise(lambda a, t: a.div_(total**2).to(t.dtype), variance_sum, variance)
        return value, variance

    def _sum(self, t: Tensor, device: torch.device) -> Tensor:
        """``t`` summed over the processes, on ``t``'s device."""
        where = t.device
        t = t.to(collective_device(device)).contiguous()
        with collective_failed(self.what):
            torch.distributed.all_reduce(t)
        keep_until_next([t])
        return t.to(where)


def _wide(t: Tensor) -> Tensor:
    """``t`` itself in float32 or wider, else a float32 copy (``n_r² V_r`` could overflow half precision)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _shapes(result: object) -> object:
    """The shapes of a result's tensors, its dicts' keys and its Nones: what the sums of :meth:`RowShare.mean` take."""
    if isinstance(result, Tensor):
        return tuple(result.shape)
    if isinstance(result, Mapping):
        return [(key, _shapes(value)) for key, value in result.items()]
    if isinstance(result, (tuple, list)):
        return [_shapes(value) for value in result]
    return None if result is None else type(result).__name__


def row_share(across_processes: object, mask: object, call: tuple, output: object = None,
              what: str = "fisher") -> RowShare | None:
    """This process's share of the rows for ``across_processes=True``, else None; refused without a process group
    or with a mask given as one tensor for the whole data set (each process computes on some of its rows).
    ``call``: the settings every process must call with alike (numbers, strings, tensors, and containers of them;
    a family as :func:`torchfim._settings_digest.family_settings` gives it), checked in :meth:`RowShare.together` before any sum, with the
    parameters trained and the result's shapes, as are the ``mask`` and ``output`` functions with the values they hold
    (:func:`torchfim._settings_digest.function_settings`); ``what``: the public function, for the messages."""
    place = process_place(across_processes)
    if place is None:
        return None
    if isinstance(mask, Tensor):
        raise TorchfimError("across_processes=True takes the mask as a function of a mini-batch or the key of a dict "
                            "batch (each process computes on some of its rows), not one tensor for the whole data set")
    return RowShare(*place, (*call, function_settings(mask), function_settings(output)), what)
