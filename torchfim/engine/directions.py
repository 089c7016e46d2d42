"""Sweeps over parameter directions for second derivatives: chunks sized by memory, watched.

Output-Hessian diagonals and Hessian columns are computed by forward-mode AD along unit directions
``e_p`` of the parameters, a chunk of directions at a time (``vmap`` over them). Every direction
carries the whole batch's activations through the forward, so a chunk holds about
``FOOTPRINT · m · (P + B·A)`` numbers for ``m`` directions, ``P`` parameters, ``B`` inputs and ``A``
numbers produced by the forward of one input (measured once per model and input shape). Chunks
are sized to keep that under :data:`DIRECTION_ELEMENTS`: beyond it the pass no longer fits in
memory on a convolutional network (the old sizing, blind to activations, asked 30-70 GB on the
benchmark ResNet), and smaller chunks are also faster per direction (fresh allocations cost page
faults).

A sweep projected past :data:`LONG_SWEEP_S` at the pace of its second chunk (the first pays
one-time costs) warns once per call with its estimate, and ``progress=True`` shows a bar over the
directions: parameters without a factorisation by unit (convolutions, normalisation layers) need
one pass per parameter entry.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .._progress import ProgressBar
from ..errors import warn_user
from .batch import Batch
from .view import ModelView

#: Numbers one chunk of directions may hold (estimated as in the module docstring).
DIRECTION_ELEMENTS = 2**25
#: Numbers a forward-mode pass holds per direction, per parameter and per number of the forward's
#: outputs. Measured peak memory per direction and input, in units of ``A``: 1.2-1.4 (ResNet of the
#: benchmarks), 3.0-3.7 (tanh CNN), 2.7-3.4 (tanh MLP, where parameter-sized tangents weigh more).
FOOTPRINT = 4
#: Most directions in one chunk (where models are tiny).
MOST_DIRECTIONS = 256
#: Seconds a sweep may be projected to take before it warns with its estimate.
LONG_SWEEP_S = 60.0
#: Per user model and input signature (Batch.signature): numbers its forward produces per input.
_FORWARD_NUMBERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _CountOutputs(TorchFunctionMode):
    """Counts the numbers that torch functions called during a forward return."""

    def __init__(self) -> None:
        super().__init__()
        self.numbers = 0

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, Tensor):
                self.numbers += t.numel()
        return out


def forward_numbers(view: ModelView, batch: Batch) -> float:
    """Numbers the model's forward produces per input (every torch function's outputs, summed), from
    a forward of at most two inputs, once per model and input shape; 0 where that forward fails
    (the computation that follows raises its own error)."""
    known = _FORWARD_NUMBERS.setdefault(view.user_model, {})
    key = batch.signature()
    if key not in known:
        rows = min(2, batch.size)
        probe, counter = batch.rows(slice(0, rows)), _CountOutputs()
        try:
            with torch.no_grad(), counter:
                probe.call(view.model)
        except Exception:  # noqa: BLE001 - the computation itself raises it, with its own message
            return 0.0
        known[key] = counter.numbers / rows
    return known[key]


def direction_chunk(view: ModelView, batch: Batch, extra: int = 0) -> int:
    """Directions per chunk: ``DIRECTION_ELEMENTS / (FOOTPRINT · (P + B·A) + extra)``, between 1 and
    :data:`MOST_DIRECTIONS` (``extra``: numbers of the result per direction, where it is large)."""
    per_direction = FOOTPRINT * (view.layout.num_params + batch.size * forward_numbers(view, batch)) + extra
    return max(1, min(MOST_DIRECTIONS, int(DIRECTION_ELEMENTS // per_direction)))


class DirectionSweep:
    """Chunks of flat parameter indices, span by span, with a bar and a long-sweep warning.

    One instance serves one public call: it warns at most once.
    """

    def __init__(self, view: ModelView, progress: bool = False) -> None:
        self.view = view
        self.progress = progress
        self.warned = False

    def chunks(self, batch: Batch, spans: list[tuple[int | None, slice]], what: str,
               extra: int = 0) -> Iterator[tuple[int | None, slice, Tensor]]:
        """``(key, span, flat indices)`` covering every index of each ``(key, span)``; a key is a
        parameter index, or None for a span over several parameters. ``extra`` as in
        :func:`direction_chunk`."""
        step = direction_chunk(self.view, batch, extra)
        total = sum(span.stop - span.start for _, span in spans)
        chunk = 0
        with ProgressBar(total=total, desc=what, unit="param", leave=False, disable=not self.progress or not total) as bar:
            for key, span in spans:
                for first in range(span.start, span.stop, step):
                    columns = torch.arange(first, min(span.stop, first + step), device=self.view.layout.device)
                    yield key, span, columns
                    bar.update(len(columns))
                    chunk += 1
                    if chunk == 1:  # the first chunk pays one-time costs (kernels compiled, memory mapped)
                        start = time.perf_counter()
                    elif chunk == 2:
                        pace = (time.perf_counter() - start) / len(columns)
                        self._warn_if_long(what, spans, batch, total, pace)

    def _warn_if_long(self, what: str, spans: list[tuple[int | None, slice]], batch: Batch, total: int,
                      seconds: float) -> None:
        projected = seconds * total
        if self.warned or projected <= LONG_SWEEP_S:
            return
        self.warned = True
        names = [self.view.layout.names[k] if k is not None else "all parameters" for k, _ in spans]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        warn_user(
            f"{what}: {total} parameter entries ({shown}) need one forward-mode pass each over {batch.size} "
            f"inputs; at the pace of its second chunk this mini-batch alone takes about {_duration(projected)}. "
            "Only what involves Î2 (the Hessian estimator, its variances and bounds, its covariance with Î1, the "
            "combined estimator) needs this sweep: the score estimator and its variances need first derivatives "
            f"only{'' if self.progress else '; pass progress=True to watch the sweep'}. "
            "Parameters the outputs depend on piecewise linearly (ReLU, pooling, BatchNorm in eval mode, residual "
            "sums) are skipped already; a smooth activation (tanh, GELU) or a normalisation of activations after a "
            "parameter keeps it in the sweep."
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
