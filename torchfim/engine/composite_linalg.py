"""Linear-algebra functions run as compositions of operations whose forward-mode rules torch differentiates correctly
(:func:`.composites.composite_forms`, forward mode only).

In torch 2.13 the forward-mode rules of six functions (and of three that solve through them: ``solve_ex``,
``tensorsolve`` and the deprecated ``triangular_solve``) are not themselves differentiated correctly in forward mode, so
``jvp`` of ``jvp`` through them (the Hessian estimator's output-Hessian diagonals) is silently wrong, against
reverse-over-reverse and against central differences of gradients: on a 3×3 matrix in float64, ``linalg.solve``
38 % off (130 % with ``left=False``), ``linalg.det`` 2.4 %, ``slogdet`` 93 %, ``logdet`` 150 %,
``cholesky_inverse`` 42 % and ``householder_product`` 180 %. Through ``nn.utils.parametrizations.orthogonal`` (its
``"cayley"`` map solves a linear system, its ``"householder"`` map, the default for a non-square weight, is a
Householder product) the Î2 variance of the weight's entries came out 74-99 % off, of the trace 10-45 %
(``tests/test_linalg_second_derivatives.py``). Their reverse-mode double derivatives are right.

Each runs here on an LU factorisation or a triangular solve, whose rules torch composes correctly:

* ``solve(A, B)`` as ``lu_solve(lu_factor(A), B)`` (``B`` a vector where torch takes it as one), ``tensorsolve`` as
  that solve of ``A`` read as a matrix, ``triangular_solve`` as ``linalg.solve_triangular``;
* ``det(A) = s·∏ᵢ Uᵢᵢ`` and ``slogdet(A) = (s·∏ᵢ sgn Uᵢᵢ, Σᵢ log|Uᵢᵢ|)``, ``A = PLU``, ``s = ±1`` the sign of the
  permutation ``P``; ``logdet = log|det| + log(sign)`` (``nan`` for a negative determinant, as torch's);
* ``cholesky_inverse(L) = (LLᴴ)⁻¹`` as ``cholesky_solve(I, L)``;
* ``householder_product(A, τ)``: the first ``n`` columns of ``H₁⋯H_k``, ``Hᵢ = I − τᵢvᵢvᵢᴴ``, ``vᵢ`` the ``i``-th
  column of ``A`` below the diagonal with a 1 on it, applied to the first ``n`` columns of the identity.

Calls with ``out=`` are left to torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor


def solve(A: Tensor, B: Tensor, *, left: bool = True, out: Tensor | None = None) -> Tensor:
    """``X`` with ``AX = B`` (``XA = B`` where ``left=False``), by LU; ``B`` of shape ``(n,)`` or ``A``'s batch shape
    followed by ``n`` is a (batch of) vector(s), as :func:`torch.linalg.solve` reads it."""
    if out is not None:
        return torch.linalg.solve(A, B, left=left, out=out)
    vector = B.dim() == 1 or (B.dim() == A.dim() - 1 and B.shape == A.shape[:-1])
    side = -1 if left else -2
    rhs = B.unsqueeze(side) if vector else B
    lu, pivots = torch.linalg.lu_factor(A)
    batch = torch.broadcast_shapes(lu.shape[:-2], rhs.shape[:-2])
    solution = torch.linalg.lu_solve(lu.expand(*batch, *lu.shape[-2:]), pivots.expand(*batch, pivots.shape[-1]),
                                     rhs.expand(*batch, *rhs.shape[-2:]), left=left)
    return solution.squeeze(side) if vector else solution


def solve_ex(A: Tensor, B: Tensor, *, left: bool = True, check_errors: bool = False,
             out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """:func:`solve` with torch's ``info`` (nonzero where a matrix is singular; torch's own check where asked)."""
    if out is not None:
        return torch.linalg.solve_ex(A, B, left=left, check_errors=check_errors, out=out)
    info = torch.linalg.solve_ex(A.detach(), B.detach(), left=left, check_errors=check_errors).info
    return torch.return_types.linalg_solve_ex((solve(A, B, left=left), info))


def tensorsolve(A: Tensor, B: Tensor, dims: Sequence[int] | None = None, *, out: Tensor | None = None) -> Tensor:
    """``X`` with ``tensordot(A, X, X.ndim) = B``: :func:`solve` of ``A`` (its ``dims`` moved to the end) read as a
    ``B.numel()``-square matrix."""
    if out is not None:
        return torch.linalg.tensorsolve(A, B, dims, out=out)
    if dims is not None:
        A = A.movedim(tuple(dims), tuple(range(A.dim() - len(dims), A.dim())))
    return solve(A.reshape(B.numel(), -1), B.reshape(-1)).reshape(A.shape[B.dim():])


def triangular_solve(b: Tensor, A: Tensor, upper: bool = True, transpose: bool = False, unitriangular: bool = False,
                     *, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """The deprecated ``torch.triangular_solve``: ``(X, A)`` with ``op(A)X = b`` (``op(A) = Aᵀ`` where ``transpose``) by
    ``linalg.solve_triangular``, whose rules torch composes correctly."""
    if out is not None:
        return torch.triangular_solve(b, A, upper, transpose, unitriangular, out=out)
    matrix = A.mT if transpose else A
    solution = torch.linalg.solve_triangular(matrix, b, upper=upper != transpose, unitriangular=unitriangular)
    return torch.return_types.triangular_solve((solution, A.clone()))


def _lu_diagonal(A: Tensor) -> tuple[Tensor, Tensor]:
    """``U``'s diagonal of ``A = PLU`` and the sign ``±1`` of the permutation ``P`` (each row swap flips it)."""
    lu, pivots = torch.linalg.lu_factor(A)
    rows = torch.arange(1, pivots.shape[-1] + 1, device=pivots.device, dtype=pivots.dtype)
    swaps = (pivots != rows).sum(-1)
    return torch.diagonal(lu, dim1=-2, dim2=-1), (1 - 2 * (swaps % 2)).to(A.dtype)


