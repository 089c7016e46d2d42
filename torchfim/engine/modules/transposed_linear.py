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

from .base import Call, Factors, Grads, Rule, as_float, positions_squares
from .linear import dense_squared_norms, dense_squares, linear_factors, linear_squared_norms, named_squares, total_of


def transposed_linear_supported(module: nn.Module) -> bool:
    """A ``transformers`` ``Conv1D``: weight ``(nx, nf)``, optional bias ``(nf,)``, forward ``x W + b``."""
    if type(module).__name__ != "Conv1D" or not type(module).__module__.startswith("transformers."):
        return False
    weight = getattr(module, "weight", None)
    return (isinstance(weight, Tensor) and weight.dim() == 2
            and tuple(weight.shape) == (getattr(module, "nx", None), getattr(module, "nf", None)))


class TransposedLinearRule(Rule):
    """Per-sample products of a ``transformers`` ``Conv1D`` (weight ``(in, out)``, bias ``(out,)``)."""

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        a = call.args[0][rows]
        a = as_float(a.reshape(a.shape[0], -1, a.shape[-1]))  # (b, L, in)
        g = sens[0][:, rows]
        m, b, units = g.shape[0], g.shape[1], g.shape[-1]
        g = as_float(g.reshape(m, b, -1, units))  # (m, b, L, out)
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
        a, g = call.args[0], sens[0]
        weight, bias = positions_squares(g.reshape(*g.shape[:2], -1, g.shape[-1]), a.reshape(a.shape[0], -1, a.shape[-1]),
                                         weight="weight" in self.params)
        return named_squares(self.params, weight, bias)

    def sample_squares(self, call: Call, sens: list[Tensor | None]) -> Tensor | None:
        if self._dense(call):
            return dense_squared_norms(self.params, call.args[0], sens[0])
        return total_of(self.tensor_sample_squares(call, sens))

    def tensor_sample_squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        return linear_squared_norms(self.params, call.args[0], sens[0])

    def factors(self, call: Call, sens: list[Tensor | None]) -> dict[int, Factors] | None:
        a, g = call.args[0], sens[0]
        a = as_float(a.reshape(a.shape[0], -1, a.shape[-1]))
        return linear_factors(self.params, a, as_float(g.reshape(*g.shape[:2], -1, g.shape[-1])), transposed=True)

    def _dense(self, call: Call) -> bool:
        return call.args[0].dim() == 2
