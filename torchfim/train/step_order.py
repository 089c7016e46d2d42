"""The order of the steps a :class:`~torchfim.train.FisherTraceMonitor` measures at.

A monitor's records form one curve of ``Tr(F)`` against the training step, so each step is measured once and
the steps go forward. Loops break that without an error: one that calls ``mon.step(step)`` once per micro-batch
under gradient accumulation (the same step ``k`` times: ``k`` times the measuring cost and ``k`` rows for one
step), one whose step counter does not advance (full-batch training passing the batch index, always 0), and
one whose counter starts over (the batch index within an epoch, or a resumed run whose monitor did not load
its state). :class:`StepOrder` answers a second call at the last measured step with that step's record where the
parameters are the same tensors and have not moved since (their
:class:`~torchfim.train.parameter_stamp.Stamp`), measures again where they have, and names each of these, once per
monitor, with the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from torch import Tensor

from ..errors import warn_user
from .parameter_stamp import Stamp, stamp

REPEATED = ("torchfim: FisherTraceMonitor.step({step}) was called again at its last measured step, with the "
            "parameters unmoved, so it returns that record instead of measuring again: one record per optimiser "
            "step, as under gradient accumulation with a call per micro-batch (a call after the optimiser step "
            "alone says nothing)")
STALLED = ("torchfim: FisherTraceMonitor.step({step}) was called again at its last measured step after the parameters "
           "moved (or were made under torch.inference_mode(), which keeps no record of moves), so it measures again "
           "under the same step; pass a counter that advances with each optimiser step (epoch * len(loader) + i, "
           "not the batch index)")
BACKWARDS = ("torchfim: FisherTraceMonitor measures at step {step} after step {last}: its records are a curve against "
             "the training step; pass a counter that goes on over epochs (epoch * len(loader) + i), and load the "
             "monitor's state_dict when a run resumes")


class _Record(Protocol):
    step: int


class StepOrder:
    """What a monitor's record history and the parameters' stamp say about the next step (each warning once)."""

    def __init__(self) -> None:
        self._named: set[str] = set()
        self._stamp: Stamp | None = None  # at the last measurement

    def repeated(self, step: int, history: Sequence[_Record], params: Iterable[Tensor]) -> _Record | None:
        """The last record, where it was taken at ``step`` and the parameters have not moved since; else None."""
        if not history or history[-1].step != step:
            return None
        if self._stamp is not None and self._stamp.matches(params):
            self._name("repeated", REPEATED.format(step=step))
            return history[-1]
        self._name("stalled", STALLED.format(step=step))
        return None

    def measuring(self, step: int, history: Sequence[_Record], params: Iterable[Tensor]) -> None:
        """Note a measurement at ``step``: the parameters' stamp, and a step before the last record's named."""
        if history and step < history[-1].step:
            self._name("backwards", BACKWARDS.format(step=step, last=history[-1].step))
        self._stamp = stamp(params)

    def _name(self, kind: str, message: str) -> None:
        if kind not in self._named:
            self._named.add(kind)
            warn_user(message)
