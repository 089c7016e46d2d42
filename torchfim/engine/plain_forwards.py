"""Forwards as torchfim computes them: activations saved as plain autograd saves them (and in the model's dtype:
:mod:`.native_dtype`).

Two devices trade the memory of a forward's saved activations for time, without changing any value:

* ``torch.utils.checkpoint`` saves a region's inputs only and runs the region again during the backward
  pass, with the parameters its modules hold *then*. torch.func refuses both of its forms (a custom
  autograd function without ``setup_context``; saved-tensor hooks), a reentrant checkpoint refuses
  ``torch.autograd.grad``, and the penalty's perturbed pass, whose parameters are substituted only while
  it runs forward, would be recomputed at the unperturbed ones: a silently wrong gradient.
* Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``, the offloading of
  Hugging Face's activation checkpointing) move what autograd saves elsewhere and back; their contract is
  that the tensor unpacked equals the tensor packed. torch.func refuses them.

Within :func:`plain_forwards` every checkpointed region of the thread runs once, as a plain forward,
entering a saved-tensor hooks context does nothing, and the hooks a caller pushed before the block are set
aside until it ends: the same values, the memory of a forward without them. It holds for every
computation of the engine (:func:`.view.engine_session`) and each step of the penalty that computes it;
the user's own forwards and backwards outside, and other threads (a training loop beside a monitor), keep
both devices.

Code compiled by ``torch.compile`` (a model's ``compile()``, a compiled function its forward calls, a
compiled submodule) cannot run under torch.func's transforms, and its backward, compiled by
AOTAutograd, can be neither run again nor differentiated again (it raises inside torch, or flakily
depending on what dynamo compiled before). Within :func:`eager_compiled` all compiled code runs as the
Python it was compiled from (``torch.compiler.set_stance("force_eager")``: the same values). The stance is
the process's, not the thread's: other threads' compiled code runs eagerly too while a block is open.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.autograd import forward_ad
from torch.autograd.graph import saved_tensors_hooks

from ..errors import TorchfimError
from .derivative_settings import emptied
from .private_tree import is_compile_wrapper

__all__ = ["ThreadMode", "differentiated_forwards", "eager_compiled", "holds_compiled", "plain_forwards",
           "quiet_vmap_fallbacks"]


class ThreadMode:
    """Stand-ins for some of torch's functions, installed while any block is open (a thread in the mode, or a
    passive block that only observes); each stand-in asks :meth:`active` and defers to torch's own
    (:meth:`torchs`) in the threads outside the mode. Nested and
    concurrent blocks give torch's own back when the last one ends; what torch's own are stays known after
    (a thread that fetched a stand-in just before then still finds them)."""

    def __init__(self, stand_ins: list[tuple[object, str, object]]) -> None:
        self.stand_ins = stand_ins  # (owner, name, stand-in); a torch without one of the names keeps its own
        self.lock = threading.Lock()
        self.depths: dict[int, int] = {}  # thread id → blocks it is in
        self.held: dict[tuple[int, str], tuple[object, object]] = {}  # (id(owner), name) → (owner, torch's own)

    def active(self) -> bool:
        return threading.get_ident() in self.depths

    def torchs(self, owner: object, name: str) -> object:
        return self.held[id(owner), name][1]

    @contextmanager
    def block(self, active: bool = True) -> Iterator[None]:
        """The thread in the mode; with ``active=False`` the stand-ins are installed but the thread is not in the
        mode (they run torch's own for it, and may observe it)."""
        me = threading.get_ident() if active else None
        with self.lock:
            if not self.depths:
                for owner, name, stand_in in self.stand_ins:
                    if hasattr(owner, name):
                        self.held[id(owner), name] = owner, getattr(owner, name)
                        setattr(owner, name, stand_in)
            self.depths[me] = self.depths.get(me, 0) + 1
        try:
            yield
        finally:
            with self.lock:
                self.depths[me] -= 1
                if not self.depths[me]:
                    del self.depths[me]
                if not self.depths:
                    for (_, name), (owner, own) in self.held.items():
                        setattr(owner, name, own)


class _Reentrant:
    """Stands in for torch's reentrant checkpoint function: in a plain thread, runs the region."""

    @staticmethod
    def apply(function: Callable, preserve_rng_state: bool, *args: object) -> object:
        if _PLAIN.active():
            return function(*args)
        return _PLAIN.torchs(torch_checkpoint, "CheckpointFunction").apply(function, preserve_rng_state, *args)


def _non_reentrant(*args: object, **kwargs: object) -> Iterator[None]:
    """Stands in for torch's non-reentrant checkpoint generator: in a plain thread, nothing before or after
    the region (torch's ``checkpoint`` advances it once before the region and once after)."""
    if _PLAIN.active():
        yield
    else:
        yield from _PLAIN.torchs(torch_checkpoint, "_checkpoint_without_reentrant_generator")(*args, **kwargs)


_SKIPPED = "_torchfim_hooks_skipped"


def _enter_hooks(self: saved_tensors_hooks) -> None:
    """Stands in for entering a saved-tensor hooks context: in a plain thread, no hooks pushed."""
    if _PLAIN.active():
        self.__dict__[_SKIPPED] = True
    else:
        _PLAIN.torchs(saved_tensors_hooks, "__enter__")(self)


def _leave_hooks(self: saved_tensors_hooks, *exc: object) -> None:
    """Stands in for leaving a saved-tensor hooks context: none popped where none were pushed."""
    if not self.__dict__.pop(_SKIPPED, False):
        _PLAIN.torchs(saved_tensors_hooks, "__exit__")(self, *exc)


#: Names that ``torch.utils.checkpoint.checkpoint`` looks up in its module on each call (so callers that
#: bound ``checkpoint`` itself, as Hugging Face models do, are reached too), and the methods of the
#: saved-tensor hooks contexts (``save_on_cpu`` and torch's other subclasses inherit them).
_PLAIN = ThreadMode([
    (torch_checkpoint, "CheckpointFunction", _Reentrant),
    (torch_checkpoint, "_checkpoint_without_reentrant_generator", _non_reentrant),
    (saved_tensors_hooks, "__enter__", _enter_hooks),
    (saved_tensors_hooks, "__exit__", _leave_hooks),
])


@contextmanager
def _callers_hooks_set_aside() -> Iterator[None]:
    """This thread's saved-tensor hooks pushed before the block (a caller's ``save_on_cpu`` around a torchfim
    call), set aside within it and pushed back after, in their order. A torch without the stack's functions
    keeps them."""
    autograd = torch._C._autograd
    aside = []
    try:
        while (top := autograd._top_saved_tensors_default_hooks(False)) is not None:
            autograd._pop_saved_tensors_default_hooks()
            aside.append(top)
    except (AttributeError, TypeError):  # torch's private stack as another version has it: leave what is left
        pass
    try:
        yield
    finally:
        for pack, unpack in reversed(aside):
            autograd._push_saved_tensors_default_hooks(pack, unpack)


@contextmanager
def plain_forwards() -> Iterator[None]:
    """Within the block, this thread's checkpointed regions run as plain forwards, its saved-tensor hooks
    contexts push no hooks, and those pushed before it are set aside; other threads keep torch's own
    behaviour.

    Example:
        >>> import torch
        >>> from torch.utils.checkpoint import checkpoint
        >>> w = torch.randn(3, 3, requires_grad=True)
        >>> with plain_forwards():
        ...     out = checkpoint(torch.tanh, torch.randn(2, 3) @ w, use_reentrant=False)
        >>> type(out.grad_fn).__name__  # autograd's own node: no checkpoint in the graph
        'TanhBackward0'
    """
    with _PLAIN.block(), _callers_hooks_set_aside():
        yield


class _ProcessSwitch:
    """A setting of the process switched while any block, of any thread, is open: ``switch()`` sets it when
    the first block starts and returns how to set it back (None where it set nothing), called when the last
    block ends."""

    def __init__(self, switch: Callable[[], Callable[[], None] | None]) -> None:
        self.switch = switch
        self.lock = threading.Lock()
        self.depth = 0
        self.undo: Callable[[], None] | None = None

    @contextmanager
    def block(self) -> Iterator[None]:
        with self.lock:
            if not self.depth:
                self.undo = self.switch()
            self.depth += 1
        try:
            yield
        finally:
            with self.lock:
                self.depth -= 1
                if not self.depth and self.undo is not None:
                    self.undo()
                    self.undo = None


def _dynamo_imported() -> bool:
    """Whether torch's compiler is imported: nothing is compiled before (and importing it takes a second)."""
    return "torch._dynamo" in sys.modules


def _force_eager() -> Callable[[], None] | None:
    """``torch.compiler.set_stance("force_eager")``, and how to set the caller's stance back."""
    if not _dynamo_imported():
        return None
    try:
        stance = torch.compiler.set_stance("force_eager")
    except (AttributeError, RuntimeError):  # torch < 2.6; or called from inside a compiled region
        return None
    return lambda: stance.__exit__(None, None, None)


def _quiet_vmap_fallbacks() -> Callable[[], None] | None:
    """torch's warning off where ``vmap`` runs an operation without a batching rule one sample at a time
    ("There is a performance drop ... Please file us an issue"): torchfim's generic rules and torch.func
    paths meet such operations (Bilinear's ``_trilinear``, ``embedding_bag``) by design, and the fallback is
    exact. torch keeps no getter for the flag; it is on unless someone turned it off."""
    switch = getattr(torch._C._functorch, "_set_vmap_fallback_warning_enabled", None)
    if switch is None:
        return None
    switch(False)
    return lambda: switch(True)


def _uncached_parametrizations() -> Callable[[], None] | None:
    """torch's cache of parametrized tensors (``torch.nn.utils.parametrize.cached()``) off, and how to turn it
    back on. The cache keeps the first value of a parametrized weight for the rest of the block, while
    torchfim calls the model at other parameters (``functional_call``, the penalty's shifted pass): under the
    caller's ``cached()`` those calls read the first value (a zero Fisher from ``backend="functional"``, a
    finite-difference penalty gradient 10⁸ times too large). The cache is the process's, and a ``cached()`` block
    of another thread (a training step beside a monitor) may open or end meanwhile, so the cache keeps nothing
    (:class:`_NoCache`) and the blocks opened meanwhile cache nothing: the same values. Before, torchfim's passes
    read and wrote such a block's entries (a functional Fisher 54 % off, or "backward through the graph a second
    time"). A block that ends during one of torchfim's forwards, between torch's read of the cache and its write,
    leaves torch a fresh dict that receives a weight of torchfim's pass: that dict is emptied at the end, else the
    next block reads the weight (its parameter got no gradient). A ``cached`` bound before (``from torch.nn.utils.parametrize import cached``) is not reached."""
    from torch.nn.utils import parametrize

    held, torchs = parametrize._cache, parametrize.cached
    parametrize._cache, parametrize.cached = _NO_CACHE, _cache_nothing

    def undo() -> None:
        parametrize.cached = torchs
        if parametrize._cache is _NO_CACHE:
            parametrize._cache = held if parametrize._cache_enabled else {}
        else:  # a block ended meanwhile, and torch's fresh dict may hold a weight of torchfim's passes
            parametrize._cache = {}

    return undo


class _NoCache(dict):
    """A cache of parametrized tensors that keeps nothing (torch asks ``get`` and sets items)."""

    def __setitem__(self, key: object, value: object) -> None:
        pass


_NO_CACHE = _NoCache()


@contextmanager
def _cache_nothing() -> Iterator[None]:
    """Stands in for ``parametrize.cached`` while the cache is off (:func:`_uncached_parametrizations`)."""
    yield


def _no_global_backward_hooks() -> Callable[[], None] | None:
    """torch's global module backward hooks (``register_module_full_backward_hook`` and its pre-hook) off, and
    how to put them back. Like a module's own backward hooks, which the engine's copy and the penalty drop, they
    are no part of the function whose Fisher is taken: one that rescales gradients rescaled the exact Fisher
    (25 % off for a factor ½), and torch.func cannot transform them."""
    from torch.nn.modules import module

    registries = [r for r in (module._global_backward_hooks, module._global_backward_pre_hooks) if r]
    return emptied(registries) if registries else None


def _requires_grad_under_transforms() -> Callable[[], None] | None:
    """``Tensor.requires_grad_(True)`` a no-op where torch refuses it, on a tensor that torch.func is
    transforming, and how to put torch's method back. A forward hook that marks outputs as requiring grad, so that a
    reentrant checkpoint's backward reaches a frozen embedding's output (Hugging Face's
    ``enable_input_require_grads``, set by activation checkpointing for token models and by PEFT), has nothing
    to do in torchfim's passes, which run checkpoints plain and track what they differentiate; elsewhere the
    method is torch's."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    if wrapped is None or "requires_grad_" in torch.Tensor.__dict__:  # an older torch, or patched by someone else
        return None
    torchs = torch.Tensor.requires_grad_

    def requires_grad_(self: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
        try:
            return torchs(self, requires_grad)
        except RuntimeError as err:  # torch.func's own calls (marking what it differentiates) go through above
            if requires_grad and wrapped(self) and "functorch transform" in str(err):
                return self
            raise

    torch.Tensor.requires_grad_ = requires_grad_

    def undo() -> None:
        del torch.Tensor.requires_grad_

    return undo


_EAGER = _ProcessSwitch(_force_eager)
_QUIET = _ProcessSwitch(_quiet_vmap_fallbacks)
_UNCACHED = _ProcessSwitch(_uncached_parametrizations)
_UNHOOKED = _ProcessSwitch(_no_global_backward_hooks)
_TRACKED = _ProcessSwitch(_requires_grad_under_transforms)


def _eager_call(self: nn.Module, *args: object, **kwargs: object) -> object:
    """Stands in for ``nn.Module.__call__`` where torch has no ``set_stance`` (< 2.6): in a thread of the mode, a
    module compiled in place (its ``compile()``) runs its Python forward, and ``torch.compile``'s wrapper the module
    it wraps where calling that module is all the wrapper does (:func:`_bare_compile_wrapper`); elsewhere torch's own
    call."""
    if _EAGER_CALLS.active():
        if _bare_compile_wrapper(self):
            return self._orig_mod(*args, **kwargs)
        if self.__dict__.get("_compiled_call_impl") is not None:
            return self._call_impl(*args, **kwargs)
    return _EAGER_CALLS.torchs(nn.Module, "__call__")(self, *args, **kwargs)


def _bare_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper, compiling (not one that ``torch._dynamo.disable`` made, as
    dynamo wraps its own graphs), with no hooks of its own (forward or backward) and no global forward hooks: then
    calling the module it wraps computes what calling it would, uncompiled. A wrapper with hooks keeps torch's call."""
    if not is_compile_wrapper(module) or type(module.__dict__.get("dynamo_ctx")).__name__ == "DisableContext":
        return False
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks,
             nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    return not any(hooks)


_EAGER_CALLS = ThreadMode([(nn.Module, "__call__", _eager_call)])


def eager_compiled() -> contextlib.AbstractContextManager[None]:
    """Within the block, code compiled by ``torch.compile`` runs eagerly, in every thread (see above). A torch
    without ``torch.compiler.set_stance`` (< 2.6) runs the modules compiled in place, and those wrapped by
    ``torch.compile`` without hooks on the wrapper, eagerly in this thread only; a compiled function that a forward
    calls, a wrapper with hooks and the replicas of ``DataParallel`` (its threads) stay compiled there.

    Example:
        >>> import torch
        >>> double = torch.compile(lambda t: 2 * t, backend="eager")
        >>> with eager_compiled():
        ...     out = torch.func.vmap(double)(torch.ones(3, 2))  # torch.func over compiled code
        >>> out.sum().item()
        12.0
    """
    if hasattr(torch.compiler, "set_stance"):
        return _EAGER.block()
    if not _dynamo_imported():  # no stand-in needed
        return contextlib.nullcontext()
    return _eager_module_calls()


def _eager_module_calls() -> contextlib.AbstractContextManager[None]:
    """The block of :func:`_eager_call`, whose code dynamo skips (:func:`_skipped_by_dynamo`)."""
    _skipped_by_dynamo()
    return _EAGER_CALLS.block()


@functools.cache
def _skipped_by_dynamo() -> None:
    """Mark :func:`_eager_call`'s code skipped by dynamo, once: called by the modules of a compiled graph, it would be
    traced (and compiled again for each module class). On the torches that use it (2.3-2.5) the mark adds no wrapper
    to the calls."""
    torch.compiler.disable(_eager_call, recursive=False)


def holds_compiled(model: nn.Module) -> bool:
    """Whether ``model`` or a module inside it is compiled: wrapped by ``torch.compile``, or compiled in
    place by its ``compile()`` (a compiled function that a forward calls is not seen)."""
    if not _dynamo_imported():
        return False
    return any(is_compile_wrapper(m) or m.__dict__.get("_compiled_call_impl") is not None
               for m in model.modules())


def quiet_vmap_fallbacks() -> contextlib.AbstractContextManager[None]:
    """Within the block, torch warns no more where ``vmap`` falls back to running an operation sample by
    sample (see :func:`_quiet_vmap_fallbacks`), in every thread.

    Example:
        >>> import torch
        >>> with quiet_vmap_fallbacks():
        ...     out = torch.func.vmap(torch.trace)(torch.eye(3).expand(2, 3, 3))
        >>> out.tolist()
        [3.0, 3.0]
    """
    return _QUIET.block()


FUNC_TRANSFORM = (
    "torchfim was called inside {}: it differentiates with autograd and forward-mode AD itself, and its results "
    "are constants that the caller's transform can neither differentiate nor batch (a derivative through them "
    "came out 0); call torchfim outside it and pass its result in as a constant"
)


def refuse_func_transforms() -> None:
    """Refuse a call inside a ``torch.func`` transform or a forward-mode AD level (:data:`FUNC_TRANSFORM`)."""
    if torch._C._are_functorch_transforms_active():
        raise TorchfimError(FUNC_TRANSFORM.format("a torch.func transform (grad, vjp, jvp, jacrev, vmap, ...)"))
    if forward_ad._current_level >= 0:  # torch.func.jvp cannot nest in it (torch: "Nested forward mode AD")
        raise TorchfimError(FUNC_TRANSFORM.format("a torch.autograd.forward_ad.dual_level() block"))


@contextmanager
def differentiated_forwards(transforms: bool = True) -> Iterator[None]:
    """What every computation of torchfim runs in, the engine's and the penalty's: autograd whatever mode the
    caller is in (``torch.no_grad``, ``torch.inference_mode``), plain forwards (:func:`plain_forwards`), torch's
    cache of parametrized tensors off (:func:`_uncached_parametrizations`) and its global module backward hooks
    off (:func:`_no_global_backward_hooks`). With ``transforms`` (passes that torch.func transforms), also
    torch's notices of vmap's exact fallbacks off (:func:`quiet_vmap_fallbacks`) and ``requires_grad_``
    harmless on transformed tensors (:func:`_requires_grad_under_transforms`); the last four in every thread.

    Without ``transforms`` ``torch.Tensor`` is left as it is (the penalty's batch-gradient steps, which run no
    transform): a process-wide replacement of one of its methods, every training step, reaches every thread's
    tensors while it lasts.
    """
    refuse_func_transforms()
    with torch.inference_mode(False), torch.enable_grad(), plain_forwards(), _UNCACHED.block(), \
            _UNHOOKED.block(), quiet_vmap_fallbacks() if transforms else contextlib.nullcontext(), \
            _TRACKED.block() if transforms else contextlib.nullcontext():
        yield
