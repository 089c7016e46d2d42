"""Forwards that save their activations as plain autograd does, while torchfim computes.

Two devices trade the memory of a forward's saved activations for time, without changing any value:

* ``torch.utils.checkpoint`` saves a region's inputs only and runs the region again during the backward
  pass, with the parameters its modules hold *then*. torch.func refuses both of its forms (a custom
  autograd function without ``setup_context``; saved-tensor hooks), a reentrant checkpoint refuses
  ``torch.autograd.grad``, and the penalty's perturbed pass, whose parameters are substituted only while
  it runs forward, would be recomputed at the unperturbed ones: a silently wrong gradient.
* Saved-tensor hooks (``torch.autograd.graph.saved_tensors_hooks``, ``save_on_cpu``, the offloading of
  Hugging Face's activation checkpointing) move what autograd saves elsewhere and back; their contract is
  that the tensor unpacked equals the tensor packed. torch.func refuses them.

Within :func:`plain_forwards` every checkpointed region of the thread runs once, as a plain forward, and
entering a saved-tensor hooks context does nothing: the same values, the memory of a forward without
them. It holds for every computation of the engine (:func:`.view.engine_session`) and each step of the
penalty that computes it; the user's own forwards and backwards outside, and other threads (a training
loop beside a monitor), keep both devices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch.utils.checkpoint as torch_checkpoint
from torch.autograd.graph import saved_tensors_hooks

__all__ = ["plain_forwards"]


class _Reentrant:
    """Stands in for torch's reentrant checkpoint function: in a plain thread, runs the region."""

    @staticmethod
    def apply(function: Callable, preserve_rng_state: bool, *args: object) -> object:
        if _plain():
            return function(*args)
        return _torchs(torch_checkpoint, "CheckpointFunction").apply(function, preserve_rng_state, *args)


def _non_reentrant(*args: object, **kwargs: object) -> Iterator[None]:
    """Stands in for torch's non-reentrant checkpoint generator: in a plain thread, nothing before or after
    the region (torch's ``checkpoint`` advances it once before the region and once after)."""
    if _plain():
        yield
    else:
        yield from _torchs(torch_checkpoint, "_checkpoint_without_reentrant_generator")(*args, **kwargs)


def _enter_hooks(self: saved_tensors_hooks) -> None:
    """Stands in for entering a saved-tensor hooks context: in a plain thread, no hooks pushed."""
    if _plain():
        self.__dict__[_SKIPPED] = True
    else:
        _torchs(saved_tensors_hooks, "__enter__")(self)


def _leave_hooks(self: saved_tensors_hooks, *exc: object) -> None:
    """Stands in for leaving a saved-tensor hooks context: none popped where none were pushed."""
    if not self.__dict__.pop(_SKIPPED, False):
        _torchs(saved_tensors_hooks, "__exit__")(self, *exc)


_SKIPPED = "_torchfim_hooks_skipped"
#: ``(owner, name, stand-in)``: names that ``torch.utils.checkpoint.checkpoint`` looks up in its module on
#: each call (so callers that bound ``checkpoint`` itself, as Hugging Face models do, are reached too),
#: and the methods of the saved-tensor hooks contexts (``save_on_cpu`` and torch's other subclasses inherit
#: them). Installed while any thread is in a block; each defers to torch's own in the other threads.
_STAND_INS = [
    (torch_checkpoint, "CheckpointFunction", _Reentrant),
    (torch_checkpoint, "_checkpoint_without_reentrant_generator", _non_reentrant),
    (saved_tensors_hooks, "__enter__", _enter_hooks),
    (saved_tensors_hooks, "__exit__", _leave_hooks),
]
_lock = threading.Lock()
_depths: dict[int, int] = {}  # thread id → blocks it is in
_torchs_own: dict[tuple[int, str], object] = {}


def _plain() -> bool:
    return threading.get_ident() in _depths


def _torchs(owner: object, name: str) -> object:
    return _torchs_own[id(owner), name]


@contextmanager
def plain_forwards() -> Iterator[None]:
    """Within the block, this thread's checkpointed regions run as plain forwards and its saved-tensor
    hooks contexts push no hooks; other threads keep torch's own behaviour.

    Example:
        >>> import torch
        >>> from torch.utils.checkpoint import checkpoint
        >>> w = torch.randn(3, 3, requires_grad=True)
        >>> with plain_forwards():
        ...     out = checkpoint(torch.tanh, torch.randn(2, 3) @ w, use_reentrant=False)
        >>> type(out.grad_fn).__name__  # autograd's own node: no checkpoint in the graph
        'TanhBackward0'
    """
    me = threading.get_ident()
    with _lock:
        if not _depths:
            for owner, name, stand_in in _STAND_INS:
                if hasattr(owner, name):  # a torch without one of these keeps its own
                    _torchs_own[id(owner), name] = getattr(owner, name)
                    setattr(owner, name, stand_in)
        _depths[me] = _depths.get(me, 0) + 1
    try:
        yield
    finally:
        with _lock:
            _depths[me] -= 1
            if not _depths[me]:
                del _depths[me]
            if not _depths:
                for owner, name, _ in _STAND_INS:
                    if (id(owner), name) in _torchs_own:
                        setattr(owner, name, _torchs_own.pop((id(owner), name)))
