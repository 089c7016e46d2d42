"""Groups of a mini-batch's rows, recorded one at a time where many vectors are pulled back.

A pull-back of ``m`` output vectors holds ``m`` times what one vector's records (its taps) for every
row of the recording. Past a few tens of millions of numbers it no longer stays in the processor's
cache, and memory grows with the batch; the per-module backend then records the batch in groups of
rows, each a mini-batch of its own, sized from a forward of two samples (once per model and sample
shape). The exact Fisher sizes them by one vector's taps (its vectors go back in groups of their own);
the closed forms, which pull back all ``C`` output numbers of each input together, by ``C·(C + taps)``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable

from torch import nn

from .batch import Batch
from .recording import ModuleRecording

__all__ = ["ROW_GROUP_ELEMENTS", "WHOLE_GROUP_ELEMENTS", "groups_of_rows"]

#: Numbers one vector's pull-back may record (the taps of all calls) in one group. Measured on the
#: benchmark models (exact diagonal, paired with the whole batch): the ResNet's 128 images (38 M per
#: vector) in 3 groups took 0.84 of the time, the transformer's 256 sequences (24 M) in 2 groups 0.98;
#: budgets of 2²², 2²³ and 2²⁵ gave 0.89, 0.83 and 0.89 on the ResNet.
ROW_GROUP_ELEMENTS = 2**24
#: Numbers a group's pull-back of all output numbers may hold, ``C·(C + taps)`` per input. Measured with
#: ``fisher_variance(estimator="score", structure="diag")`` against groups sized by ROW_GROUP_ELEMENTS
#: alone: the benchmark ResNet (C = 10) 2.1 s against 3.3, the transformer on 64 sequences 1.5 s against
#: 1.7, a BERT token classifier on 32 sequences of 128 tokens with 10 labels (C = 1,280) 32 s and 1.3 GB
#: against 59 s and 13.7 GB.
WHOLE_GROUP_ELEMENTS = 2**24
#: Per user model and sample signature (Batch.signature): its taps' and its outputs' numbers per sample.
_PER_SAMPLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def groups_of_rows(batch: Batch, model: nn.Module, record: Callable[[Batch], ModuleRecording],
                   whole: bool = False) -> list[slice]:
    """Consecutive groups of ``batch``'s rows of (nearly) equal size, within the budget (``whole``: for
    pull-backs of all output numbers of each input); ``record`` makes the two-sample probe's recording."""
    probe = per_sample(batch, model, record)
    if probe is None:
        return [slice(0, batch.size)]
    taps, width = probe
    numbers, budget = (width * (width + taps), WHOLE_GROUP_ELEMENTS) if whole else (taps, ROW_GROUP_ELEMENTS)
    groups = math.ceil(batch.size * numbers / budget)
    if groups <= 1:
        return [slice(0, batch.size)]
    step = math.ceil(batch.size / groups)
    return [slice(start, min(batch.size, start + step)) for start in range(0, batch.size, step)]


def per_sample(batch: Batch, model: nn.Module, record: Callable[[Batch], ModuleRecording]) -> tuple[float, int] | None:
    """``(taps, outputs)``: numbers one vector's pull-back records per sample, and output numbers per
    sample, from a recording of two samples (once per model and sample shape); None where it fails."""
    known = _PER_SAMPLE.setdefault(model, {})
    key = batch.signature()
    if key not in known:
        rows = min(2, batch.size)
        try:
            probe = record(batch.rows(slice(0, rows)))
        except Exception:  # noqa: BLE001 - the whole batch's recording, next, raises it with its own message
            return None
        known[key] = (probe.tap_elements / rows, probe.output.shape[1])
    return known[key]
