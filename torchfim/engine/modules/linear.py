"""``nn.Linear`` on inputs with any number of leading dims.

``z = a Wᵀ + b`` at each position ``l`` of a sample: the per-sample gradients are
``∂/∂W = Σ_l g_l a_lᵀ`` and ``∂/∂b = Σ_l g_l``. With one position per sample (a dense layer) the
squares factor, ``Σᵢⱼ (g_ij a_iᵀ)² = (Σⱼ g_ij²)ᵀ (a_i²)``, and so do the squared norms,
``‖g aᵀ‖² + ‖g‖² = ‖g‖² (‖a‖² + 1)``: nothing per-sample is built (docs/math.md §6). With several
positions the squares are taken chunk by chunk as the products are formed (:func:`.base.positions_squares`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Call, Factors, Grads, Rule, as_float, positions_grads, positions_squares


class LinearMap(Rule):
    """What a linear map's rule does the same in either layout of its weight: the inputs and sensitivities
    by position, the squared norms and the factors of its per-sample gradients."""

    #: Whether the weight is stored ``(in, out)`` (transformers' ``Conv1D``) rather than ``(out, in)``.
    transposed = False
    reads_regrouped_rows = True

    def _factors(self, call: Call, g: Tensor, rows: slice = slice(None)) -> tuple[Tensor, Tensor]:
        """The inputs ``(b, L, in)`` and sensitivities ``(m, b, L, out)`` of the samples ``rows``."""
        a = call.args[0][rows]
        a = a.reshape(a.shape[0], -1, a.shape[-1])  # (b, L, in)
        g = g[:, rows]
        return as_float(a), as_float(g.reshape(g.shape[0], g.shape[1], -1, g.shape[-1]))  # (m, b, L, out)

    def _dense(self, call: Call) -> bool:
        return call.args[0].dim() == 2

    def sample_squares(self, call: Call, sens: list[Tensor | None]) -> Tensor | None:
        if self._dense(call):
            return dense_squared_norms(self.params, call.args[0], sens[0])
        return total_of(self.tensor_sample_squares(call, sens))

    def tensor_sample_squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        return linear_squared_norms(self.params, call.args[0], sens[0])

    def factors(self, call: Call, sens: list[Tensor | None]) -> dict[int, Factors] | None:
        a, g = self._factors(call, sens[0])
        return linear_factors(self.params, a, g, self.transposed)


class LinearRule(LinearMap):
    """Per-sample products of ``nn.Linear`` (weight ``(out, in)``, optional bias)."""

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        a, g = self._factors(call, sens[0], rows)
        out: Grads = {}
        positions_grads(self, g, a, "weight", "bias", out)
        return out

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        if self._dense(call):
            return dense_squares(self.params, call.args[0], sens[0])
        a, g = self._factors(call, sens[0])
        weight, bias = positions_squares(g, a, weight="weight" in self.params)
        return named_squares(self.params, None if weight is None else weight.T, bias)

    def unit_input(self, call: Call) -> Tensor | None:
        return call.args[0] if self._dense(call) else None


def linear_factors(params: dict[str, int], a: Tensor, g: Tensor, transposed: bool) -> dict[int, Factors]:
    """The factors of a linear map's per-sample gradients at positions, from ``a`` ``(B, L, in)`` and ``g``
    ``(m, B, L, out)``: ``(g, a)`` for a weight ``(out, in)`` (``(a, g)`` for one stored ``transposed``),
    ``(g, 1)`` for the bias."""
    out: dict[int, Factors] = {}
    if "weight" in params:
        out[params["weight"]] = (a.unsqueeze(0), g) if transposed else (g, a.unsqueeze(0))
    if "bias" in params:
        out[params["bias"]] = (g, a.new_ones(1, *a.shape[:2], 1))
    return out


def linear_squared_norms(params: dict[str, int], a: Tensor, g: Tensor) -> Grads | None:
    """Per sample and vector ``(B, m)``, the squared norms of a linear map's per-sample gradients (either
    layout of the weight) with input ``a`` ``(B, *positions, in)`` and sensitivities ``g``
    ``(m, B, *positions, out)``: ``‖Σ_l g_l a_lᵀ‖² = Σ_{l,k} (g_l·g_k)(a_l·a_k)`` for the weight and
    ``‖Σ_l g_l‖²`` for the bias, from the positions' Gram matrices (docs/math.md §6), none per-sample
    product built. None where building those is cheaper: ``L·(in + out) ≥ in·out`` for ``L`` positions."""
    a = as_float(a.reshape(a.shape[0], -1, a.shape[-1]))  # (B, L, in)
    g = as_float(g.reshape(*g.shape[:2], -1, g.shape[-1]))  # (m, B, L, out)
    positions, width, units = a.shape[1], a.shape[2], g.shape[-1]
    if positions > 1 and positions * (width + units) >= width * units:
        return None
    out: Grads = {}
    if "weight" in params:
        inputs = a @ a.transpose(1, 2)  # (B, L, L): a_l·a_k
        out[params["weight"]] = torch.einsum("mblk,blk->bm", g @ g.transpose(2, 3), inputs)
    if "bias" in params:
        summed = g.sum(2)  # (m, B, out)
        out[params["bias"]] = torch.linalg.vecdot(summed, summed).T
    return out


def total_of(parts: Grads | None) -> Tensor | None:
    """The sum of per-tensor squared norms ``(B, m)`` over the tensors (None for None or none)."""
    if not parts:
        return None
    values = list(parts.values())
    return values[0] if len(values) == 1 else torch.stack(values).sum(0)


def dense_squares(params: dict[str, int], a: Tensor, g: Tensor, transposed: bool = False) -> Grads:
    """``Σᵢⱼ (∂(vᵢⱼᵀoᵢ)/∂θ)²`` of a dense linear map with input ``a`` ``(B, in)`` and output sensitivities
    ``g`` ``(m, B, out)``: ``(G²)ᵀ(A²)`` for a weight ``(out, in)``, ``(A²)ᵀ(G²)`` for one stored
    ``transposed`` ``(in, out)``, and ``Σᵢⱼ g_ij²`` for the bias (docs/math.md §6.3)."""
    a, g = as_float(a), as_float(g)
    g2 = g[0].square() if g.shape[0] == 1 else g.square().sum(0)  # (B, out): Σⱼ g_ij²
    out: Grads = {}
    if "weight" in params:
        a2 = a.square()
        out[params["weight"]] = (a2.T @ g2 if transposed else g2.T @ a2).reshape(-1)
    if "bias" in params:
        out[params["bias"]] = g2.sum(0)
    return out


def named_squares(params: dict[str, int], weight: Tensor | None, bias: Tensor) -> Grads:
    """The squares of ``weight`` and ``bias`` (flattened) under the indices of those of ``params`` that are
    trainable (``weight`` is None only where it is frozen)."""
    squares = {"weight": weight, "bias": bias}
    return {i: squares[name].reshape(-1) for name, i in params.items()}


def dense_squared_norms(params: dict[str, int], a: Tensor, g: Tensor) -> Tensor:
    """``‖g_ij‖² (‖a_i‖² + 1)`` per sample and vector ``(B, m)`` for a dense linear map with input ``a``
    ``(B, in)`` and output sensitivities ``g`` ``(m, B, out)`` (``+ 1`` where it has a bias, ``‖g_ij‖²``
    alone without a weight); the same for either layout of the weight."""
    # Straight on the recorded tensors: a few operations per layer, which is most of the cost of a small
    # window (the monitor's), where each costs about as much as its arithmetic.
    a, g = as_float(a), as_float(g)
    g2 = torch.linalg.vecdot(g, g)  # (m, B): ‖g_ij‖²
    if "weight" not in params:
        return g2.T
    a2 = torch.linalg.vecdot(a, a)  # (B,): ‖a_i‖²
    return (torch.addcmul(g2, g2, a2) if "bias" in params else g2 * a2).T
