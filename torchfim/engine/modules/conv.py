"""``nn.Conv1d/2d/3d`` (stride, padding, dilation, groups, any padding mode) and their transposes.

A convolution is a linear layer applied at every output position ``l`` to the patch ``p_l`` of its
input under the kernel: per group, ``∂/∂W = Σ_l g_l p_lᵀ`` and ``∂/∂b = Σ_l g_l`` (docs/math.md §6).
The per-sample sums over positions are computed as one grouped convolution-weight gradient with a
group per sample (and vector), which never builds the patches; where the patches of a call are
small (small images) and there are enough vectors, :meth:`ConvRule.squares` builds them once and
takes one batched matrix product per chunk instead, which is faster there.

A transposed convolution ``z = convᵀ(x; W)`` is the adjoint of the convolution ``u ↦ conv(u; W)`` (same
weight tensor, stride, padding, dilation and groups), so ``⟨g, z⟩ = ⟨conv(g; W), x⟩`` and its weight
gradient is that convolution's with ``g`` as the input and ``x`` as the output sensitivity: the same
grouped computation with the two roles swapped (output padding only adds rows ``conv`` does not read).

A layer that pads its input itself before an unpadded convolution (reflect, replicate or circular
padding; 'same') is the same linear map of its padded input, so the rule pads the recorded input the same
way (:meth:`ConvRule._padded`) and takes the unpadded convolution's gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Grads, Rule, as_float

#: Elements of per-sample weight gradients built at once by :meth:`ConvRule.squares` from the grouped
#: gradient. Larger chunks were slower there: 32 channels on 32×32 images, 9 vectors, 87 ms at 3 samples
#: per chunk against 106 at 6.
GRADIENT_ELEMENTS = 2**18
#: The same from the patches by batched products, which pay per chunk: the benchmark CNN's second layer
#: (16 → 32 channels, 8×8), 9 vectors over 256 images, took 14.7 ms at 6 samples per chunk (2**18)
#: and 10.5 ms at 12 or 24 (the products alone 9.4 ms).
PATCH_GRADIENT_ELEMENTS = 2**20
#: Largest patches ``(B, L, K)`` of one call that :meth:`ConvRule.squares` builds and keeps.
PATCH_ELEMENTS = 2**22
#: Fewest vectors in a group for which building the patches pays: on the benchmark CNN's 8×8 images
#: the batched products were 1.2 times slower than the grouped gradient with 1-3 vectors, 1.06 with
#: 4 and 0.9 with 6 (once built, the patches serve every later group).
PATCH_VECTORS = 5
#: Narrowest patches stay cheap to build: up to this width (``in·k²``) they pay even for one vector. With
#: one vector over 128 images: the benchmark ResNet's stem (3·3², 32×32) took 5.3 ms against 8.3 by the
#: grouped gradient, a 16-channel layer on 8×8 images (16·3² = 144) 1.04 ms against 0.41.
PATCH_WIDTH = 64


#: The convolution-weight gradient per number of spatial dims.
_WEIGHT_GRAD = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight, 3: torch.nn.grad.conv3d_weight}
_KINDS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_supported(module: nn.Module) -> bool:
    """Convolutions this rule covers: 1-d to 3-d and their transposes, any padding mode and padding (numbers,
    'valid', 'same')."""
    return isinstance(module, _KINDS)


class ConvRule(Rule):
    """Per-sample products of a zero-padded convolution or transposed convolution (any stride, dilation,
    groups, output padding)."""

    def __init__(self, module: nn.Module, params: dict[str, int]) -> None:
        super().__init__(module, params)
        self.transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)

    def _weight(self, x: Tensor, g: Tensor) -> Tensor:
        """Per-sample weight gradients ``(b, m, size)`` of inputs ``x`` (b, in, *) and ``g`` (m, b, out, *').

        One grouped convolution-weight gradient with a group per (vector, sample): the same
        computation as the layer's own weight gradient, without patches in memory.
        """
        module = self.module
        m, b = g.shape[:2]
        groups = module.groups * m * b
        xs = x.unsqueeze(0).expand(m, *x.shape).reshape(1, m * b * x.shape[1], *x.shape[2:])
        gs = g.reshape(1, m * b * g.shape[2], *g.shape[3:])
        if self.transposed:  # the adjoint convolution's weight gradient: g its input, x its sensitivity
            xs, gs = gs, xs
        shape = (m * b * module.weight.shape[0], *module.weight.shape[1:])
        weight_grad = _WEIGHT_GRAD[module.weight.dim() - 2]
        w = weight_grad(xs, shape, gs, module.stride, self._padding(), module.dilation, groups)
        return w.reshape(m, b, -1).transpose(0, 1)

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        g = as_float(sens[0][:, rows])  # (m, b, out, *spatial)
        out: Grads = {}
        if "weight" in self.params:
            out[self.params["weight"]] = self._weight(self._padded(as_float(call.args[0][rows])), g)
        if "bias" in self.params:
            out[self.params["bias"]] = g.flatten(3).sum(-1).transpose(0, 1)
        return out

    def _patches(self, x: Tensor) -> Tensor | None:
        """The input's patches ``(B, L, K)`` (``z_l = W p_l``, ``K`` in the weight's ``(in, *kernel)``
        order), or None where the layer has groups or dilation, or the patches would be large."""
        module = self.module
        kernel = module.kernel_size
        if self.transposed or module.groups != 1 or any(d != 1 for d in module.dilation):
            return None
        positions = 1
        for size, k, step, pad in zip(x.shape[2:], kernel, module.stride, self._padding()):
            positions *= (size + 2 * pad - k) // step + 1
        width = x.shape[1]
        for k in kernel:
            width *= k
        if x.shape[0] * positions * width > PATCH_ELEMENTS:
            return None
        pads = [p for pad in reversed(self._padding()) for p in (pad, pad)]
        windows = F.pad(x, pads) if any(pads) else x
        for d, (k, step) in enumerate(zip(kernel, module.stride)):
            windows = windows.unfold(2 + d, k, step)  # (B, in, *out positions, *kernel)
        spatial = len(kernel)
        order = (0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial))
        return windows.permute(order).reshape(x.shape[0], width, positions).transpose(1, 2)

    def _padding(self) -> tuple[int, ...]:
        """The padding the weight gradient applies itself: none where :meth:`_padded` padded the input."""
        module = self.module
        return (0,) * len(module.kernel_size) if self._pads_input() or module.padding == "valid" else tuple(module.padding)

    def _pads_input(self) -> bool:
        """Whether the layer pads its input before a convolution without padding, as torch does for the
        padding modes other than zeros and for 'same' (asymmetric where the kernel's extent is even)."""
        return self.module.padding_mode != "zeros" or self.module.padding == "same"

    def _padded(self, x: Tensor) -> Tensor:
        """The input as the layer's convolution reads it: padded by the layer's mode where it pads itself."""
        if not self._pads_input():
            return x
        module = self.module
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        return F.pad(x, module._reversed_padding_repeated_twice, mode=mode)

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        """Per-sample weight gradients a few samples at a time, squared in place: by one batched matrix
        product with the call's patches where they are small and the group has at least
        :data:`PATCH_VECTORS` vectors or the patches are at most :data:`PATCH_WIDTH` wide (kept for the
        later groups), else by :meth:`_weight`."""
        g = as_float(sens[0])  # (m, B, out, *spatial)
        m, size = g.shape[:2]
        x = self._padded(as_float(call.args[0]))
        out: Grads = {}
        if "weight" in self.params:
            width = self.module.weight[0].numel()  # in/groups · k²
            if "patches" not in call.cache and (m >= PATCH_VECTORS or width <= PATCH_WIDTH):
                call.cache["patches"] = self._patches(x)
            patches = call.cache.get("patches")
            by_unit = g.flatten(3)  # (m, B, out, L)
            budget = GRADIENT_ELEMENTS if patches is None else PATCH_GRADIENT_ELEMENTS
            step = max(1, budget // (m * self.module.weight.numel()))
            total = None
            for start in range(0, size, step):
                rows = slice(start, min(size, start + step))
                if patches is None:
                    sq = self._weight(x[rows], g[:, rows]).square_().sum((0, 1))
                else:
                    stacked = by_unit[:, rows].transpose(0, 1).flatten(1, 2)  # (b, m·out, L)
                    sq = torch.bmm(stacked, patches[rows]).square_().sum(0).view(m, -1).sum(0)
                total = sq if total is None else total.add_(sq)
            out[self.params["weight"]] = total
        if "bias" in self.params:
            out[self.params["bias"]] = g.flatten(3).sum(-1).square_().sum((0, 1))
        return out
