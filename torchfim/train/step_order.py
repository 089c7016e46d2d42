"""The order of the steps a :class:`~torchfim.train.FisherTraceMonitor` measures at.

A monitor's records form one curve of ``Tr(F)`` against the training step, so each step is measured once and
the steps go forward. Two loops break that without an error: one that calls ``mon.step(step)`` once per
micro-batch under gradient accumulation (the same step ``k`` times: ``k`` times the measuring cost and ``k``
rows for one step), and one that passes a step counter that starts over (the batch index within an epoch, or a
resumed run whose monitor did not load its state). :class:`StepOrder` answers a second call at the last
measured step with that step's record, and names a step that goes back, once per monitor, with the fix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..errors import warn_user

REPEATED = ("torchfim: FisherTraceMonitor.step({step}) was called again at its last measured step, so it returns "
            "that record instead of measuring again (once per optimiser step; under gradient accumulation call "
            "it after the optimiser step, not once per micro-batch)")
BACKWARDS = ("torchfim: FisherTraceMonitor measures at step {step} after step {last}: its records are a curve against "
             "the training step; pass a counter that goes on over epochs (epoch * len(loader) + i), and load the "
             "monitor's state_dict when a run resumes")


class _Record(Protocol):
    step: int


class StepOrder:
    """What a monitor's record history says about the next step (each warning once)."""

    def __init__(self) -> None:
        self._named: set[str] = set()

    def repeated(self, step: int, history: Sequence[_Record]) -> _Record | None:
        """The last record, where it was taken at ``step`` (a second call at that step); else None."""
        if history and history[-1].step == step:
            self._name("repeated", REPEATED.format(step=step))
            return history[-1]
        return None

    def check(self, step: int, history: Sequence[_Record]) -> None:
        """Name a measurement at a step before the last record's."""
        if history and step < history[-1].step:
            self._name("backwards", BACKWARDS.format(step=step, last=history[-1].step))

    def _name(self, kind: str, message: str) -> None:
        if kind not in self._named:
            self._named.add(kind)
            warn_user(message)
