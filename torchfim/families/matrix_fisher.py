"""The matrix Fisher family on SO(3): a 3×3 matrix per input, rotation labels."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError, warn_user
from .base import Family, _to_generator_device, _work_dtype
from .matrix_fisher_normaliser import matrix_fisher_moments, proper_svd

_MAX_REJECTION_ROUNDS = 10_000
# Largest singular value of A up to which the moments hold to ~1e-15 relative (a rotated A = s·UVᵀ
# against its principal frame: 1.5e-15 at 1e13, 2.7e-3 at 1e14, 0.79 at 1e15); and beyond which they are NaN
# (first seen at 3e17).
ACCURATE_SINGULAR_VALUE = 1e13
FINITE_SINGULAR_VALUE = 1e17
_TOO_LARGE = (
    "the matrix Fisher outputs A have a singular value of {size:.3g}; {what} above {limit:.0e}, where the law is "
    "concentrated within 1/√s of a rotation; keep A's scale below that (e.g. clamp or rescale the model's "
    "concentration output)"
)


def _batch_first(x: Tensor, in_dim: int | None, batch_size: int) -> Tensor:
    """A vmapped argument with its vmap dimension first and merged into the batch: ``(V·B, …)``."""
    x = x.unsqueeze(0).expand((batch_size,) + x.shape) if in_dim is None else x.movedim(in_dim, 0)
    return x.reshape((-1,) + x.shape[2:])


class _CovarianceProduct(torch.autograd.Function):
    """``(A, g) ↦ Cov(vec R) g``: the derivative of :class:`_MeanRotation` (not differentiable further)."""

    @staticmethod
    def forward(a: Tensor, grad: Tensor) -> Tensor:  # type: ignore[override]
        cov = matrix_fisher_moments(a, 2).cov.to(grad.dtype)
        return torch.einsum("nxy,ny->nx", cov, grad)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        pass

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[None, None]:  # type: ignore[override]
        raise TorchfimError("matrix_fisher log_prob is differentiable twice in its outputs, not three times")

    @staticmethod
    def vmap(info, in_dims, a: Tensor, grad: Tensor):  # type: ignore[override]
        flat_a, flat_g = (_batch_first(t, d, info.batch_size) for t, d in zip((a, grad), in_dims))
        out = _CovarianceProduct.apply(flat_a, flat_g)
        return out.reshape((info.batch_size, -1) + out.shape[1:]), 0


class _MeanRotation(torch.autograd.Function):
    """``A ↦ E[vec R] = ∇_A log c(A)``; its derivative is ``Cov(vec R)`` (symmetric)."""

    @staticmethod
    def forward(a: Tensor) -> Tensor:  # type: ignore[override]
        return matrix_fisher_moments(a, 1).mean.to(a.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return _CovarianceProduct.apply(a, grad)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return _CovarianceProduct.apply(a, tangent)

    @staticmethod
    def vmap(info, in_dims, a: Tensor):  # type: ignore[override]
        out = _MeanRotation.apply(_batch_first(a, in_dims[0], info.batch_size))
        return out.reshape((info.batch_size, -1) + out.shape[1:]), 0


class _LogNormaliser(torch.autograd.Function):
    """``A ↦ log c(A)``; gradient ``E[vec R]``, itself differentiable once (so Hessians work).

    Each of these functions has a ``vmap`` rule (merge the vmapped dimension into the batch), so
    ``log_prob`` and ``output_score`` work under ``torch.func`` transforms too.
    """

    @staticmethod
    def forward(a: Tensor) -> Tensor:  # type: ignore[override]
        return matrix_fisher_moments(a, 1).log_normaliser.to(a.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return grad.unsqueeze(-1) * _MeanRotation.apply(a)

    @staticmethod
    def jvp(ctx, tangent: Tensor) -> Tensor:  # type: ignore[override]
        (a,) = ctx.saved_tensors
        return (_MeanRotation.apply(a) * tangent).sum(-1)

    @staticmethod
    def vmap(info, in_dims, a: Tensor):  # type: ignore[override]
        out = _LogNormaliser.apply(_batch_first(a, in_dims[0], info.batch_size))
        return out.reshape((info.batch_size, -1) + out.shape[1:]), 0


def quaternion_to_rotation(q: Tensor) -> Tensor:
    """Rotation matrices (…, 3, 3) of unit quaternions ``q = (w, x, y, z)`` (…, 4)."""
    w, x, y, z = q.unbind(-1)
    rows = [
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ]
    return torch.stack([torch.stack(row, -1) for row in rows], -2)


def _acg_parameter(lam: Tensor) -> Tensor:
    """Root ``b ∈ [1, 4]`` of ``Σₖ 1/(b + 2λₖ) = 1`` (Kent, Ganeiber & Mardia's envelope choice), by bisection."""
    lo, hi = torch.ones_like(lam[..., 0]), torch.full_like(lam[..., 0], 4.0)
    for _ in range(60):
        mid = (lo + hi) / 2
        above = (1.0 / (mid.unsqueeze(-1) + 2 * lam)).sum(-1) > 1
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return (lo + hi) / 2


def sample_bingham(lam: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """``k`` unit quaternions per row from ``p(q) ∝ exp(−Σₖ λₖ qₖ²)``, ``λ`` (B, 4) ≥ 0, float64.

    Rejection from an angular central Gaussian envelope ``ACG(Ω)``, ``Ω = I + 2 diag(λ)/b`` (Kent,
    Ganeiber & Mardia 2018): propose ``y = z/‖z‖``, ``z ~ N(0, Ω⁻¹)``, accept with probability
    ``exp(−yᵀΛy)(yᵀΩy)² / M``, ``M = e^{−(4−b)/2}(4/b)²``. All randomness comes from ``generator``;
    each round draws for the pending slots only, in a fixed order, so results are reproducible.
    """
    b = _acg_parameter(lam)
    scale = (1 + 2 * lam / b.unsqueeze(-1)).rsqrt()  # Ω^{-1/2}
    log_bound = -(4 - b) / 2 + 2 * torch.log(4 / b)
    flat_scale = scale.repeat_interleave(k, 0)
    flat_lam, flat_b = lam.repeat_interleave(k, 0), b.repeat_interleave(k, 0)
    flat_bound = log_bound.repeat_interleave(k, 0)
    out = torch.zeros_like(flat_scale)
    pending = torch.arange(out.shape[0], device=lam.device)
    for _ in range(_MAX_REJECTION_ROUNDS):
        if pending.numel() == 0:
            return out.reshape(lam.shape[0], k, 4)
        z = torch.randn((pending.numel(), 4), generator=generator, dtype=lam.dtype, device=lam.device)
        y = z * flat_scale[pending]
        y = y / y.norm(dim=-1, keepdim=True)
        quad = (flat_lam[pending] * y**2).sum(-1)
        log_ratio = -quad + 2 * torch.log1p(2 * quad / flat_b[pending]) - flat_bound[pending]
        uniform = torch.rand(pending.numel(), generator=generator, dtype=lam.dtype, device=lam.device)
        accept = torch.log(uniform) <= log_ratio
        out[pending[accept]] = y[accept]
        pending = pending[~accept]
    raise TorchfimError("matrix_fisher sampling did not finish; the outputs may be non-finite or astronomically large")


class MatrixFisher(Family):
    """Matrix Fisher distribution on SO(3): ``p(R | A) = exp(tr(AᵀR)) / c(A)`` (Haar measure).

    Outputs ``o`` (B, 9) are ``A ∈ R³ˣ³`` flattened row-major (``A = o.reshape(-1, 3, 3)``); labels
    are rotation matrices ``R`` (B, 3, 3), samples (B, k, 3, 3). ``log p`` is the density against
    the Haar probability measure (so ``log p = 0`` everywhere for ``A = 0``).

    A canonical exponential family with sufficient statistic ``vec R``:

    * score ``u = vec R − E[vec R]``, ``E[vec R] = ∇_A log c = vec(U diag(d) Vᵀ)`` in the proper
      SVD ``A = U S Vᵀ``;
    * ``Λ = Cov(vec R) = ∇²_A log c``, free of ``R``;
    * third and fourth moments of ``u`` from the Bingham moments of ``R``'s quaternion.

    ``c`` and every moment come from a one-dimensional integral evaluated by graded Gauss–Legendre
    quadrature in float64 (:mod:`torchfim.families.matrix_fisher_normaliser`); results are cast to
    ``o``'s dtype; they hold to ~1e-15 relative for singular values of ``A`` up to 1e13 (a warning
    above, a :class:`TorchfimError` above 1e17, where they are NaN). Sampling uses rejection from an angular central Gaussian envelope on the
    quaternion sphere (Kent et al. 2018, as Mohlin et al. 2020 do), drawing only from the generator.
    :meth:`log_prob` is differentiable twice in ``o``.

    Example:
        >>> import torch
        >>> fam = MatrixFisher()
        >>> o = 5 * torch.eye(3, dtype=torch.float64).reshape(1, 9)
        >>> R = fam.sample(o, 2, torch.Generator().manual_seed(0))
        >>> R.shape, fam.fisher_output(o).shape
        (torch.Size([1, 2, 3, 3]), torch.Size([1, 9, 9]))
        >>> torch.allclose(R @ R.transpose(-1, -2), torch.eye(3, dtype=torch.float64).expand(1, 2, 3, 3))
        True
    """

    name = "matrix_fisher"
    label_ndim = 2
    #: The outputs per input, as one vector (a (batch, 3, 3) A is named with this fix by
    #: :class:`~torchfim.families.Positions`).
    whole_width = 9
    canonical = True

    def _width_hint(self) -> str:
        return "9"

    def _check_width(self, width: int) -> None:
        if width != 9:
            raise TorchfimError(
                f"family 'matrix_fisher' expects 9 outputs per input, shape (batch, 9): the 3×3 matrix A "
                f"flattened row-major (A.reshape(batch, 9)); got {width} outputs"
            )

    def _label_shape(self, o: Tensor) -> tuple[int, ...]:
        return (3, 3)

    def _largest_singular_value(self, o: Tensor) -> float:
        """The largest singular value of any ``A`` in ``o``, less its SVD's rounding (A = 1e13·R reads as 1e13)."""
        if not o.shape[0]:
            return 0.0
        return float(torch.linalg.svdvals(o.detach().double().reshape(-1, 3, 3))[:, 0].max()) * (1 - 1e-12)

    def _unusable_values(self, o: Tensor) -> str | None:
        if (message := super()._unusable_values(o)) is not None:
            return message
        size = self._largest_singular_value(o)
        if size > FINITE_SINGULAR_VALUE:
            return "torchfim: " + _TOO_LARGE.format(size=size, what="its moments are not finite", limit=FINITE_SINGULAR_VALUE)
        return None

    def check_output(self, o: Tensor) -> None:
        """As :meth:`Family.check_output`; refused above a singular value of 1e17 (NaN moments), and a warning
        above 1e13, where the moments lose digits (relative error 2.7e-3 at 1e14)."""
        super().check_output(o)
        size = self._largest_singular_value(o)
        if size > ACCURATE_SINGULAR_VALUE:
            what = "the Fisher and its moments lose accuracy (relative error 2.7e-3 at 1e14, 0.8 at 1e15)"
            warn_user("torchfim: " + _TOO_LARGE.format(size=size, what=what, limit=ACCURATE_SINGULAR_VALUE))

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        y = super().check_targets(y, o)
        y64 = y.double()
        tol = 1e-5 if y.dtype == torch.float64 else 1e-3
        orth = (y64 @ y64.transpose(-1, -2) - torch.eye(3, dtype=torch.float64, device=y.device)).abs().amax((-1, -2))
        det = torch.linalg.det(y64)
        if y.shape[0] and (bool((orth > tol).any()) or bool(((det - 1).abs() > tol).any())):
            raise TorchfimError(
                "matrix_fisher targets must be rotation matrices (RᵀR = I, det R = +1), got a matrix off "
                f"SO(3) by {float(orth.max()):.2g} (det {float(det[(det - 1).abs().argmax()]):.3g}); "
                "orthonormalise them (e.g. by SVD, flipping a column if det = −1)"
            )
        return y

    def _filler_label(self, o: Tensor) -> Tensor:
        return torch.eye(3, dtype=_work_dtype(o)[0], device=o.device).expand(o.shape[0], 3, 3)

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        a = _to_generator_device(o.detach().double(), generator).reshape(-1, 3, 3)
        u, s, v = proper_svd(a)
        s1, s2, s3 = s.unbind(-1)
        # exp(tr(S Q)) ∝ exp(−Σ λₖ qₖ²) with λ = b₀ − b, b the Bingham exponents of S.
        lam = 2 * torch.stack([torch.zeros_like(s1), s2 + s3, s1 + s3, s1 + s2], -1).clamp_min(0)
        q = quaternion_to_rotation(sample_bingham(lam, k, generator))
        rotations = u.unsqueeze(1) @ q @ v.transpose(-1, -2).unsqueeze(1)
        return rotations.to(device=o.device, dtype=_work_dtype(o)[0])

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        work = _work_dtype(o, y)[0]
        flat = y.to(work).reshape(y.shape[:-2] + (9,))
        return (flat - self._align(y, _MeanRotation.apply(o.to(work)))).to(o.dtype)

    # Moments are computed in float64 and contracted in the arguments' work dtype (float32 or wider).
    def _moment(self, o: Tensor, order: int, *vectors: Tensor) -> tuple[Tensor, list[Tensor], torch.dtype]:
        """The order-``order`` central moment tensor of ``u``, ``vectors`` cast alike, and the result dtype."""
        work, out = _work_dtype(o, *vectors)
        moments = matrix_fisher_moments(o, order)
        tensor = (moments.cov, moments.third, moments.fourth)[order - 2]
        return tensor.to(work), [v.to(work) for v in vectors], out

    def fisher_output(self, o: Tensor) -> Tensor:
        return matrix_fisher_moments(o, 2).cov.to(o.dtype)

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        cov, (v, w), out = self._moment(o, 2, v, w)
        return torch.einsum("nma,nab,nmb->nm", v, cov, w).to(out)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        cov, (v,), out = self._moment(o, 2, v)
        return torch.einsum("npa,nab,nqb->npq", v, cov, v).to(out)

    def third_moment(self, o: Tensor) -> Tensor:
        return matrix_fisher_moments(o, 3).third.to(o.dtype)

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        third, (a, b, c), out = self._moment(o, 3, a, b, c)
        return torch.einsum("nxyz,nmx,nmy,nmz->nm", third, a, b, c).to(out)

    def fourth_moment(self, o: Tensor) -> Tensor:
        return matrix_fisher_moments(o, 4).fourth.to(o.dtype)

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        fourth, (v, w), out = self._moment(o, 4, v, w)
        return torch.einsum("nabcd,nma,nmb,nmc,nmd->nm", fourth, v, v, w, w).to(out)

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.fisher_output_bilinear(o, v, v), self.moment4(o, v, v)

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        fourth, (v,), out = self._moment(o, 4, v)
        return torch.einsum("nabcd,npa,npb,nqc,nqd->npq", fourth, v, v, v, v).to(out)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        fourth, (k,), out = self._moment(o, 4, k)
        return torch.einsum("nabcd,nab,ncd->n", fourth, k, k).to(out)

    def score_quadratic_spread(self, o: Tensor, k: Tensor) -> Tensor:
        """``Var[uᵀKu]``, in float64, with ``K = cI + K₀`` (``c = tr K / 9``): as ``‖vec R‖² = 3``,
        ``uᵀu = 3 − ‖m‖² − 2mᵀu`` (``m = E[vec R]``), so ``Var[uᵀKu] = 4c² mᵀΛm − 4c E[(mᵀu)(uᵀK₀u)] + Var[uᵀK₀u]``,
        and only the last term is a difference of moments, of ``K₀``'s scale. Near the uniform law (small ``A``,
        a model at initialisation) ``uᵀKu`` hardly varies, and ``E[(uᵀKu)²] − (tr ΛK)²`` lost every digit (1.4
        relative error in float32 at ``‖A‖ ≈ 1e-3``, 9e-8 in float64 at 1e-4)."""
        out = _work_dtype(o, k)[1]
        moments = matrix_fisher_moments(o, 4)
        k = k.to(torch.float64)
        c = torch.diagonal(k, dim1=-2, dim2=-1).sum(-1) / 9
        rest = k - c[:, None, None] * torch.eye(9, dtype=k.dtype, device=k.device)
        m, cov = moments.mean, moments.cov
        along = torch.einsum("na,nab,nb->n", m, cov, m)
        cross = torch.einsum("nabc,na,nbc->n", moments.third, m, rest)
        spread = (torch.einsum("nabcd,nab,ncd->n", moments.fourth, rest, rest)
                  - torch.einsum("nab,nba->n", cov, rest).square())
        return (4 * c**2 * along - 4 * c * cross + spread).to(out)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        work = _work_dtype(o, y)[0]
        flat, a = y.to(work).reshape(y.shape[:-2] + (9,)), o.to(work)
        log_c = _LogNormaliser.apply(a).reshape(o.shape[:1] + (1,) * (y.dim() - 3))
        return ((flat * self._align(y, a)).sum(-1) - log_c).to(o.dtype)

    def __repr__(self) -> str:
        return "MatrixFisher()"
