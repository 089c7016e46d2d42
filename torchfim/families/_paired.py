"""Shared moments for families with two outputs per label dimension, independent across dimensions.

Output layout: ``o = [θ₁ of dims 1..D, θ₂ of dims 1..D]``, two halves (``first, second =
out.chunk(2, dim=-1)`` reads them). The output score ``u`` splits the same way, and its components
for different label dimensions are independent, so every moment follows from the per-dimension
cumulants ``κ₂ = Λ_d``, ``κ₃``, ``κ₄`` of the pair ``(u_{θ₁,d}, u_{θ₂,d})``:

* ``E[u_a u_b u_c u_d] = Λ_ab Λ_cd + Λ_ac Λ_bd + Λ_ad Λ_bc + κ₄(a, b, c, d)``,
* ``E[u_a u_b u_c] = κ₃(a, b, c)``,

with ``κ₃``, ``κ₄`` zero unless every index belongs to one label dimension. A symmetric cumulant of
the pair depends only on how many of its indices point at ``θ₂``, so a family states order ``r`` as
``r + 1`` numbers (0, 1, …, r such indices).

These families are not canonical: ``−∇²_o log p(y|o) = Λ(o) + Σ_a u_a Γ_a`` depends on the label
through the score (``Γ`` constant here). ``E[u] = 0`` and ``E[uuᵀ] = E[−∇²_o log p] = Λ`` still
hold, which is all the Fisher ``JᵀΛJ``, the estimators ``score`` and ``hessian`` (the latter with
``Λ`` for the output curvature) and their variances use.
"""

from __future__ import annotations

import itertools
from abc import abstractmethod

import torch
from torch import Tensor

from .._identity import identity_like
from ..errors import TorchfimError, warn_user
from .base import Family, _top_eig_diag_plus_rank_one, _work_dtype
from .output_origin import half_operations

#: Final operations that make positive values, by autograd node.
_POSITIVE = {"ExpBackward0": "exp", "SoftplusBackward0": "softplus"}
LOG_HALF = (
    "torchfim: the {half} half of the model's outputs comes out of a final {op} (positive values), but the {family} "
    "family reads it as the {read}{hint}, so the Fisher would be that of another model; return the {op}'s input as "
    "the {read}, or the log of those values"
)


def _count_table(order: int, device: torch.device) -> Tensor:
    """For every index tuple in ``{0, 1}^order``, how many of its entries are 1 (shape ``(2,)*order``)."""
    counts = [sum(idx) for idx in itertools.product((0, 1), repeat=order)]
    return torch.tensor(counts, device=device).reshape((2,) * order)


def _per_dim_tensor(by_count: Tensor) -> Tensor:
    """Symmetric per-dimension cumulant ``(B, D, 2, …, 2)`` from its values by count ``(B, D, r + 1)``."""
    order = by_count.shape[-1] - 1
    return by_count[..., _count_table(order, by_count.device)]


def _embed(per_dim: Tensor) -> Tensor:
    """Scatter per-dimension blocks ``(B, D, 2, …, 2)`` into the dense ``(B, C, …, C)`` tensor, ``C = 2D``.

    Output index ``(i, d)`` (parameter slot ``i``, label dimension ``d``) is column ``i·D + d``.
    """
    n, dims, order = per_dim.shape[0], per_dim.shape[1], per_dim.dim() - 2
    eye = identity_like(dims, per_dim)
    letters = "ijkl"[:order]
    spread = "efgh"[: order - 1]
    spec = f"nd{letters}," + ",".join(f"d{e}" for e in spread) + "->n" + "".join(
        letter + dim for letter, dim in zip(letters, "d" + spread)
    )
    dense = torch.einsum(spec, per_dim, *([eye] * (order - 1)))
    return dense.reshape((n,) + (2 * dims,) * order)


