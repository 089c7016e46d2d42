"""The order of the steps a :class:`~torchfim.train.FisherTraceMonitor` measures at.

A monitor's records form one curve of ``Tr(F)`` against the training step, so each step is measured once and
the steps go forward. Loops break that without an error: one that calls ``mon.step(step)`` once per micro-batch
under gradient accumulation (the same step ``k`` times: ``k`` times the measuring cost and ``k`` rows for one
step), one whose step counter does not advance (full-batch training passing the batch index, always 0), and
one whose counter starts over (the batch index within an epoch, or a resumed run whose monitor did not load
its state). :class:`StepOrder` answers a second call at the last measured step with that step's record where the
parameters are the same tensors and have not moved since (their
:class:`~torchfim.train.parameter_stamp.Stamp`), measures again where they have, and names each of these, once per
monitor, with the fix. A saved state carries the parameters' :func:`~torchfim._processes.weights_fingerprint` where
they had not moved since the last measurement, so that a resumed loop's call at the restored last step returns its
record too (a stamp holds tensors, which a new process does not have).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

from torch import nn

from .._processes import same_weights, weights_fingerprint
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
TRAINABLE = ("torchfim: FisherTraceMonitor measures at step {step} over other trainable parameters than at step "
             "{last} ({changes}): Tr(F) sums over the parameters with requires_grad=True, so the records before and "
             "after are traces of different sets and the curve steps there, without the Fisher having moved")
BACKWARDS = ("torchfim: FisherTraceMonitor measures at step {step} after step {last}: its records are a curve against "
             "the training step; pass a counter that goes on over epochs (epoch * len(loader) + i), and load the "
             "monitor's state_dict when a run resumes")


class _Record(Protocol):
    step: int


class StepOrder:
    """What a monitor's record history and the stamp of ``model``'s parameters say about the next step (each warning
    once)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._named: set[str] = set()
        self._stamp: Stamp | None = None  # at the last measurement
        self._restored: float | None = None  # the weights' fingerprint at the restored last measurement
        self._trainable: tuple[str, ...] | None = None  # the names measured at the last measurement

    def repeated(self, step: int, history: Sequence[_Record]) -> _Record | None:
        """The last record, where it was taken at ``step`` and the parameters have not moved since; else None."""
        if not history or history[-1].step != step:
            return None
        if self._stamp is not None and self._stamp.matches(self.model.parameters()):
            self._name("repeated", REPEATED.format(step=step))
            return history[-1]
        now = None if self._restored is None else self._fingerprint()
        if now is not None and same_weights([self._restored, now]):
            # a resumed loop going on at its checkpoint's step, as the saved run did: not named
            self._stamp, self._restored = stamp(self.model.parameters()), None
            return history[-1]
        self._name("stalled", STALLED.format(step=step))
        return None

    def measuring(self, step: int, history: Sequence[_Record]) -> None:
        """Note a measurement at ``step``: the parameters' stamp, and a step before the last record's named."""
        if history and step < history[-1].step:
            self._name("backwards", BACKWARDS.format(step=step, last=history[-1].step))
        trainable = tuple(n for n, p in self.model.named_parameters() if p.requires_grad)
        if history and self._trainable is not None and trainable != self._trainable:
            self._name("trainable", TRAINABLE.format(step=step, last=history[-1].step,
                                                     changes=_changes(self._trainable, trainable)))
        self._stamp, self._restored, self._trainable = stamp(self.model.parameters()), None, trainable

    def state(self) -> float | None:
        """What a saved state keeps: the weights' fingerprint where they have not moved since the last measurement
        (None where they have, or nothing was measured; the restored one where nothing was measured since loading)."""
        if self._stamp is not None and self._stamp.matches(self.model.parameters()):
            return self._fingerprint()
        return self._restored

    def load(self, saved: float | None) -> None:
        """Go on from :meth:`state` (None: a state that kept none, or one saved before it was kept)."""
        self._stamp, self._restored = None, saved

    def _fingerprint(self) -> float | None:
        fingerprint = weights_fingerprint(self.model)
        return fingerprint if math.isfinite(fingerprint) else None  # NaN: one that cannot be taken matches none

    def _name(self, kind: str, message: str) -> None:
        if kind not in self._named:
            self._named.add(kind)
            warn_user(message)


def _changes(before: Sequence[str], now: Sequence[str]) -> str:
    """The parameter tensors trained now and not before, and the other way round, by name (the first of each)."""
    added, dropped = [n for n in now if n not in set(before)], [n for n in before if n not in set(now)]
    said = [f"{len(names)} {what}, such as {names[0]!r}" for names, what in ((added, "now trained"),
                                                                             (dropped, "no longer trained")) if names]
    return "; ".join(said) or "the same names in another order"
