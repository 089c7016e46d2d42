"""``nn.Bilinear`` on inputs with any number of leading dims.

``z_k = x₁ᵀ W_k x₂ + b_k`` at each position ``l`` of a sample: with ``g_l = ∂(vᵀo)/∂z_l`` the per-sample
gradients are ``∂/∂W_k = Σ_l g_{l,k} x₁,l x₂,lᵀ`` and ``∂/∂b = Σ_l g_l``, a Linear layer's on the outer
product ``x₁ ⊗ x₂`` (docs/math.md §6.1). With one position per sample the squares factor,
``Σᵢⱼ (g_ijk x₁,ia x₂,ib)² = Σᵢⱼ g_ijk² x₁,ia² x₂,ib²``, and so do the squared norms,
``‖g‖² (‖x₁‖² ‖x₂‖² + 1)``: nothing per-sample is built.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Call, Grads, Rule, as_float
from .linear import total_of


def bilinear_supported(module: nn.Module) -> bool:
    return isinstance(module, nn.Bilinear)


class BilinearRule(Rule):
    """Per-sample products of ``nn.Bilinear`` (weight ``(out, in₁, in₂)``, optional bias)."""

    def _inputs(self, call: Call, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """The two inputs of the samples ``rows``, each ``(b, L, in)`` (the recording put both in position)."""
        first, second = call.args[0][rows], call.args[1][rows]
        return (as_float(first.reshape(first.shape[0], -1, first.shape[-1])),
                as_float(second.reshape(second.shape[0], -1, second.shape[-1])))

    @staticmethod
    def _sensitivities(sens: Tensor, rows: slice = slice(None)) -> Tensor:
        g = sens[:, rows]
        return as_float(g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]))  # (m, b, L, out)

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        (x1, x2), g = self._inputs(call, rows), self._sensitivities(sens[0], rows)
        out: Grads = {}
        if "weight" in self.params:
            w = torch.einsum("mblk,bli,blj->bmkij", g, x1, x2)
            out[self.params["weight"]] = w.reshape(w.shape[0], w.shape[1], -1)
        if "bias" in self.params:
            out[self.params["bias"]] = g.sum(2).transpose(0, 1)
        return out

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        (x1, x2), g = self._inputs(call), self._sensitivities(sens[0])
        if x1.shape[1] != 1:  # several positions: the per-sample sums come first (by grads, in chunks)
            return None
        g2 = g[:, :, 0].square().sum(0)  # (B, out)
        out: Grads = {}
        if "weight" in self.params:
            out[self.params["weight"]] = torch.einsum("bk,bi,bj->kij", g2, x1[:, 0].square(), x2[:, 0].square()).reshape(-1)
        if "bias" in self.params:
            out[self.params["bias"]] = g2.sum(0)
        return out

    def sample_squares(self, call: Call, sens: list[Tensor | None]) -> Tensor | None:
        return total_of(self.tensor_sample_squares(call, sens))

    def tensor_sample_squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        (x1, x2), g = self._inputs(call), self._sensitivities(sens[0])
        if x1.shape[1] != 1:
            return None
        g2 = g[:, :, 0].square().sum(-1).T  # (B, m)
        out: Grads = {}
        if "weight" in self.params:
            out[self.params["weight"]] = g2 * (x1[:, 0].square().sum(-1) * x2[:, 0].square().sum(-1))[:, None]
        if "bias" in self.params:
            out[self.params["bias"]] = g2
        return out
