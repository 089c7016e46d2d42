"""Hugging Face ``transformers``' ``Conv1D`` (GPT, GPT-2 and their descendants): a Linear layer whose
weight is stored transposed, ``(in, out)``.

``z_l = a_l W + b`` at each position ``l`` of a sample: the per-sample gradients are
``∂/∂W = Σ_l a_l g_lᵀ`` (``(in, out)``, the layout of ``W``) and ``∂/∂b = Σ_l g_l``. With one position
per sample the squares factor, ``Σᵢⱼ (a_i g_ijᵀ)² = (a_i²)ᵀ (Σⱼ g_ij²)``, and with several they are
taken as the products are formed (:func:`.base.positions_squares`, whose layout is this one); the
squared norms do not depend on the layout, ``‖g‖² (‖a‖² + 1)`` (docs/math.md §6.1, §6.3). The layer is recognised by its
class name, module and shapes, so transformers need not be installed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Call, Grads, positions_squares
from .linear import LinearMap, dense_squares, named_squares


def transposed_linear_supported(module: nn.Module) -> bool:
    """A ``transformers`` ``Conv1D``: weight ``(nx, nf)``, optional bias ``(nf,)``, forward ``x W + b``."""
    if type(module).__name__ != "Conv1D" or not type(module).__module__.startswith("transformers."):
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(weight, Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


class TransposedLinearRule(LinearMap):
    """Per-sample products of a ``transformers`` ``Conv1D`` (weight ``(in, out)``, bias ``(out,)``)."""

    transposed = True

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        a, g = self._factors(call, sens[0], rows)
        m, b, units = g.shape[0], g.shape[1], g.shape[-1]
        out: Grads = {}
        if "weight" in self.params:
            stacked = g.permute(1, 2, 0, 3).reshape(b, -1, m * units)  # (b, L, m·out)
            per_sample = torch.bmm(a.transpose(1, 2), stacked)  # (b, in, m·out)
            out[self.params["weight"]] = per_sample.view(b, -1, m, units).transpose(1, 2).reshape(b, m, -1)
        if "bias" in self.params:
            out[self.params["bias"]] = g.sum(2).transpose(0, 1)
        return out

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        if self._dense(call):
            return dense_squares(self.params, call.args[0], sens[0], transposed=True)
        a, g = self._factors(call, sens[0])
        weight, bias = positions_squares(g, a, weight="weight" in self.params)
        return named_squares(self.params, weight, bias)
