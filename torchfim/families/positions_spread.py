"""The one-label Î1 variances of outputs with positions (:class:`~torchfim.families.positions.Positions`), formed
without cancellation.

With independent positions and ``a_t = u_tᵀv_t``, ``b_t = u_tᵀw_t``, the variance of ``(Σ_t a_t)(Σ_t b_t)`` is each
position's own variance plus the pairs' terms, ``Σ_t Var(a_t b_t) + Σ_{s≠t} (E[a_s²] E[b_t²] + E[a_s b_s] E[a_t b_t])``.
Formed so, with the pairs summed against running sums of the earlier positions, no term is a difference of a fourth
moment and a squared second moment: that difference loses everything to rounding where the variance is far below the
fourth moment, as for a Bernoulli output near p = ½ with one observed position (``Var(u²) ≈ 0``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Family
from .positions_spectra import CHUNK_ELEMENTS


class PositionSpreads:
    """The variances of :class:`~torchfim.families.positions.Positions` (a base class of it, which sets the attributes
    below and the per-position helpers ``_rows``, ``_vector_rows``, ``_per_position``, ``_keep``, ``_width`` and
    ``_rooted``)."""

    base: Family
    length: int

    def spread_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``Σ_t X_t`` and ``Σ_t Var[(u_tᵀv_t)²] + 4 Σ_{s<t} X_s X_t``, ``X_t = v_tᵀΛ_tv_t``: the variance of
        ``(Σ_t u_tᵀv_t)²``, the positions' own plus their pairs', every term ≥ 0."""
        rows, keep = self._rows(o)
        second, spread = self.base.spread_along(rows, self._vector_rows(v, rows.shape[1]))
        along = self._per_position(keep, second)  # (B, L, m)
        return along.sum(1), self._per_position(keep, spread).sum(1) + 4 * (along * _earlier(along)).sum(1)

    def pairwise_spread(self, o: Tensor, v: Tensor) -> Tensor:
        """``Σ_t S_t + Σ_{s≠t} (d_s d_tᵀ + G_s∘G_t)`` (B, m, m): the variance of ``(Σ_t u_tᵀv_tp)(Σ_t u_tᵀv_tq)``, with
        ``S_t`` the base family's :meth:`~torchfim.families.Family.pairwise_spread`, ``G_t = V_tΛ_tV_tᵀ`` and
        ``d_t = diag G_t``; in chunks of positions, so that about ``CHUNK_ELEMENTS`` per-position entries are held."""
        b, m = v.shape[:2]
        c, keep = self._width(o), self._keep(o)
        span = max(1, CHUNK_ELEMENTS // max(1, 8 * b * m * m))  # a chunk holds about 8 (B, span, m, m) tensors
        total = grams = diagonals = None
        for start in range(0, self.length, span):
            stop = min(start + span, self.length)
            part, gram, diagonal = self._pairwise_chunk(o[:, start * c : stop * c], v[..., start * c : stop * c],
                                                        keep[:, start:stop], grams, diagonals)
            total = part if total is None else total + part
            grams = gram if grams is None else grams + gram
            diagonals = diagonal if diagonals is None else diagonals + diagonal
        return total

    def _pairwise_chunk(self, o: Tensor, v: Tensor, keep: Tensor, grams: Tensor | None, diagonals: Tensor | None
                        ) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`pairwise_spread`'s terms of the positions of ``o`` (a chunk), given the sums ``grams`` and
        ``diagonals`` of ``G_s`` and ``d_s`` over the chunks before it; returns the terms and this chunk's sums."""
        chunk = type(self)(self.base, keep.shape[1], keep)
        rows, kept = chunk._rows(o)
        vr = chunk._vector_rows(v, rows.shape[1])
        gram = chunk._per_position(kept, self.base.fisher_output_gram(rows, vr))  # (B, Lc, m, m)
        own = chunk._per_position(kept, self.base.pairwise_spread(rows, vr)).sum(1)
        d = torch.diagonal(gram, dim1=-2, dim2=-1)  # (B, Lc, m)
        before_d = _earlier(d, diagonals)
        cross = 2 * (gram * _earlier(gram, grams)).sum(1)
        cross += d.transpose(1, 2) @ before_d + before_d.transpose(1, 2) @ d
        return own + cross, gram.sum(1), d.sum(1)

    def score_quadratic_spread(self, o: Tensor, k: Tensor) -> Tensor:
        """``2 Σ_{s≠t} ‖T_st‖² + Σ_t Var[u_tᵀK_ttu_t]`` (``T = SᵀKS`` by pairs of positions, ``S`` the block-diagonal
        root of Λ): the variance of ``uᵀKu``, the positions' own variances and their pairs', every term ≥ 0."""
        rows, keep, t, diagonal_k = self._rooted(o, k)
        apart = ~torch.eye(self.length, dtype=torch.bool, device=o.device)  # pairs s ≠ t
        cross = 2 * ((t**2).sum((2, 4)) * apart).sum((1, 2))
        own = self._per_position(keep, self.base.score_quadratic_spread(rows, diagonal_k)).sum(1)
        return cross + own.to(cross.dtype)


def _earlier(values: Tensor, carried: Tensor | None = None) -> Tensor:
    """``carried + Σ_{s<t} values_s`` at each position ``t`` of dim 1: a cumulative sum shifted by one, not the
    cumulative sum less each term (which loses a term that its successors dwarf)."""
    if values.shape[1] == 1:  # one position (the chunk of large vectors): what came before it, no copy
        return torch.zeros_like(values) if carried is None else carried.unsqueeze(1)
    shifted = torch.cat([torch.zeros_like(values[:, :1]), values[:, :-1]], dim=1).cumsum(1)
    return shifted if carried is None else shifted + carried.unsqueeze(1)
