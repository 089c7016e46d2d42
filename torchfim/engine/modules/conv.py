"""``nn.Conv1d`` and ``nn.Conv2d`` with zero padding (stride, padding, dilation and groups).

A convolution is a linear layer applied at every output position ``l`` to the patch ``p_l`` of its
input under the kernel: per group, ``∂/∂W = Σ_l g_l p_lᵀ`` and ``∂/∂b = Σ_l g_l`` (docs/math.md §6).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Grads, Rule, as_float

#: Elements of per-sample weight gradients built at once: small enough to stay in cache.
CACHE_ELEMENTS = 2**19


def conv_supported(module: nn.Module) -> bool:
    """Convolutions this rule covers: 1-d and 2-d, zero padding given as numbers or 'valid'."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d)) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        return False
    return module.padding_mode == "zeros" and (not isinstance(module.padding, str) or module.padding == "valid")


def _pair(module: nn.Module, attr: str) -> tuple[int, int]:
    """A 2-d setting of the convolution; a Conv1d is seen as a Conv2d over inputs of height 1."""
    value = getattr(module, attr)
    if isinstance(value, str):  # padding='valid'
        return (0, 0)
    if isinstance(module, nn.Conv1d):
        return (0 if attr == "padding" else 1, value[0])
    return tuple(value)


def patches(module: nn.Module, a: Tensor) -> Tensor:
    """The input as ``(B, L, K)`` patches, ``K = in·kernel``, channel-major as the weight is laid out."""
    if isinstance(module, nn.Conv1d):
        a = a.unsqueeze(2)
    kernel, stride = _pair(module, "kernel_size"), _pair(module, "stride")
    padding, dilation = _pair(module, "padding"), _pair(module, "dilation")
    if dilation != (1, 1):
        return F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    # Strided windows of the padded input, copied once: faster than F.unfold on CPU.
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    padded = F.pad(a, (pw, pw, ph, ph)) if ph or pw else a
    windows = padded.unfold(2, kh, sh).unfold(3, kw, sw)  # (B, C, H', W', kh, kw)
    cols = windows.permute(0, 2, 3, 1, 4, 5).reshape(a.shape[0], windows.shape[2] * windows.shape[3], -1)
    return cols


class ConvRule(Rule):
    """Per-sample products of a zero-padded ``Conv1d``/``Conv2d`` (any stride, dilation, groups)."""

    def _patches(self, call: Call) -> Tensor:
        """The call's input patches ``(B, L, in·k)``, built once per call."""
        if "patches" not in call.cache:
            call.cache["patches"] = as_float(patches(self.module, call.args[0]))
        return call.cache["patches"]

    def _weight(self, p: Tensor, g: Tensor) -> Tensor:
        """Per-sample weight gradients ``(b, m, out·in·k/groups)`` from patches ``p`` and ``g`` (m, b, out, L)."""
        m, b, units, positions = g.shape
        groups = self.module.groups
        k = p.shape[-1] // groups
        by_unit = g.permute(1, 0, 2, 3)  # (b, m, out, L)
        parts = []
        for gr in range(groups):
            stacked = by_unit[:, :, gr * units // groups : (gr + 1) * units // groups].reshape(b, -1, positions)
            parts.append(torch.bmm(stacked, p[..., gr * k : (gr + 1) * k]).reshape(b, m, units // groups, k))
        return (parts[0] if groups == 1 else torch.cat(parts, dim=2)).reshape(b, m, -1)

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        g = as_float(sens[0][:, rows].flatten(3))  # (m, b, out, L)
        out: Grads = {}
        if "weight" in self.params:
            out[self.params["weight"]] = self._weight(self._patches(call)[rows], g)
        if "bias" in self.params:
            out[self.params["bias"]] = g.sum(-1).transpose(0, 1)
        return out

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        """Per-sample weight gradients a few samples at a time (cache-sized), squared in place."""
        g = as_float(sens[0].flatten(3))  # (m, B, out, L)
        m, size, units, _ = g.shape
        out: Grads = {}
        if "weight" in self.params:
            p = self._patches(call)
            step = max(1, CACHE_ELEMENTS // (m * units * p.shape[-1] // self.module.groups))
            total = None
            for start in range(0, size, step):
                rows = slice(start, min(size, start + step))
                sq = self._weight(p[rows], g[:, rows]).square_().sum((0, 1))
                total = sq if total is None else total.add_(sq)
            out[self.params["weight"]] = total
        if "bias" in self.params:
            out[self.params["bias"]] = g.sum(-1).square_().sum((0, 1))
        return out
