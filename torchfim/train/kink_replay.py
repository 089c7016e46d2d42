"""The finite difference's second pass on the first pass's side of every kink of a piecewise-linear module.

The penalty's finite difference (:mod:`.finite_difference`) takes ``(∇L(θ + ε ĝ) − ∇L(θ))·‖g‖/ε`` for ``H g``. Where
the network has kinks (ReLU, LeakyReLU, ReLU6, Hardtanh, Hardswish, Hardsigmoid, max pooling), a unit whose input lies
within the step's reach of its kink changes side between the two passes, and its gradient jumps by a finite amount
that the division by ε turns into a large one. In float64 the step (about ``1e-9·‖θ‖``) moves almost no unit across;
in float32 (about ``4e-5·‖θ‖``) dozens of a ReLU MLP's units cross, and the difference came out 8 to 11 times the
size of the double-backprop gradient (64-256-256-10 ReLU MLP on 256 digits), which takes ``H`` where the network is
smooth.

So the second pass keeps the first pass's pattern: each such module's forward records, in the first pass, which side
of its kink each input number is on (for max pooling, which entry of each window is the largest), and in the second
pass returns the same piecewise-linear function of its new input on those sides (``x·[x₀ > 0]`` for ReLU, the
entries at the first pass's indices for max pooling). Within one pattern the network is smooth in θ, so the
difference is that of double backprop again. Where no unit crosses, the pass is the one without the replay.

Modules only, of torch's own classes (a subclass may compute another function): a kink taken by a function in a
forward (``F.relu``, ``torch.clamp``, ``x.max(...)``) is not replayed, and a forward hook of the caller's that changes
such a module's output is overridden in the second pass.
Each record and replay acts in the thread that opened it: another thread running the same model meanwhile is left
alone.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: The modules whose kinks are replayed.
PIECEWISE = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.MaxPool1d, nn.MaxPool2d,
             nn.MaxPool3d)
#: Each max pooling's functional form and number of pooled dims.
_POOLS = {nn.MaxPool1d: (F.max_pool1d, 1), nn.MaxPool2d: (F.max_pool2d, 2), nn.MaxPool3d: (F.max_pool3d, 3)}


def _pattern(module: nn.Module, x: Tensor) -> object:
    """What fixes the module's side of its kinks at the input ``x``: a mask, a pair of masks, or pooling indices."""
    if isinstance(module, (nn.ReLU, nn.LeakyReLU)):
        return x > 0
    if isinstance(module, nn.Hardtanh):  # ReLU6 is a Hardtanh(0, 6)
        return x <= module.min_val, x >= module.max_val
    if isinstance(module, (nn.Hardswish, nn.Hardsigmoid)):  # kinks at ±3
        return x <= -3, x >= 3
    pool = _POOLS[type(module)][0]
    return pool(x, module.kernel_size, module.stride, module.padding, module.dilation, ceil_mode=module.ceil_mode,
                return_indices=True)[1]


def _on_pattern(module: nn.Module, x: Tensor, pattern: object) -> Tensor:
    """The module's function of ``x`` on the sides ``pattern`` fixes (:func:`_pattern`)."""
    if isinstance(module, nn.ReLU):
        return x * pattern
    if isinstance(module, nn.LeakyReLU):
        return torch.where(pattern, x, x * module.negative_slope)
    if isinstance(module, nn.Hardtanh):
        below, above = pattern
        return torch.where(below, module.min_val, torch.where(above, module.max_val, x)).to(x.dtype)
    if isinstance(module, nn.Hardswish):  # 0, x (x + 3)/6, x
        below, above = pattern
        return torch.where(below, 0.0, torch.where(above, x, x * (x + 3) / 6)).to(x.dtype)
    if isinstance(module, nn.Hardsigmoid):  # 0, (x + 3)/6, 1
        below, above = pattern
        return torch.where(below, 0.0, torch.where(above, 1.0, (x + 3) / 6)).to(x.dtype)
    spatial = _POOLS[type(module)][1]
    flat = x.flatten(-spatial)
    return flat.gather(-1, pattern.flatten(-spatial)).reshape(pattern.shape)


class KinkReplay:
    """Record the first pass's patterns (:meth:`recording`), then run the second pass on them (:meth:`replaying`).

    A module called several times in a forward has a pattern per call, replayed in call order; an input whose shape
    or device is not the recorded one (no such forward in practice) is computed as the module does."""

    def __init__(self, model: nn.Module) -> None:
        # torch's own classes only (a subclass may compute something else), and a max pooling that returns its
        # indices too (for MaxUnpool) keeps its own forward: its output is a pair
        self.modules = [m for m in model.modules() if type(m) in PIECEWISE and not getattr(m, "return_indices", False)]
        self.patterns: dict[int, list[object]] = {}

    @contextmanager
    def recording(self) -> Iterator[None]:
        """Within the block, this thread's calls of the modules record their patterns."""
        self.patterns = {id(m): [] for m in self.modules}

        def record(module: nn.Module, args: tuple, output: Tensor) -> None:
            if args and isinstance(args[0], Tensor):
                self.patterns[id(module)].append(_pattern(module, args[0].detach()))

        with self._hooked(record):
            yield

    @contextmanager
    def replaying(self) -> Iterator[None]:
        """Within the block, this thread's calls of the modules return their function on the recorded patterns (of
        their input as it came in: an in-place module's is copied first)."""
        left = {key: iter(patterns) for key, patterns in self.patterns.items()}
        inputs: dict[int, list[Tensor | None]] = {id(m): [] for m in self.modules}

        def keep(module: nn.Module, args: tuple) -> None:
            x = args[0] if args and isinstance(args[0], Tensor) else None
            inputs[id(module)].append(x.clone() if x is not None and getattr(module, "inplace", False) else x)

        def replay(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            x, pattern = inputs[id(module)].pop(), next(left[id(module)], None)
            if x is None or pattern is None or not _fits(module, x, pattern):
                return None
            return _on_pattern(module, x, pattern)

        with self._hooked(replay, keep):
            yield

    @contextmanager
    def _hooked(self, hook: Callable[[nn.Module, tuple, Tensor], Tensor | None],
                pre_hook: Callable[[nn.Module, tuple], None] | None = None) -> Iterator[None]:
        if not self.modules:
            yield
            return
        owner = threading.get_ident()

        def in_this_thread(module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
            return hook(module, args, output) if threading.get_ident() == owner else None

        def before_in_this_thread(module: nn.Module, args: tuple) -> None:
            if threading.get_ident() == owner:
                pre_hook(module, args)

        handles = [m.register_forward_hook(in_this_thread) for m in self.modules]
        if pre_hook is not None:
            handles += [m.register_forward_pre_hook(before_in_this_thread) for m in self.modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()


def _fits(module: nn.Module, x: Tensor, pattern: object) -> bool:
    """Whether ``pattern`` was recorded on an input of ``x``'s shape and device."""
    if type(module) in _POOLS:
        spatial = _POOLS[type(module)][1]
        return x.shape[:-spatial] == pattern.shape[:-spatial] and x.device == pattern.device
    first = pattern[0] if isinstance(pattern, tuple) else pattern
    return x.shape == first.shape and x.device == first.device
