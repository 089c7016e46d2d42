"""The engine's forwards, as of the function whose Fisher is taken: what autograd alone would see differently
is made the same for every pass.

* Regions without autograd. A forward that computes part of its output inside ``torch.no_grad()`` (a frozen
  encoder, a statistic used as a constant), ``torch.set_grad_enabled(False)`` or ``torch.inference_mode()``
  makes that part a constant for reverse mode: the parameters used only there get zero gradients and a zero
  Fisher (the engine says so, :data:`.coverage.DETACHED`). Forward mode does not follow grad mode, and the
  engine's second derivatives go through it (``jvp`` of ``jvp``, ``jvp`` of ``grad``): the Hessian estimator
  Î2 saw another function than the first-order quantities did (a frozen encoder had nonzero Î2 entries where
  its Fisher and Î1 were zero). Here every region without autograd that the forward enters (``torch.no_grad``,
  ``torch.set_grad_enabled(False)``, ``torch.inference_mode()``, as a context or a decorator) turns
  forward-mode derivatives off, and ``torch.enable_grad`` or ``torch.set_grad_enabled(True)`` inside one turns
  them back on, until the region ends; ``torch.set_grad_enabled(False)`` called as a plain function, with no
  region to end, is not seen.
* Gradient hooks on the forward's tensors (``h.register_hook(fn)`` inside ``forward``) change or watch the
  gradients that pass through them. Like a module's backward hooks, which the engine's copy drops
  (:mod:`.derivative_settings`), they are no part of the function: one that doubled the gradient into a layer
  made reverse mode's Fisher of that layer 4 times its own, and Î2, half of which goes through forward mode,
  6.2 times; a hook that stores gradients (a saliency map's) would see every vector the engine pulls back.
  Here ``Tensor.register_hook`` registers nothing (its handle removes nothing).
* The fast path of ``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder``,
  which torch takes in eval mode without autograd, is another function than the one training differentiates:
  the encoder packs a padded batch into a nested tensor and gives its padded positions zeros, where the path
  with autograd computes them. A forward without autograd (the engine's check that samples are independent)
  then saw other outputs than the forward that was differentiated, and a transformer encoder with a padding
  mask, in eval mode, was refused as mixing samples. Here ``torch.backends.mha.get_fastpath_enabled()`` answers
  False, so every forward takes the path with autograd. :func:`attention_fast_path_off` does this alone, for
  the penalty's forwards, which are the training step's otherwise.

Within :func:`function_forwards` all three hold for the forwards this thread runs; regions and hooks that torchfim
itself enters around a forward are outside the block, and other threads keep torch's own behaviour.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.backends.mha
from torch.utils.hooks import RemovableHandle

from .plain_forwards import ThreadMode

__all__ = ["attention_fast_path_off", "function_forwards"]

_SAVED = "_torchfim_forward_grad"
_FAST_PATH_OFF = threading.local()  # depth: blocks of attention_fast_path_off this thread is in
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
    autograd where the region turns it on or off, the previous setting kept on the instance for this thread (an
    instance may be shared: a module-level ``NO_GRAD = torch.no_grad()``)."""

    def enter(self: object) -> object:
        result = _FUNCTION.torchs(owner, "__enter__")(self)
        mode = _sets_autograd(self) if _FUNCTION.active() else None
        if mode is not None:
            saved = self.__dict__.setdefault(_SAVED, {})
            saved.setdefault(threading.get_ident(), []).append(torch._C._is_fwd_grad_enabled())
            torch._C._set_fwd_grad_enabled(mode)
        return result

    return enter


def _leaving(owner: type) -> object:
    """Stands in for leaving a region of ``owner``: the forward-mode setting this thread had before it is set
    back."""

    def leave(self: object, *exc: object) -> object:
        saved = self.__dict__.get(_SAVED, {}).get(threading.get_ident())
        result = _FUNCTION.torchs(owner, "__exit__")(self, *exc)
        if saved:
            torch._C._set_fwd_grad_enabled(saved.pop())
        return result

    return leave


def _register_hook(self: torch.Tensor, hook: object) -> RemovableHandle:
    """Stands in for ``Tensor.register_hook``: in a thread of the mode, nothing registered."""
    if _FUNCTION.active():
        return RemovableHandle(OrderedDict())  # a registry of its own, empty
    return _FUNCTION.torchs(torch.Tensor, "register_hook")(self, hook)


def _fastpath_enabled() -> bool:
    """Stands in for ``torch.backends.mha.get_fastpath_enabled``: in a thread of the mode or of
    :func:`attention_fast_path_off`, False. TorchScript compiles only the last line, as torch's own does (a layer
    scripted in another thread while the stand-in is installed)."""
    if not torch.jit.is_scripting():
        if _FUNCTION.active() or getattr(_FAST_PATH_OFF, "depth", 0):
            return False
        return _FUNCTION.torchs(torch.backends.mha, "get_fastpath_enabled")()
    return True


_FUNCTION = ThreadMode([*((owner, name, make(owner)) for owner in _REGIONS
                          for name, make in (("__enter__", _entering), ("__exit__", _leaving))),
                        (torch.Tensor, "register_hook", _register_hook),
                        (torch.backends.mha, "get_fastpath_enabled", _fastpath_enabled)])


@contextmanager
def function_forwards() -> Iterator[None]:
    """Within the block, this thread's forwards are of the function whose Fisher is taken: their regions without
    autograd hold forward-mode derivatives off too, their gradient hooks are not registered, and attention takes
    no fast path (see the module docstring).

    Example:
        >>> import torch
        >>> def f(x):
        ...     with torch.no_grad():
        ...         scale = x.sum()
        ...     return x * scale
        >>> x, t = torch.ones(2), torch.tensor([1.0, 0.0])
        >>> torch.func.jvp(f, (x,), (t,))[1].tolist()  # through the region: 2 + 1
        [3.0, 1.0]
        >>> with function_forwards():
        ...     torch.func.jvp(f, (x,), (t,))[1].tolist()  # the region a constant, as for autograd
        [2.0, 0.0]
    """
    forward_mode = torch._C._is_fwd_grad_enabled()
    try:
        with _FUNCTION.block():
            yield
    finally:  # a region the forward left open (entered, never ended) ends here
        torch._C._set_fwd_grad_enabled(forward_mode)


@contextmanager
def attention_fast_path_off() -> Iterator[None]:
    """Within the block, this thread's attention and transformer layers take no fast path (the module docstring's
    third point, alone); other threads, and a ``torch.backends.mha.set_fastpath_enabled`` of the user's, keep
    theirs."""
    _FAST_PATH_OFF.depth = getattr(_FAST_PATH_OFF, "depth", 0) + 1
    try:
        with _FUNCTION.block(active=False):  # the stand-ins installed, deferring to torch's own but for this one
            yield
    finally:
        _FAST_PATH_OFF.depth -= 1
