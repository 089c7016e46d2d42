"""The spectral constants of the Î1 bounds for outputs with positions (:class:`~torchfim.families.positions.Positions`):
the largest eigenvalues of the output Fisher and of the fourth moment, from the base family's per position."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Family, _top_eig_diag_plus_rank_one

#: Entries per work chunk of per-position (m × m) results and of per-position ``Λ_t``.
CHUNK_ELEMENTS = 1 << 24


class PositionSpectra:
    """The top eigenvalues of :class:`~torchfim.families.positions.Positions` (a base class of it, which sets the
    attributes below and the per-position helpers ``_rows`` and ``_per_position``)."""

    base: Family
    length: int
    #: Largest flat width ``L·C`` for which :meth:`fourth_moment_top_eigenvalue` is exact (dense).
    dense_top_width = 12

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``max_t λ_max(Λ_t)`` over observed positions (0 if none)."""
        rows, keep = self._rows(o)
        return self._per_position(keep, self.base.fisher_output_top_eigenvalue(rows)).amax(1)

    def _fisher_norms(self, rows: Tensor, tops: Tensor) -> Tensor:
        """``‖Λ_t‖_F`` per row, from ``base.fisher_output`` in chunks; where ``C²`` entries per row are
        too many, the upper bound ``‖Λ_t‖²_F ≤ λ_max(M_t)`` (``tops``) instead (see below)."""
        c = rows.shape[1]
        if c * c > CHUNK_ELEMENTS:
            return tops.to(torch.float64).clamp_min(0).sqrt()
        span = max(1, CHUNK_ELEMENTS // (c * c))
        parts = [self.base.fisher_output(part).to(torch.float64).square().sum((1, 2)) for part in rows.split(span)]
        return torch.cat(parts).sqrt()

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(M)``, ``M = E[vec(uuᵀ)vec(uuᵀ)ᵀ]``: exact (dense) for ``L·C ≤ dense_top_width``,
        else the upper bound ``max(max_t μ_t + ρ(hhᵀ − diag h²), 2 λ_(1) λ_(2))``.

        Here ``μ_t = λ_max(M_t)`` and ``λ_t = λ_max(Λ_t)`` per observed position (``λ_(1) ≥ λ_(2)`` the
        two largest), ``h_t = ‖Λ_t‖_F`` and ``ρ`` the top eigenvalue. Why: for symmetric ``X`` split
        ``uᵀXu = D + O`` into position-diagonal blocks ``D = Σ_t u_tᵀX_ttu_t`` and the rest ``O``;
        ``E[DO] = 0``, ``E[O²] = 2Σ_{t≠s} tr(Λ_tX_tsΛ_sX_st) ≤ 2λ_(1)λ_(2)‖X_off‖²`` and
        ``E[D²] = Σ_t x_tᵀM_tx_t + Σ_{t≠s}(tr Λ_tX_tt)(tr Λ_sX_ss) ≤ (max μ + ρ(hhᵀ − diag h²))‖X_diag‖²``
        (``|tr Λ_tX_tt| ≤ h_t‖X_tt‖``). With one observed position the bound is exact. Where
        ``C²`` is too large to form ``Λ_t``, ``h_t = √μ_t`` (valid: ``‖Λ_t‖²_F ≤ μ_t`` by the Rayleigh
        quotient of ``M_t`` at ``vec Λ_t``, and ``ρ`` grows with ``h``).
        """
        if o.shape[1] <= self.dense_top_width:
            return super().fourth_moment_top_eigenvalue(o)
        rows, keep = self._rows(o)
        mu = self._per_position(keep, self.base.fourth_moment_top_eigenvalue(rows).to(torch.float64))
        lam = self._per_position(keep, self.base.fisher_output_top_eigenvalue(rows).to(torch.float64))
        norms = self._per_position(keep, self._fisher_norms(rows, mu.reshape(-1)))
        coupling = _top_eig_diag_plus_rank_one(-(norms**2), norms)
        diagonal_part = mu.amax(1) + coupling
        top_two = lam.topk(min(2, self.length), dim=1).values
        off_part = 2 * top_two.prod(1) if self.length > 1 else torch.zeros_like(diagonal_part)
        return torch.maximum(diagonal_part, off_part).to(o.dtype)



__all__ = ["CHUNK_ELEMENTS", "PositionSpectra"]
