"""Which call of :class:`~torchfim.train.FisherPenalty` computes the penalty, reuses the kept gradient, or adds 0.

A call at a step ``step % every == 0`` computes it. Between computed steps, with ``reuse_between=True``, a call
reuses the gradient kept from the last computed step, as long as it still fits the model: where the model's
trainable parameters are no longer the tensors it was kept for (a layer replaced, a parameter frozen or unfrozen
since), reusing it would send it to tensors the optimiser no longer trains and leave the new ones without a
penalty, so the penalty is computed afresh at that step instead, with a warning. A run whose step numbers keep
missing the multiples of ``every`` (a counter of other units, or odd numbers with ``every=2``) is named once, since
its penalty would otherwise never be computed.
"""

from __future__ import annotations

from torch import nn

from .._words import counted
from ..errors import warn_user
from .kept_gradient import KeptGradient

COMPUTE, REUSE, ZERO = "compute", "reuse", "zero"


class Schedule:
    """The decision of each call (:meth:`decide`), and the steps called since the last computed one."""

    def __init__(self, every: int, reuse_between: bool) -> None:
        self.every, self.reuse_between = every, reuse_between
        self.off: set[int] = set()  # step numbers called since the last computed step, none a multiple of every
        self.named_missing = self.named_outgrown = self.named_small = False
        self.largest = 0  # the most inputs a training call computed the penalty on

    def decide(self, step: int, kept: KeptGradient, model: nn.Module, last_step: int | None) -> str:
        """``COMPUTE``, ``REUSE`` or ``ZERO`` for a call at ``step`` with the kept gradient ``kept`` (``last_step``:
        the last computed step, None before any)."""
        if step % self.every == 0:
            return COMPUTE
        self._note_off(step, last_step)
        if not self.reuse_between or kept.grads is None:
            return ZERO
        if _fits(kept, model):
            return REUSE
        if not self.named_outgrown:
            self.named_outgrown = True
            warn_user(
                f"torchfim: FisherPenalty's kept gradient (from step {kept.step}) is of parameters the model no longer "
                "trains as it did (a layer replaced, or a parameter frozen or unfrozen since): reused, it would miss "
                f"the new ones; the penalty is computed afresh at step {step}, and so on such steps from now on")
        return COMPUTE

    def computed(self, inputs: int | None = None) -> None:
        """A call computed the penalty, on ``inputs`` inputs (None: not a training call, not counted)."""
        self.off.clear()
        if inputs is None or self.every == 1 or not self.reuse_between:
            return
        if inputs * 2 <= self.largest and not self.named_small:
            self.named_small = True
            warn_user(
                f"torchfim: FisherPenalty(every={self.every}) computed its gradient on a mini-batch of "
                f"{counted(inputs, 'input')} (against {self.largest} before) and reuses it for the next "
                f"{counted(self.every - 1, 'step')}; the penalty "
                f"α‖g_B‖² is about α·Tr(F)/B, so its gradient is about {self.largest / inputs:.0f}× a whole "
                "batch's: drop the last incomplete mini-batch (DataLoader(..., drop_last=True)), or pass every=1")
        self.largest = max(self.largest, inputs)

    def _note_off(self, step: int, last_step: int | None) -> None:
        if len(self.off) > 2 * self.every or self.named_missing:
            return
        self.off.add(step)
        if len(self.off) > 2 * self.every:
            self.named_missing = True
            since = "since the run started" if last_step is None else f"since step {last_step}"
            warn_user(
                f"torchfim: FisherPenalty(every={self.every}) was called at {len(self.off)} step numbers {since}, none "
                f"a multiple of {self.every}, so the penalty was not computed at any of them; pass step= the "
                "optimiser's step counter (0, 1, 2, …), or every=1")


def _fits(kept: KeptGradient, model: nn.Module) -> bool:
    """Whether the kept gradient's parameters are still the model's trainable ones, the same tensors in order."""
    now = [p for p in model.parameters() if p.requires_grad]
    return len(now) == len(kept.params) and all(a is b for a, b in zip(now, kept.params))
