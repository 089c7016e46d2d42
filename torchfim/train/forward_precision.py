"""The precision a model's forward computes in, below its parameters' own: what the finite-difference step needs.

A forward may compute part of its work in a less precise dtype on its own, outside any autocast region: Hugging
Face's Llama, Qwen2 and Mistral take their RMS norms (and rotary angles) in float32 and cast the result back, even in
a float64 model. A forward difference of gradients whose step ε was taken for float64 then divides float32's rounding
by a step of float64's scale: 75-370% off the exact gradient, without a word. On the first computing step, while the
model's forward runs, a function mode notes the less precise dtypes that flow back into the parameters' precision (a
cast up, explicit or by type promotion; a loss the forward computes in float32 and returns as it is does not count);
every step then counts them as autocast regions are counted (:func:`.engine.native_dtype.autocast_observed`). The mode
costs a Python call per operation, on that step only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ..engine.native_dtype import observe_precision

__all__ = ["ForwardPrecision"]


def _floats(values: object) -> Iterator[Tensor]:
    for value in values:
        if isinstance(value, (tuple, list)):
            yield from _floats(value)
        elif isinstance(value, Tensor) and value.is_floating_point():
            yield value


class _CastsUp(TorchFunctionMode):
    """Counts, as it goes (the step is taken after the first forward), each floating dtype less precise than
    ``floor`` whose tensors a torch function turns into ``floor``'s precision or better, on ``device``."""

    def __init__(self, floor: torch.dtype, device: str) -> None:
        super().__init__()
        self.eps, self.device = torch.finfo(floor).eps, device
        self.lower: set[torch.dtype] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        results = list(_floats(out if isinstance(out, (tuple, list)) else (out,)))
        if results and min(torch.finfo(t.dtype).eps for t in results) <= self.eps:
            for t in _floats((*args, *(kwargs or {}).values())):
                if t.dtype not in self.lower and torch.finfo(t.dtype).eps > self.eps:
                    self.lower.add(t.dtype)
                    observe_precision(self.device, t.dtype)
        return out


class ForwardPrecision:
    """The dtypes less precise than the parameters' that a model's forward computes in, found on the first step."""

    def __init__(self) -> None:
        self.probed = False
        self.lower: set[torch.dtype] = set()

    @contextmanager
    def counted(self, model: nn.Module, first: Tensor) -> Iterator[None]:
        """Within the block (inside :func:`~torchfim.engine.native_dtype.autocast_observed`), the precisions below
        ``first``'s that ``model``'s forward computes in count for the step: found while the first block's forwards
        run, given to every later block."""
        for dtype in self.lower:
            observe_precision(first.device.type, dtype)
        if self.probed:
            yield
            return
        mode, depth = _CastsUp(first.dtype, first.device.type), [0]

        def enter(*_: object) -> None:
            depth[0] += 1
            if depth[0] == 1:
                mode.__enter__()

        def leave(*_: object) -> None:
            if depth[0] == 0:  # another pre-hook raised before enter ran: always_call calls leave all the same
                return
            depth[0] -= 1
            if depth[0] == 0:
                mode.__exit__(None, None, None)

        # always_call: a forward that raises (a per-input pass vmap cannot batch, tried again another way) leaves too, so
        # that the mode does not stay on over what the block runs after the forwards (the task loss, in float32)
        hooks = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            if depth[0] > 0:  # a forward interrupted by what is not an Exception: leave never ran
                mode.__exit__(None, None, None)
        self.lower, self.probed = mode.lower, True