def _pairs(v: Tensor) -> Tensor:
    """Output-space vectors ``(B, m, 2D)`` as ``(B, m, 2, D)``."""
    return v.reshape(v.shape[:-1] + (2, v.shape[-1] // 2))


class PairedFamily(Family):
    """A family with outputs ``[θ₁ (D), θ₂ (D)]`` and independent label dimensions (see module doc).

    Moments are computed in the outputs' dtype, widened to float32 for half precision, and returned
    in the promoted dtype of the arguments.
    """

    #: Whether ``−∇²_o log p(y|o)`` is free of ``y`` (false: see :meth:`output_hessian`).
    canonical = False
    #: Names of the two output halves, for messages.
    halves: tuple[str, str] = ("first parameter", "second parameter")
    #: ``Γ[a, i, j]``: ``−∇²_o log p = Λ + Σ_a u_a Γ_a`` within one label dimension (slots a, i, j ∈ {0, 1}).
    curvature_coupling: tuple[tuple[tuple[float, float], tuple[float, float]], ...] = ()
    #: Per half, whether it is read as the log of a positive quantity, and what to add to the warning when a
    #: final exp or softplus makes it that quantity instead (:meth:`check_output`).
    log_halves: tuple[bool, bool] = (False, False)
    log_half_hint: str = ""

    # ----------------------------------------------------------------- checks
    def check_output(self, o: Tensor) -> None:
        """As :meth:`Family.check_output`, and a warning for a half read as a log that comes out of a final exp
        or softplus (:func:`.output_origin.half_operations`): positive values, misread as their log."""
        super().check_output(o)
        for k, operation in enumerate(half_operations(o, through_shifts=True) or ()):  # positive + 1e-6 too
            op = _POSITIVE.get(operation or "")
            if op is not None and self.log_halves[k]:
                warn_user(LOG_HALF.format(half=("first", "second")[k], op=op, family=self.name,
                                          read=self.halves[k], hint=self.log_half_hint))

    def _width_hint(self) -> str:
        return f"2·D: the D {self.halves[0]}s, then the D {self.halves[1]}s"

    def _check_width(self, width: int) -> None:
        if width < 2 or width % 2:
            raise TorchfimError(
                f"family {self.name!r} expects an even number of outputs per input, shape (batch, 2·D): "
                f"the D {self.halves[0]}s, then the D {self.halves[1]}s (torch.cat([first, second], dim=-1)); "
                f"got {width} outputs"
            )

    def _label_shape(self, o: Tensor) -> tuple[int, ...]:
        return (o.shape[1] // 2,)

    # ------------------------------------------------------------ cumulants
    @abstractmethod
    def cumulants_by_count(self, o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-dimension cumulants of the score pair by number of ``θ₂`` indices.

        Shapes ``(B, D, 3)``, ``(B, D, 4)``, ``(B, D, 5)`` for orders 2, 3, 4, in ``o``'s work dtype
        (float32 for half-precision outputs).
        """

    def _blocks(self, o: Tensor, *vectors: Tensor) -> tuple[list[Tensor], list[Tensor], torch.dtype]:
        """Per-dimension ``[Λ_d, κ₃, κ₄]`` tensors, ``vectors`` as ``(B, m, 2, D)`` in the work dtype, out dtype."""
        work, out = _work_dtype(o, *vectors)
        cumulants = [_per_dim_tensor(c.to(work)) for c in self.cumulants_by_count(o)]
        return cumulants, [_pairs(v.to(work)) for v in vectors], out

    def fisher_output(self, o: Tensor) -> Tensor:
        return _embed(_per_dim_tensor(self.cumulants_by_count(o)[0])).to(o.dtype)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        # Per dimension, the lower Cholesky factor of [[a, b], [b, c]].
        k2 = self.cumulants_by_count(o)[0]
        a, b, c = k2.unbind(-1)
        root_a = a.clamp_min(0).sqrt()
        lower = torch.where(root_a > 0, b / root_a.clamp_min(torch.finfo(k2.dtype).tiny), torch.zeros_like(b))
        factor = torch.stack([root_a, torch.zeros_like(a), lower, (c - lower**2).clamp_min(0).sqrt()], -1)
        return _embed(factor.reshape(k2.shape[:2] + (2, 2))).to(o.dtype)

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        (lam, _, _), (v2, w2), out = self._blocks(o, v, w)
        return torch.einsum("ndij,nmid,nmjd->nm", lam, v2, w2).to(out)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        (lam, _, _), (v2,), out = self._blocks(o, v)
        return torch.einsum("ndij,npid,nqjd->npq", lam, v2, v2).to(out)

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        a, b, c = self.cumulants_by_count(o)[0].unbind(-1)
        # hypot: ((a − c)/2)² overflowed float32 from a precision of about 1e19 (log-variance −44)
        return ((a + c) / 2 + torch.hypot((a - c) / 2, b)).amax(-1).to(o.dtype)

    def third_moment(self, o: Tensor) -> Tensor:
        return _embed(_per_dim_tensor(self.cumulants_by_count(o)[1])).to(o.dtype)

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        (_, k3, _), (a2, b2, c2), out = self._blocks(o, a, b, c)
        return torch.einsum("ndijk,nmid,nmjd,nmkd->nm", k3, a2, b2, c2).to(out)

    def fourth_moment(self, o: Tensor) -> Tensor:
        (lam, _, k4), _, _ = self._blocks(o)
        lam = _embed(lam)
        gauss = (
            torch.einsum("nab,ncd->nabcd", lam, lam)
            + torch.einsum("nac,nbd->nabcd", lam, lam)
            + torch.einsum("nad,nbc->nabcd", lam, lam)
        )
        return (gauss + _embed(k4)).to(o.dtype)

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        (lam, _, k4), (v2, w2), out = self._blocks(o, v, w)
        vv = torch.einsum("ndij,nmid,nmjd->nm", lam, v2, v2)
        ww = torch.einsum("ndij,nmid,nmjd->nm", lam, w2, w2)
        vw = torch.einsum("ndij,nmid,nmjd->nm", lam, v2, w2)
        cumulant = torch.einsum("ndijkl,nmid,nmjd,nmkd,nmld->nm", k4, v2, v2, w2, w2)
        return (vv * ww + 2 * vw**2 + cumulant).to(out)

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.fisher_output_bilinear(o, v, v), self.moment4(o, v, v)

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        (lam, _, k4), (v2,), out = self._blocks(o, v)
        gram = torch.einsum("ndij,npid,nqjd->npq", lam, v2, v2)
        along = torch.diagonal(gram, dim1=-2, dim2=-1)
        outer = torch.einsum("nmid,nmjd->nmdij", v2, v2)
        cumulant = torch.einsum("ndijkl,npdij,nqdkl->npq", k4, outer, outer)
        return (along.unsqueeze(-1) * along.unsqueeze(-2) + 2 * gram**2 + cumulant).to(out)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        trace, spread, out = self._quadratic_parts(o, k)
        return (trace**2 + spread).to(out)

    def score_quadratic_spread(self, o: Tensor, k: Tensor) -> Tensor:
        """``Var[uᵀKu] = 2 tr(ΛKΛK) + κ₄[K, K]``, the fourth cumulant's part per label dimension: as
        :meth:`quadratic_moment` less ``(tr ΛK)²`` it lost about ``log₁₀(C/2)`` digits (2.4e-4 off in float32 for a
        gamma model of 3000 outputs)."""
        _, spread, out = self._quadratic_parts(o, k)
        return spread.to(out)

    def _quadratic_parts(self, o: Tensor, k: Tensor) -> tuple[Tensor, Tensor, torch.dtype]:
        """``tr ΛK`` and ``2 tr(ΛKΛK) + κ₄[K, K]`` per input (``E[(uᵀKu)²]`` is the first squared plus the second),
        in the work dtype, and the output dtype."""
        (lam, _, k4), _, out = self._blocks(o, k)
        k = k.to(lam.dtype)
        kl = k @ _embed(lam)
        dims = k.shape[-1] // 2
        within = torch.diagonal(k.reshape(k.shape[0], 2, dims, 2, dims), dim1=2, dim2=4)  # (B, 2, 2, D)
        cumulant = torch.einsum("ndijkl,nijd,nkld->n", k4, within, within)
        return torch.einsum("naa->n", kl), 2 * torch.einsum("nab,nba->n", kl, kl) + cumulant, out

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """Exact ``λ_max(M)`` in ``O(D)`` per input, ``M = E[vec(uuᵀ) vec(uuᵀ)ᵀ]``.

        ``M`` vanishes on antisymmetric ``X`` and splits the symmetric ones into (i) the blocks
        ``X_de`` between two label dimensions, where it acts as ``2Λ_d X_de Λ_e`` (eigenvalues
        ``2μ(Λ_d)μ(Λ_e)``), and (ii) the diagonal blocks, where it is ``blockdiag(K_d) + vvᵀ`` with
        ``K_d[(ij),(kl)] = Λ_ik Λ_jl + Λ_il Λ_jk + κ₄(ijkl) = Cov(vec u_d u_dᵀ) ⪰ 0`` and
        ``v = (vec Λ_1, …, vec Λ_D)``. Part (ii) has an eigenvalue ``≥ ‖v‖² ≥ μ_d² + μ_e²``, so it
        holds the maximum: the top eigenvalue of a diagonal plus rank one, after diagonalising each
        4×4 ``K_d``.
        """
        (lam, _, k4), _, _ = self._blocks(o)
        lam, k4 = lam.double(), k4.double()
        n, dims = lam.shape[:2]
        within = torch.einsum("ndik,ndjl->ndijkl", lam, lam) + torch.einsum("ndil,ndjk->ndijkl", lam, lam) + k4
        if not bool(torch.isfinite(within).all()):  # eigh would fail from inside torch ("failed to converge")
            raise TorchfimError(
                f"the fourth moments of the {self.name!r} family's scores overflowed float64 at these outputs (the "
                "variance or shape parameter is beyond e^±350 or so), so the Î1 bound has no finite value; check the "
                "model's largest outputs and rescale the output layer"
            )
        evals, evecs = torch.linalg.eigh(within.reshape(n, dims, 4, 4))
        z = torch.einsum("ndab,nda->ndb", evecs, lam.reshape(n, dims, 4))
        return _top_eig_diag_plus_rank_one(evals.reshape(n, 4 * dims), z.reshape(n, 4 * dims)).to(o.dtype)

    # ------------------------------------------------------- label curvature
    def score_curvature(self, o: Tensor) -> Tensor:
        """``Γ`` (B, C, C, C) with ``−∇²_o log p(y|o) = Λ(o) + Σ_a u_a(y) Γ[:, a]``.

        Zero for canonical families. With it the negative Hessian of ``log p`` in θ is
        ``JᵀΛJ − Σ_a u_a (∇²_θ o_a − Jᵀ Γ_a J)``.
        """
        gamma = torch.tensor(self.curvature_coupling, dtype=o.dtype, device=o.device)  # (2, 2, 2)
        return _embed(gamma.expand(o.shape[0], o.shape[1] // 2, 2, 2, 2).contiguous())

    def output_hessian(self, y: Tensor, o: Tensor) -> Tensor:
        """``−∇²_o log p(y|o)`` per label, shape ``(*y's leading dims, C, C)``; its mean over ``y`` is ``Λ``."""
        c = o.shape[1]
        lam = self._align(y, self.fisher_output(o).flatten(1))
        gamma = self._align(y, self.score_curvature(o).flatten(1))
        u = self.output_score(y, o)
        curvature = torch.einsum("...a,...abc->...bc", u, gamma.reshape(gamma.shape[:-1] + (c, c, c)))
        return lam.reshape(lam.shape[:-1] + (c, c)) + curvature
