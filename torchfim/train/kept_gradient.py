"""The penalty gradient that :class:`~torchfim.train.FisherPenalty` keeps for the steps between computed ones.

With ``every > 1`` and ``reuse_between=True`` a computed step's gradient ``c`` and value ``v`` are reused until
the next computed step. Under gradient accumulation one optimiser step runs ``k`` micro-batches, each a call
at the same step number and at the same parameters, and each computes the penalty on its own micro-batch;
the step's penalty, as the optimiser receives it, is their mean. So :meth:`KeptGradient.keep` keeps the
running mean over the calls of one step, ``c = (1/k) Σⱼ cⱼ`` and ``v = (1/k) Σⱼ vⱼ``: the last call's alone
would be the penalty of one micro-batch, with ``k`` times the variance. A call counts when its term is
back-propagated (the term's backward hands its gradient over, once: :mod:`.surrogate`), so a term never
back-propagated (a penalty logged with gradients on) is in no mean. A call at the same step number after
the parameters moved (an optimiser's closure, as L-BFGS evaluates it, or a step counter that does not advance)
starts the mean over: the parameters count as moved when a tensor is another object, or when their
:class:`~torchfim.train.parameter_stamp.Stamp` no longer matches (an optimiser's step, fused ones included, or an
in-place write).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .parameter_stamp import Stamp


@dataclass
class KeptGradient:
    """The kept gradient ``grads`` on the parameters ``params``, its value and the step that computed it.

    ``calls`` is the number of calls averaged into it; ``stamped`` the parameters' stamp then.
    Empty (``grads is None``) before a computed step.
    """

    params: list[Tensor] | None = None
    grads: list[Tensor | None] | None = None
    value: Tensor | None = None
    step: int | None = None
    calls: int = 0
    stamped: Stamp | None = None

    def keep(self, step: int, params: list[Tensor], grads: list[Tensor | None], value: Tensor, now: Stamp) -> None:
        """Keep a computed call's gradient and value, averaged with those of the earlier calls at the same
        step and parameters (``now``: the parameters' stamp when the call computed them). A gradient is None for
        a parameter the call's graph did not reach: 0 in the mean, and None while no call reached it."""
        if self.calls > 0 and step == self.step and self.stamped is not None and self.stamped.same_as(now):
            self.calls += 1
            weight = 1.0 / self.calls  # the running mean: c ← c + (cⱼ − c)/j
            grads = [_lerp(kept, new, weight) for kept, new in zip(self.grads, grads, strict=True)]
            value = self.value.lerp(value, weight)
        else:
            self.calls = 1
        self.params, self.grads, self.value, self.step, self.stamped = params, grads, value, step, now

    def restore(self, params: list[Tensor] | None, grads: list[Tensor | None] | None, value: Tensor | None,
                step: int | None) -> None:
        """Put back a saved gradient; the next call starts a new mean (a resumed run goes on at a later step)."""
        self.params, self.grads, self.value, self.step, self.calls, self.stamped = params, grads, value, step, 0, None


def _lerp(kept: Tensor | None, new: Tensor | None, weight: float) -> Tensor | None:
    """``kept + weight·(new − kept)``, a missing gradient (a parameter not reached) counting as 0."""
    if kept is None or new is None:
        return None if kept is None and new is None else new * weight if kept is None else kept * (1.0 - weight)
    return kept.lerp(new, weight)
