"""Regions of a forward run without autograd, held constant by forward-mode derivatives as well.

A forward that computes part of its output inside ``torch.no_grad()`` (a frozen encoder, a statistic
used as a constant), ``torch.set_grad_enabled(False)`` or ``torch.inference_mode()`` makes that part a
constant for reverse mode: autograd records nothing there, so the parameters used only there get zero
gradients, and a zero Fisher (the engine says so, :data:`.coverage.DETACHED`). Forward mode does not
follow grad mode: ``torch.func.jvp`` carries tangents through such a region. The engine's second
derivatives go through forward mode (``jvp`` of ``jvp``, ``jvp`` of ``grad``), so the Hessian estimator
Î2 saw a function other than the first-order quantities did: on a frozen encoder under ``torch.no_grad()``
its diagonal was nonzero where the exact Fisher and Î1 were zero, so Î2 was no longer an unbiased estimate
of the Fisher it stands beside.

Within :func:`constant_grad_free_regions` every grad-mode region that the thread's forward enters turns
forward-mode derivatives off (``torch.no_grad``, ``torch.set_grad_enabled(False)`` and
``torch.inference_mode()``, entered as a context or as a decorator) or back on (``torch.enable_grad`` or
``torch.set_grad_enabled(True)`` inside one), as it turns autograd off or on, and sets them back as it ends;
``torch.set_grad_enabled(False)`` called as a plain function, with no region to end, is not seen. Regions torchfim itself enters
around a forward are outside the block, and other threads keep torch's own behaviour.
"""

from __future__ import annotations

import contextlib

import torch

from .plain_forwards import ThreadMode

__all__ = ["constant_grad_free_regions"]

_SAVED = "_torchfim_forward_grad"
_REGIONS = (torch.no_grad, torch.enable_grad, torch.set_grad_enabled, torch.inference_mode)


def _sets_autograd(region: object) -> bool | None:
    """Whether ``region`` turns autograd on or off; None where it leaves it (``inference_mode(False)``)."""
    if isinstance(region, torch.no_grad):
        return False
    if isinstance(region, torch.enable_grad):
        return True
    if isinstance(region, torch.set_grad_enabled):
        return bool(region.mode)
    return False if region.mode else None  # inference_mode


def _entering(owner: type) -> object:
    """Stands in for entering a region of ``owner``: in a thread of the mode, forward-mode derivatives follow
    autograd where the region turns it on or off, the previous setting kept on the instance."""

    def enter(self: object) -> object:
        result = _CONSTANT.torchs(owner, "__enter__")(self)
        mode = _sets_autograd(self) if _CONSTANT.active() else None
        if mode is not None:
            self.__dict__.setdefault(_SAVED, []).append(torch._C._is_fwd_grad_enabled())
            torch._C._set_fwd_grad_enabled(mode)
        return result

    return enter


def _leaving(owner: type) -> object:
    """Stands in for leaving a region of ``owner``: the forward-mode setting from before it is set back."""

    def leave(self: object, *exc: object) -> object:
        saved = self.__dict__.get(_SAVED)
        result = _CONSTANT.torchs(owner, "__exit__")(self, *exc)
        if saved:
            torch._C._set_fwd_grad_enabled(saved.pop())
        return result

    return leave


_CONSTANT = ThreadMode([(owner, name, make(owner)) for owner in _REGIONS
                        for name, make in (("__enter__", _entering), ("__exit__", _leaving))])


def constant_grad_free_regions() -> contextlib.AbstractContextManager[None]:
    """Within the block, the regions without autograd that this thread enters hold forward-mode derivatives
    off too (see the module docstring).

    Example:
        >>> import torch
        >>> def f(x):
        ...     with torch.no_grad():
        ...         scale = x.sum()
        ...     return x * scale
        >>> x, t = torch.ones(2), torch.tensor([1.0, 0.0])
        >>> torch.func.jvp(f, (x,), (t,))[1].tolist()  # through the region: 2 + 1
        [3.0, 1.0]
        >>> with constant_grad_free_regions():
        ...     torch.func.jvp(f, (x,), (t,))[1].tolist()  # the region a constant, as for autograd
        [2.0, 0.0]
    """
    return _CONSTANT.block()
