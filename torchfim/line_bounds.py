"""The Î1 bounds where every score lies on a line ``u = s e`` (one output; two classes), formed without cancellation.

There ``λ_max(M) = E‖u‖⁴ = E[s⁴]‖e‖⁴ =: λ`` (the bound's per-input constant, :func:`.variance._bound_scale`) and
``vᵀΛw = E[s²](vᵀe)(wᵀe)``. With ``ê = e/‖e‖``, ``a = (vᵀê)²`` and ``r = ‖v − (vᵀê)ê‖²`` (so ``‖v‖² = a + r``), the
bound on an entry, ``λ‖v_p‖²‖v_q‖² − (v_pᵀΛv_q)²``, is

    ``Var(s²)(v_pᵀe)²(v_qᵀe)² + λ(r_p(a_q + r_q) + a_p r_q)``,

and the trace's, ``λ‖G‖² − (tr ΛG)²``, is ``Var(s²)(eᵀGe)² + λ(‖G‖² − g²)`` with ``g = êᵀGê`` (``‖G‖`` Frobenius for
the spectral bound, ``‖G‖² − g² = 2‖Gê − gê‖² + ‖PGP‖²``, ``P = I − êêᵀ``; spectral norm for the kurtosis bound,
``(‖G‖₂ − g)(‖G‖₂ + g)``). Every term is non-negative, and the first is the variance itself
(:meth:`~torchfim.families.Family.score_line`). As the difference of the two moments the bound cancelled near
``p = ½``, where ``Var(s²) = Λ tanh²(o/2)`` vanishes while both moments stay near ``1/16``: a one-logit Bernoulli head at
logit 1e-8 had bounds of −1.7e-17 on variances of 1.6e-21, in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .families.base import robust_eigvalsh


def _split(e: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(vᵀe)²``, ``a = (vᵀê)²`` and ``r = ‖v − (vᵀê)ê‖²`` for output-space vectors ``v`` (b, m, C) → (b, m) each."""
    unit = e.to(v.dtype) / e.to(v.dtype).norm()
    along = v @ unit
    rest = (v - along.unsqueeze(-1) * unit).square().sum(-1)
    return (v @ e.to(v.dtype)).square(), along.square(), rest


def entry_bounds(line: tuple[Tensor, Tensor], scale: Tensor, v: Tensor) -> Tensor:
    """The bound on each diagonal entry's one-label variance, ``Var(s²)(vᵀe)⁴ + λ r(2a + r)``, (b, m)."""
    spread, e = line
    squares, a, r = _split(e, v)
    return spread.unsqueeze(1) * squares**2 + scale.unsqueeze(1) * r * (2 * a + r)


def pair_bounds(line: tuple[Tensor, Tensor], scale: Tensor, v: Tensor) -> Tensor:
    """The bound on each entry ``(p, q)``'s one-label variance, summed over the inputs of ``v`` (b, n, C): (n, n)."""
    spread, e = line
    squares, a, r = _split(e, v)
    weighted = scale.unsqueeze(1)
    return ((spread.unsqueeze(1) * squares).T @ squares + (weighted * r).T @ (a + r) + (weighted * a).T @ r)


def _top_gap(gram: Tensor, e: Tensor, g: Tensor) -> Tensor:
    """``‖G‖₂ − g ≥ 0``, ``g = êᵀGê``, per input (b,). One output: 0. Two: from the entries ``α, β, γ`` of ``G`` and
    ``e``, ``δ = (g − h)/2`` and ``c = êᵀGf̂`` with ``f ⊥ e`` are ``((e₀² − e₁²)(α − γ) + 4e₀e₁β)/(2‖e‖²)`` and
    ``(β(e₀² − e₁²) − e₀e₁(α − γ))/‖e‖²``, and the gap is ``hypot(δ, c) − δ``, as ``c²/(hypot(δ, c) + δ)`` for
    ``δ > 0``: through ``g`` and an eigen-solver the gap kept only the rounding of ``‖G‖`` (3e-8 of the bound at logit
    1e-4). More outputs: by the eigen-solver."""
    width = gram.shape[-1]
    if width == 1:
        return torch.zeros_like(g)
    if width > 2:
        return (robust_eigvalsh(gram)[:, -1].to(gram.dtype) - g).clamp_min(0)
    alpha, beta, gamma = gram[:, 0, 0], gram[:, 0, 1], gram[:, 1, 1]
    e0, e1 = e.unbind()
    norm, squares = e0 * e0 + e1 * e1, e0 * e0 - e1 * e1
    delta = (squares * (alpha - gamma) + 4 * e0 * e1 * beta) / (2 * norm)
    c = (beta * squares - e0 * e1 * (alpha - gamma)) / norm
    length = torch.hypot(delta, c)
    return torch.where(delta > 0, c * c / torch.where(delta > 0, length + delta, 1.0), length - delta)


def trace_bounds(line: tuple[Tensor, Tensor], scale: Tensor, gram: Tensor, mode: str) -> Tensor:
    """The bound on each input's one-label variance of the trace for its output gram ``G`` (b, C, C), (b,)."""
    spread, e = line
    e = e.to(gram.dtype)
    unit = e / e.norm()
    image = gram @ unit  # Gê
    g = image @ unit
    if mode == "spectral":
        across = image - g.unsqueeze(-1) * unit
        rest = gram - unit.unsqueeze(-1) * image.unsqueeze(-2) - image.unsqueeze(-1) * unit + g[:, None, None] * torch.outer(unit, unit)
        slack = 2 * across.square().sum(-1) + rest.square().sum((-2, -1))
    else:
        gap = _top_gap(gram, e, g)
        slack = gap * (2 * g + gap)
    return spread * torch.einsum("a,nab,b->n", e, gram, e).square() + scale * slack