def det(A: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``det A = s·∏ᵢ Uᵢᵢ``."""
    if out is not None:
        return torch.linalg.det(A, out=out)
    diagonal, sign = _lu_diagonal(A)
    return sign * diagonal.prod(-1)


def slogdet(A: Tensor, *, out: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """``(s·∏ᵢ sgn Uᵢᵢ, Σᵢ log|Uᵢᵢ|)``, in torch's named tuple (``sign``, ``logabsdet``)."""
    if out is not None:
        return torch.linalg.slogdet(A, out=out)
    diagonal, sign = _lu_diagonal(A)
    return torch.return_types.linalg_slogdet((sign * diagonal.sgn().prod(-1), diagonal.abs().log().sum(-1)))


def logdet(A: Tensor) -> Tensor:
    """``log det A``: ``log|det A| + log(sign)``, ``−inf`` for a singular ``A``, ``nan`` for a negative determinant
    (torch's values; a complex ``A`` gives the complex logarithm)."""
    sign, logabsdet = slogdet(A)
    return logabsdet + sign.detach().log()


def cholesky_inverse(L: Tensor, upper: bool = False, *, out: Tensor | None = None) -> Tensor:
    """``(LLᴴ)⁻¹`` (``(UᴴU)⁻¹`` where ``upper``) as the solution of ``LLᴴX = I``."""
    if out is not None:
        return torch.cholesky_inverse(L, upper, out=out)
    eye = torch.eye(L.shape[-1], dtype=L.dtype, device=L.device).expand(L.shape)
    return torch.cholesky_solve(eye, L, upper)


def householder_product(A: Tensor, tau: Tensor, *, out: Tensor | None = None) -> Tensor:
    """The first ``n`` columns of ``H₁⋯H_k`` for ``A`` ``(*, m, n)``, ``τ`` ``(*, k)``: ``Hᵢ = I − τᵢvᵢvᵢᴴ`` applied
    from ``H_k`` to ``H₁`` to the first ``n`` columns of the ``m×m`` identity."""
    if out is not None:
        return torch.linalg.householder_product(A, tau, out=out)
    m, n = A.shape[-2:]
    rows = torch.arange(m, device=A.device)
    product = torch.eye(m, n, dtype=A.dtype, device=A.device).expand(*A.shape[:-2], m, n)
    for i in reversed(range(tau.shape[-1])):
        v = A[..., :, i] * (rows > i) + (rows == i)  # (*, m): 0 above i, 1 at i, A's column below
        product = product - tau[..., i, None, None] * v[..., :, None] * (v.conj()[..., None, :] @ product)
    return product


#: torch function (and its Tensor method) -> its composite form, for forward-mode passes.
LINALG_FORWARD: dict[Callable, Callable] = {
    torch.linalg.solve: solve, torch.linalg.solve_ex: solve_ex, torch.linalg.tensorsolve: tensorsolve,
    torch.triangular_solve: triangular_solve, torch.Tensor.triangular_solve: triangular_solve,
    torch.linalg.det: det, torch.det: det, torch.Tensor.det: det,
    torch.linalg.slogdet: slogdet, torch.slogdet: slogdet, torch.Tensor.slogdet: slogdet,
    torch.logdet: logdet, torch.Tensor.logdet: logdet,
    torch.cholesky_inverse: cholesky_inverse, torch.Tensor.cholesky_inverse: cholesky_inverse,
    torch.linalg.householder_product: householder_product, torch.orgqr: householder_product,
    torch.Tensor.orgqr: householder_product,
}
