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
  False, so every forward takes the path with autograd. torch 2.2 has no such switch: there the layers' question
  whether an argument overrides torch's functions (``torch.overrides.has_torch_function``) answers True, which
  sends them down the same path, and the encoder's whether its padding is left-aligned (asked first, of an operation
  vmap cannot batch) answers False. :func:`attention_fast_path_off` does this alone, for
  the penalty's forwards, which are the training step's otherwise.

Within :func:`function_forwards` all three hold for the forwards this thread runs; regions and hooks that torchfim
itself enters around a forward are outside the block, and other threads keep torch's own behaviour.
"""

from __future__ import annotations

import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .plain_forwards import ThreadMode

__all__ = ["attention_fast_path_off", "function_forwards", "torchs_fast_path"]

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


def _no_fast_path() -> bool:
    """Whether this thread is in the mode or in :func:`attention_fast_path_off`, and not in :func:`torchs_fast_path`."""
    if getattr(_FAST_PATH_OFF, "torchs", False):
        return False
    return _FUNCTION.active() or getattr(_FAST_PATH_OFF, "depth", 0) > 0


def _fastpath_enabled() -> bool:
    """Stands in for ``torch.backends.mha.get_fastpath_enabled``: in a thread of the mode or of
    :func:`attention_fast_path_off`, False. TorchScript compiles only the last line, as torch's own does (a layer
    scripted in another thread while the stand-in is installed)."""
    if not torch.jit.is_scripting():
        if _no_fast_path():
            return False
        return _FUNCTION.torchs(torch.backends.mha, "get_fastpath_enabled")()
    return True


#: The modules whose layers ask :func:`torch.overrides.has_torch_function` before their fast path (torch 2.2).
_FAST_PATH_CALLERS = ("torch.nn.modules.activation", "torch.nn.modules.transformer")


def _has_torch_function(args: Any) -> bool:
    """Stands in for ``torch.overrides.has_torch_function`` on a torch without ``torch.backends.mha``: asked by an
    attention or transformer layer in a thread of the mode or of :func:`attention_fast_path_off`, True (the layer
    then takes the path with autograd); torch's own answer otherwise. TorchScript compiles only the last line (torch's
    own is False there)."""
    if not torch.jit.is_scripting():
        if _no_fast_path() and sys._getframe(1).f_globals.get("__name__") in _FAST_PATH_CALLERS:
            return True
        return _FUNCTION.torchs(torch.overrides, "has_torch_function")(args)
    return False


def _left_aligned(src: Tensor, observed: Tensor) -> bool:
    """Stands in for ``torch._nested_tensor_from_mask_left_aligned`` on a torch without ``torch.backends.mha``
    (only ``nn.TransformerEncoder`` asks it, before the question above, unless built with ``mask_check=False``): in a
    thread of the mode or of :func:`attention_fast_path_off`, False, so that vmap never meets the operation, which it
    cannot batch. TorchScript compiles only the last line, torch's operation itself."""
    if not torch.jit.is_scripting():
        if _no_fast_path():
            return False
        return _FUNCTION.torchs(torch, "_nested_tensor_from_mask_left_aligned")(src, observed)
    return torch.ops.aten._nested_tensor_from_mask_left_aligned(src, observed)


try:
    import torch.backends.mha

    _FAST_PATH_SWITCHES = [(torch.backends.mha, "get_fastpath_enabled", _fastpath_enabled)]
except ImportError:  # torch 2.2
    _FAST_PATH_SWITCHES = [(torch.overrides, "has_torch_function", _has_torch_function),
                           (torch, "_nested_tensor_from_mask_left_aligned", _left_aligned)]

_FUNCTION = ThreadMode([*((owner, name, make(owner)) for owner in _REGIONS
                          for name, make in (("__enter__", _entering), ("__exit__", _leaving))),
                        (torch.Tensor, "register_hook", _register_hook), *_FAST_PATH_SWITCHES])


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
def torchs_fast_path() -> Iterator[None]:
    """Within the block, this thread's attention and transformer layers take their fast path where torch would, even
    in the mode: a forward of the model as it runs outside torchfim, to compare with."""
    before = getattr(_FAST_PATH_OFF, "torchs", False)
    _FAST_PATH_OFF.torchs = True
    try:
        yield
    finally:
        _FAST_PATH_OFF.torchs = before


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
