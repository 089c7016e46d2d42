"""Whether a model's parameters may have moved since a moment, without reading their values.

A stamp is the number of optimiser steps taken in the process so far (counted by a global post-step hook of
``torch.optim``, registered on the first stamp: every optimiser's ``step()``, fused ones included, whose in-place
kernels leave the tensors' version counters as they were) and the parameters' version counters (any in-place
write through autograd's view of them, an L-BFGS line search's, a hand-written ``p -= lr * p.grad``). Two equal
stamps mean the parameters did not move between them, except by writes to ``p.data``, which neither sees.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

_LOCK = threading.Lock()
_STEPS = [0]  # optimiser steps taken in the process since the hook was registered
_HOOKED: list[object] = []


def _count_step(optimizer: object, args: object, kwargs: object) -> None:
    with _LOCK:
        _STEPS[0] += 1


def stamp(params: Iterable[Tensor]) -> tuple[int, tuple[int, ...]]:
    """The optimiser steps taken so far and the version counters of ``params``: equal stamps, unmoved parameters."""
    if not _HOOKED:
        with _LOCK:
            if not _HOOKED:
                _HOOKED.append(register_optimizer_step_post_hook(_count_step))
    return _STEPS[0], tuple(p._version for p in params)
