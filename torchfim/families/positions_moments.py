"""The fourth and third moments of outputs with positions (:class:`~torchfim.families.positions.Positions`): each
position's own moment (its cumulant) on the position diagonal, plus the Gaussian pairing of the summed second
moments (Isserlis' formula), as the identities of :mod:`torchfim.families.positions` give them. The structure-aware
contractions (``moment4``, ``moments_along``, ``pairwise_moment4``, ``quadratic_moment``, ``moment3``) never build the
dense ``(B, L·C, …)`` tensors that ``fourth_moment`` and ``third_moment`` return (refused above
:data:`DENSE_MOMENT_LIMIT` entries)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError
from .base import Family, _isserlis

#: Entries a dense moment tensor (``fourth_moment``, ``third_moment``) may have in all.
DENSE_MOMENT_LIMIT = 1 << 26


class PositionMoments:
    """The fourth and third moments of :class:`~torchfim.families.positions.Positions` (a base class of it, which
    sets the attributes below and the per-position helpers ``_rows``, ``_vector_rows``, ``_per_position`` and
    ``_accumulate``, and ``fisher_output``)."""

    base: Family
    length: int

    # ------------------------------------------------------------ fourth moments
    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``Σ_t (E[a_t²b_t²] − X_tY_t − 2Z_t²) + (Σ X)(Σ Y) + 2(Σ Z)²`` with ``X_t = v_tᵀΛ_tv_t``,
        ``Y_t = w_tᵀΛ_tw_t``, ``Z_t = v_tᵀΛ_tw_t``."""
        rows, keep = self._rows(o)
        c = rows.shape[1]
        vr, wr = self._vector_rows(v, c), self._vector_rows(w, c)
        x = self._per_position(keep, self.base.fisher_output_bilinear(rows, vr, vr))
        y = self._per_position(keep, self.base.fisher_output_bilinear(rows, wr, wr))
        z = self._per_position(keep, self.base.fisher_output_bilinear(rows, vr, wr))
        m4 = self._per_position(keep, self.base.moment4(rows, vr, wr))
        cumulant = (m4 - x * y - 2 * z**2).sum(1)
        return cumulant + x.sum(1) * y.sum(1) + 2 * z.sum(1) ** 2

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``Σ_t X_t`` and ``Σ_t (E[a_t⁴] − 3X_t²) + 3(Σ_t X_t)²``, ``X_t = v_tᵀΛ_tv_t``."""
        rows, keep = self._rows(o)
        second, fourth = self.base.moments_along(rows, self._vector_rows(v, rows.shape[1]))
        second, fourth = self._per_position(keep, second), self._per_position(keep, fourth)
        total = second.sum(1)
        return total, (fourth - 3 * second**2).sum(1) + 3 * total**2

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        """``Σ_t (P_t − s_t s_tᵀ − 2G_t∘G_t) + d dᵀ + 2 G∘G`` with ``P_t`` the base pairwise moment,
        ``G_t = V_tΛ_tV_tᵀ``, ``s_t = diag G_t``, ``G = Σ_t G_t``, ``d = diag G``."""

        def cumulant_and_gram(rows: Tensor, vr: Tensor) -> Tensor:
            gram = self.base.fisher_output_gram(rows, vr)
            along = torch.diagonal(gram, dim1=-2, dim2=-1)
            pairwise = self.base.pairwise_moment4(rows, vr)
            cumulant = pairwise - along.unsqueeze(-1) * along.unsqueeze(-2) - 2 * gram**2
            return torch.cat([cumulant, gram], dim=-1)

        both = self._accumulate(o, v, cumulant_and_gram)
        m = v.shape[1]
        cumulant, gram = both[..., :m], both[..., m:]
        along = torch.diagonal(gram, dim1=-2, dim2=-1)
        return cumulant + along.unsqueeze(-1) * along.unsqueeze(-2) + 2 * gram**2

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        """``(tr T)² + 2‖T‖² + Σ_t [base E[(u_tᵀK_ttu_t)²] − (tr T_tt)² − 2‖T_tt‖²]`` with
        ``T = SᵀKS`` (``S`` the block-diagonal root, ``tr ΛK = tr T``, ``tr ΛKΛK = ‖T‖²_F``)."""
        rows, keep, t, diagonal_k = self._rooted(o, k)
        gauss = torch.einsum("btjtj->b", t) ** 2 + 2 * (t**2).sum((1, 2, 3, 4))
        idx = torch.arange(self.length, device=o.device)
        own = t[:, idx, :, idx, :].transpose(0, 1)  # (B, L, r, r): T_tt
        own_gauss = torch.einsum("btjj->bt", own) ** 2 + 2 * (own**2).sum((2, 3))
        exact = self._per_position(keep, self.base.quadratic_moment(rows, diagonal_k))
        return gauss + (exact - own_gauss.to(exact.dtype)).sum(1)

    def _rooted(self, o: Tensor, k: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The rows and mask of :meth:`_rows`, ``T = SᵀKS`` by pairs of positions ``(B, L, r, L, r)`` and the
        diagonal blocks ``K_tt`` ``(B·L, C, C)`` of ``K`` (B, L·C, L·C)."""
        rows, keep = self._rows(o)
        b, n, c = o.shape[0], self.length, rows.shape[1]
        roots = self._per_position(keep, self.base.fisher_output_sqrt(rows))  # (B, L, C, r)
        blocks = k.reshape(b, n, c, n, c)
        t = torch.einsum("btaj,btasc,bsck->btjsk", roots, blocks.to(roots.dtype), roots)
        idx = torch.arange(n, device=o.device)
        diagonal_k = blocks[:, idx, :, idx, :].transpose(0, 1).reshape(b * n, c, c)
        return rows, keep, t, diagonal_k

    def _check_dense(self, o: Tensor, order: int, what: str) -> None:
        size = o.shape[0] * o.shape[1] ** order
        if size > DENSE_MOMENT_LIMIT:
            raise TorchfimError(
                f"Positions.{what} would build a dense (B, L·C)^{order} tensor of {size:.3g} entries "
                f"(limit {DENSE_MOMENT_LIMIT:.3g}); use the structure-aware moment4, moments_along, "
                "pairwise_moment4, quadratic_moment or moment3 instead"
            )

    def _embed_diagonal(self, full: Tensor, per: Tensor, order: int) -> Tensor:
        """Add per-position ``(B, L, C, …, C)`` tensors of ``order`` indices on the ``t = s = …``
        diagonal of a dense ``(B, L·C, …, L·C)`` tensor."""
        b, n, c = per.shape[0], self.length, per.shape[2]
        view = full.view(b, *(n, c) * order)
        idx = torch.arange(n, device=full.device)
        index = (slice(None),) + (idx, slice(None)) * order
        view[index] += per.transpose(0, 1)
        return full

    def fourth_moment(self, o: Tensor) -> Tensor:
        """``Isserlis(Λ) + Σ_t (M4_t − Isserlis(Λ_t))`` on the position diagonal, dense (B, (L·C)⁴)."""
        self._check_dense(o, 4, "fourth_moment")
        rows, keep = self._rows(o)
        cumulant = self.base.fourth_moment(rows) - _isserlis(self.base.fisher_output(rows))
        return self._embed_diagonal(_isserlis(self.fisher_output(o)), self._per_position(keep, cumulant), 4)

    # ------------------------------------------------------------ third moments
    def third_moment(self, o: Tensor) -> Tensor:
        """``E[u_I u_J u_K]``: the base third moments on the position diagonal, dense (B, (L·C)³)."""
        self._check_dense(o, 3, "third_moment")
        rows, keep = self._rows(o)
        per = self._per_position(keep, self.base.third_moment(rows))
        width = o.shape[1]
        full = torch.zeros(o.shape[0], width, width, width, dtype=per.dtype, device=o.device)
        return self._embed_diagonal(full, per, 3)

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """``Σ_t E[(u_tᵀa_t)(u_tᵀb_t)(u_tᵀc_t)]``."""
        rows, keep = self._rows(o)
        width = rows.shape[1]
        a, b, c = (self._vector_rows(x, width) for x in (a, b, c))
        return self._per_position(keep, self.base.moment3(rows, a, b, c)).sum(1)
