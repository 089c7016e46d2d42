"""Whether a model's parameters may have moved since a moment, without reading their values.

A :class:`Stamp` holds the parameters themselves (weakly), their version counters (any in-place write through
autograd's view of them: an L-BFGS line search's, a hand-written ``p -= lr * p.grad``) and the number of optimiser
steps taken on them. The steps are counted per parameter by a global post-step hook of ``torch.optim``, registered
on the first stamp: every optimiser's ``step()``, fused ones included, whose in-place kernels leave the version
counters as they were (a loop over the optimiser's parameters, about 0.3 µs each). An optimiser of other
parameters (another model trained in another thread) does not count. Two stamps match when the parameters are the
same tensors and none of this moved; writes to ``p.data`` are seen by neither. torch 2.2's dynamo, once it has
compiled something, strips the hooks' wrapper from every optimiser's step, so there a fused optimiser's step is not
seen.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import register_optimizer_step_post_hook

from ..engine.derivative_settings import made_in_inference_mode

_LOCK = threading.Lock()
#: id of a parameter → (a weak reference to it, the optimiser steps taken on it since the hook). Keyed by id, not by
#: the tensor: a dict compares colliding keys with ``==``, which is elementwise for tensors.
_STEPS: dict[int, tuple[weakref.ref, int]] = {}
_HOOKED: list[object] = []


def _forget(key: int) -> Callable[[weakref.ref], None]:
    return lambda ref: _STEPS.pop(key, None) if _STEPS.get(key, (None,))[0] is ref else None


def _count_step(optimizer: Optimizer, args: object, kwargs: object) -> None:
    with _LOCK:
        for group in optimizer.param_groups:
            for p in group["params"]:
                ref, n = _STEPS.get(id(p), (None, 0))
                if ref is None or ref() is not p:
                    ref, n = weakref.ref(p, _forget(id(p))), 0
                _STEPS[id(p)] = ref, n + 1


def _optimiser_steps(params: list[Tensor]) -> int:
    """The optimiser steps taken on ``params``, summed."""
    with _LOCK:
        entries = [_STEPS.get(id(p), (None, 0)) for p in params]
    return sum(n for (ref, n), p in zip(entries, params) if ref is not None and ref() is p)


@dataclass(frozen=True)
class Stamp:
    """The parameters (weakly), their version counters and the optimiser steps taken on them, at one moment.
    A tensor made under ``torch.inference_mode()`` has no version counter (None): it may have moved inside
    inference mode, so a stamp that holds one is the same as no other."""

    tensors: tuple[weakref.ref, ...]
    versions: tuple[int | None, ...]
    steps: int

    def same_as(self, now: Stamp) -> bool:
        """Whether the stamp ``now`` is of the same tensors as this one, unmoved since (but for writes to ``p.data``).
        Compared by identity: ``==`` on weak references compares the tensors, elementwise."""
        return (len(now.tensors) == len(self.tensors) and all(a() is b() for a, b in zip(self.tensors, now.tensors))
                and None not in self.versions and now.versions == self.versions and now.steps == self.steps)

    def matches(self, params: Iterable[Tensor]) -> bool:
        """Whether ``params`` are the same tensors as then, unmoved since."""
        return self.same_as(stamp(params))


def stamp(params: Iterable[Tensor]) -> Stamp:
    """The :class:`Stamp` of ``params`` now."""
    if not _HOOKED:
        with _LOCK:
            if not _HOOKED:
                _HOOKED.append(register_optimizer_step_post_hook(_count_step))
    params = list(params)
    return Stamp(tuple(weakref.ref(p) for p in params), tuple(None if made_in_inference_mode(p) else p._version for p in params),
                 _optimiser_steps(params))
