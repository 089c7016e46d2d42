"""Forwards in the model's dtype: a forward's own ``torch.autocast`` regions switched off, or observed.

A forward may turn ``torch.autocast`` on for a region of its own. torchfim computes in the model's
dtype (:func:`.view.engine_session` switches the caller's autocast off), and a region in half precision
would both round the Fisher to it and trip the engine's checks of its rules against autograd (their
per-sample gradients would differ by that rounding), sending every layer to a slow generic loop. Within
:func:`native_dtype_forwards` an autocast region that would turn autocast on runs with it off (one that
turns it off, as Hugging Face's rotary embeddings do, runs as it is).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.amp.autocast_mode import autocast

from .plain_forwards import ThreadMode

__all__ = ["autocast_dtype", "autocast_dtypes", "autocast_enabled", "autocast_observed", "native_dtype_forwards",
           "observe_precision"]


def _enter_autocast(self: autocast) -> autocast:
    """Stands in for entering an autocast region: in a thread of the mode, one that would turn autocast on
    enters with it off (torch's own entry and exit, so the nesting and the cache stay torch's). The
    instance's flag is off for the length of torch's entry only: another thread entering the same
    instance (a decorated forward) at that instant would enter with autocast off too. A thread observing
    (:func:`autocast_observed`) notes the precision of a region that turns autocast on."""
    enter = _NATIVE.torchs(autocast, "__enter__")
    seen = getattr(_OBSERVING, "seen", None)
    if seen is not None and self._enabled:
        seen.add((str(self.device), self.fast_dtype))
    if not (self._enabled and _NATIVE.active()):
        return enter(self)
    self._enabled = False
    try:
        return enter(self)
    finally:
        self._enabled = True


#: The entry of ``torch.autocast`` (``torch.cpu.amp.autocast`` and ``torch.cuda.amp.autocast`` call it).
_NATIVE = ThreadMode([(autocast, "__enter__", _enter_autocast)])
_OBSERVING = threading.local()  # .seen: the (device type, dtype) of the regions entered in an observing block


@contextmanager
def autocast_observed() -> Iterator[set[tuple[str, torch.dtype]]]:
    """Within the block, the autocast regions this thread enters that turn autocast on (a forward's own, such as
    the one ``accelerate``'s mixed precision wraps a model's forward in) run as torch runs them, and their
    ``(device type, dtype)`` are collected in the set yielded (read by :func:`autocast_dtypes`).

    Example:
        >>> import torch
        >>> with autocast_observed() as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        ...     out = torch.randn(2, 3) @ torch.randn(3, 3)
        >>> out.dtype, seen
        (torch.bfloat16, {('cpu', torch.bfloat16)})
    """
    outer, seen = getattr(_OBSERVING, "seen", None), set()
    _OBSERVING.seen = seen
    try:
        with _NATIVE.block(active=False):
            yield seen
    finally:
        if outer is not None:
            outer.update(seen)
        _OBSERVING.seen = outer


def observe_precision(device_type: str, dtype: torch.dtype) -> None:
    """Count ``dtype`` on ``device_type`` as a precision the passes compute in, as an autocast region entered in this
    thread's :func:`autocast_observed` block is counted (nothing outside such a block)."""
    seen = getattr(_OBSERVING, "seen", None)
    if seen is not None:
        seen.add((device_type, dtype))


def autocast_dtypes(device_type: str, ambient: bool = True) -> list[torch.dtype]:
    """The dtypes autocast computes in on ``device_type`` here: the caller's, where it is on (and ``ambient``), and
    those of the regions entered so far in this thread's :func:`autocast_observed` block."""
    caller = autocast_dtype(device_type) if ambient else None
    seen = getattr(_OBSERVING, "seen", None) or ()
    return [*([] if caller is None else [caller]), *(dtype for device, dtype in seen if device == device_type)]


def native_dtype_forwards() -> contextlib.AbstractContextManager[None]:
    """Within the block, this thread's autocast regions that would turn autocast on run with it off; other
    threads keep torch's own behaviour.

    Example:
        >>> import torch
        >>> with native_dtype_forwards(), torch.autocast("cpu", dtype=torch.bfloat16):
        ...     out = torch.randn(2, 3) @ torch.randn(3, 3)
        >>> out.dtype
        torch.float32
    """
    return _NATIVE.block()


def autocast_enabled(device_type: str) -> bool:
    """Whether ``torch.autocast`` is on for ``device_type`` ("cpu", "cuda") in this thread."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 asks per device by name
        return torch.is_autocast_cpu_enabled() if device_type == "cpu" else torch.is_autocast_enabled()


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype ``torch.autocast`` runs eligible operations in on ``device_type``, or None where it is off."""
    if not autocast_enabled(device_type):
        return None
    try:
        return torch.get_autocast_dtype(device_type)
    except AttributeError:  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()
