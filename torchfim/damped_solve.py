"""Damped solves with a Fisher-shaped matrix, ``x = (A + λI)⁻¹ v``, and its log-determinant, ``log det(A + λI)``:
:class:`DampedAlgebra`, the ``solve`` and ``logdet`` of every structure object (:mod:`torchfim.structures`).

A natural-gradient step ``(F + λI)⁻¹ g``, a Laplace posterior's mean shift or an EWC-weighted merge all solve with
the damped matrix. ``A`` is symmetric (one that is not, beyond ``√eps`` of its largest entry, is refused: the
Cholesky factor reads one triangle only, so it would solve with another matrix); an estimate of the Fisher from ``n``
inputs with ``C`` outputs each has rank at most ``n·C`` (less for a softmax), below ``P`` on any network of interest,
and the Hessian estimator Î2 can have negative eigenvalues. So the solve is a Cholesky factorisation of ``A + λI`` (half the work of LU, and a test of
positive definiteness on the way), and where that fails, or succeeds only on rounding, the call is refused with the
smallest eigenvalue and a damping that works: an inverse of a singular or indefinite matrix is not a natural-gradient
direction, whatever a general solver would return.

"Succeeds only on rounding": for a positive definite ``M``, every pivot ``L_ii²`` of its Cholesky factor lies between
``λ_min(M)`` and ``λ_max(M)``, so ``min L_ii² / max L_ii² ≥ 1/κ(M)``. A pivot ratio below ``P·eps`` of the dtype
therefore proves ``κ(M) > 1/(P·eps)``, where the standard bound on a Cholesky solve's relative error, of order
``P·eps·κ``, exceeds 1 (a rank-deficient Fisher with ``λ = 0`` can factor, with pivots of rounding size, instead of
failing). No matrix with ``κ < 1/(P·eps)`` is refused; the damping suggested keeps the pivot ratio above ``P·eps``,
and the least damping named, ``(P·eps·λ_max − λ_min)/(1 − P·eps)``, is where the eigenvalues' ratio clears it.
Blocks are factored one by one; a refusal names the block that needs the most damping and a damping for all of
them. In float32 that limit is near: ``P = 1000`` refuses some ``κ`` above 8,000, so solve a float64 copy where a
smaller damping matters. ``log det(A + λI)`` (a Laplace approximation's evidence, ``−½ log det`` of the posterior
precision) comes from the same factors, ``2 Σᵢ log Lᵢᵢ``, and is refused where the solve would be.

The test is one-sided: pivots need not show a large ``κ`` (``LLᵀ`` with a unit-diagonal ``L`` has pivot ratio 1 at
any ``κ``; at ``P = 40``, ``κ = 3·10¹⁶`` was solved with relative error 9·10⁶ in a review), so an accepted solve carries
the error of order ``κ·eps`` that ``solve`` states. And each block, and each entry of a diagonal, is judged by its own
entries, a ``1×1`` block or a diagonal entry by its sign (and overflow) alone: a Fisher entry that is 0 but came out
as rounding (9e-33 for a scalar added to every logit) solves to 1e32, where ``Full``, which sees the other entries,
refuses the same matrix; enough damping, as any Fisher needs, removes both.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import Tensor

from ._identity import identity_like
from ._words import a_or_an
from .errors import TorchfimError, real_number
from .layout import Layout

__all__ = ["DampedAlgebra", "DampedParts", "check_damping", "logdet_blocks", "logdet_diagonal", "solve_blocks",
           "solve_diagonal"]

#: A structure's symmetric matrix as :class:`DampedAlgebra` takes it: its diagonal (a ``P``-vector, for a diagonal
#: matrix), or its diagonal blocks, each with its name in messages and its span of θ.
DampedParts = Tensor | list[tuple[str, Tensor, slice]]


class DampedAlgebra(ABC):
    """``solve(v, damping)`` and ``logdet(damping)`` of ``A + λI``, for a structure that gives its matrix as
    :data:`DampedParts` (:meth:`_damped_parts`) and checks vectors (``_check_vector``)."""

    layout: Layout
    #: How a user makes a float64 copy of the result, for a refusal in float32 that float64 may lift.
    _float64_copy = "as_structure(result.double(), model)"

    @abstractmethod
    def _damped_parts(self, verb: str) -> DampedParts:
        """The matrix's diagonal or blocks; refused (naming ``verb``) where the structure keeps no matrix."""

    @abstractmethod
    def _check_vector(self, v: Tensor, what: str = "mv") -> Tensor: ...

    def solve(self, v: Tensor, damping: float = 0.0) -> Tensor:
        """``(A + λI)⁻¹ v`` for a ``P``-vector ``v`` or each column of ``v`` of shape ``(P, k)``, ``λ = damping ≥ 0``:
        a natural-gradient step's direction, a Laplace posterior's mean shift (docs/uses.md). ``Full`` and each block
        of ``Blocks`` by Cholesky, ``Diag`` entrywise, in the structure's dtype; refused, with the smallest eigenvalue
        and a damping that works, where ``A + λI`` is not positive definite (a Fisher of rank below ``P``, an Î2
        estimate with negative eigenvalues; :mod:`torchfim.damped_solve`), and where ``A`` is not symmetric. Its relative error is of order ``κ·eps``
        of the dtype (``κ`` the condition number of ``A + λI``): with a small damping in float32, solve a float64
        copy, ``as_structure(result.double(), model)`` (blocks: ``as_structure({name: block.double() for name, block
        in result.items()}, model)``)."""
        parts = self._damped_parts("solve()")  # first: a structure that keeps no matrix says so, whatever v is
        v, damping = self._check_vector(v, "solve"), check_damping(damping)
        if isinstance(parts, Tensor):
            return solve_diagonal(parts, v, damping, self.layout)
        solved = solve_blocks({what: matrix for what, matrix, _ in parts}, [v[span] for _, _, span in parts], damping,
                              self._float64_copy)
        return solved[0] if len(solved) == 1 else torch.cat(solved)

    def logdet(self, damping: float = 0.0) -> Tensor:
        """``log det(A + λI)``, a 0-dim float64 tensor (the logs summed in float64; float32 on Apple's MPS),
        ``λ = damping ≥ 0``: ``Σ_p log(d_p + λ)`` for
        ``Diag``, ``2 Σᵢ log Lᵢᵢ`` of the Cholesky factor ``L`` for ``Full`` and summed over the blocks of ``Blocks``
        (a block-diagonal matrix's determinant is its blocks'). A Laplace approximation's log evidence takes
        ``−½ log det`` of its posterior precision, ``N·F + δI`` (docs/uses.md). Refused where :meth:`solve` is, with
        the same damping that works."""
        damping = check_damping(damping)
        parts = self._damped_parts("logdet()")
        if isinstance(parts, Tensor):
            return logdet_diagonal(parts, damping, self.layout)
        return logdet_blocks({what: matrix for what, matrix, _ in parts}, damping, self._float64_copy)



def check_damping(damping: object) -> float:
    """The damping λ as a float: a finite number ≥ 0 (a Python or NumPy number, or a tensor, array or sequence of one
    entry, as laplace-torch's ``prior_precision``)."""
    shape = _shape(damping)
    if shape is not None and math.prod(shape) > 1:  # a prior precision per layer or per parameter
        kind = "tensor" if isinstance(damping, Tensor) else "array" if hasattr(damping, "shape") else \
            type(damping).__name__
        raise TorchfimError(
            f"damping is one number λ (A + λI), got {a_or_an(kind)} of shape {shape}; for a prior "
            "precision per parameter, add it to the matrix yourself: as_structure(result + torch.diag(prior), model) "
            "for a full result, result + prior for a diagonal one, each block plus its part for blocks, then damping=0"
        )
    if shape is not None and math.prod(shape) == 1:
        damping = damping.reshape(()) if hasattr(damping, "reshape") else damping[0]
    value = real_number(damping)
    if value is None or not 0 <= value < math.inf:
        raise TorchfimError(
            f"damping must be a finite number ≥ 0 (λ of A + λI), got {damping!r}; "
            "1e-3 · trace()/P is a common start"
        )
    return value + 0.0  # −0.0 + 0.0 is +0.0: a damping of −0 is 0, and the messages say "damping=0", not "-0"


def _shape(value: object) -> tuple[int, ...] | None:
    """The shape of a tensor or array, the length of a list or tuple; None for anything else (a number)."""
    if isinstance(value, (list, tuple)):
        return (len(value),)
    shape = getattr(value, "shape", None)
    return tuple(shape) if isinstance(shape, tuple) and shape else None


def solve_diagonal(diagonal: Tensor, v: Tensor, damping: float, layout: Layout) -> Tensor:
    """``v / (d + λ)`` entrywise (each column of a ``(P, k)`` ``v``); refused where an entry of ``d + λ`` is ≤ 0,
    or so small that a finite ``v`` gives an infinite entry (``Full`` refuses such a matrix as numerically singular),
    naming the parameter tensor of the first."""
    shifted = _shifted_diagonal(diagonal, damping, layout, "solve")
    solved = v / (shifted if v.dim() == 1 else shifted.unsqueeze(-1))
    overflowed = torch.isinf(solved) & torch.isfinite(v)
    if bool(overflowed.any()):
        first = int(overflowed.nonzero()[0, 0])
        need = float(v.abs().max()) / torch.finfo(solved.dtype).max  # d + λ above this keeps every entry finite
        raise TorchfimError(
            f"solve: dividing by the diagonal plus damping={damping:g} overflowed {str(solved.dtype)[6:]} (the first "
            f"entry in {layout.locate(first)[0]!r}, where d + λ = {float(shifted[first]):.3g}); pass a damping, e.g. "
            f"{_suggested(diagonal, need):.3g}, or solve a float64 copy: as_structure(result.double(), model).solve(...)"
        )
    return solved


def logdet_diagonal(diagonal: Tensor, damping: float, layout: Layout) -> Tensor:
    """``Σ_p log(d_p + λ)``, summed in float64 (:func:`_wide_sum`); refused as :func:`solve_diagonal` is."""
    return _wide_sum(_shifted_diagonal(diagonal, damping, layout, "logdet").log())


def _shifted_diagonal(diagonal: Tensor, damping: float, layout: Layout, verb: str) -> Tensor:
    """``d + λ``, refused (for ``verb``) where an entry is ≤ 0, naming the parameter tensor of the first."""
    _check_finite(diagonal, "the diagonal", verb)
    shifted = diagonal + damping
    _check_damped_finite(shifted, damping, "the diagonal", verb, "as_structure(result.double(), model)")
    bad = (shifted <= 0).nonzero()
    if len(bad):
        name = layout.locate(int(bad[0]))[0]
        lowest = float(diagonal.min())
        need = max(0.0, -lowest)
        raise TorchfimError(
            f"{verb}: {len(bad)} of the {len(diagonal)} diagonal entries plus damping={damping:g} are ≤ 0 (the first "
            f"in {name!r}, the lowest entry {lowest:.3g}), so the diagonal has {_LACKS[verb]} there: "
            f"{_cause(lowest < 0, diagonal=True)}; pass damping > {_up(need):.3g}, "
            f"e.g. {_suggested(diagonal, need):.3g}"
        )
    return shifted


@dataclass(frozen=True)
class _Refusal:
    """Why one symmetric matrix (``what``) plus the damping does not factor: its extreme eigenvalues, the damping
    that it needs (strictly more), one that works, and the message's parts."""

    what: str
    state: str
    lowest: float
    highest: float
    need: float
    suggested: float
    negative: bool
    float32: bool


def solve_blocks(blocks: dict[str, Tensor], parts: list[Tensor], damping: float, float64_copy: str = "") -> list[Tensor]:
    """``(M_b + λI)⁻¹ v_b`` for each symmetric block ``M_b`` (named by the keys) and its part ``v_b`` of ``v``; where
    some block does not factor, one refusal names the block that needs the most damping and a damping that works for
    every block (and, in float32 where float64 may do, ``float64_copy``: how to make a float64 copy)."""
    solved = []
    for factor, v in zip(_factors(blocks, damping, "solve", float64_copy), parts):
        x = torch.cholesky_solve(v if v.dim() == 2 else v.unsqueeze(-1), factor)
        solved.append(x if v.dim() == 2 else x.squeeze(-1))
    return solved


def logdet_blocks(blocks: dict[str, Tensor], damping: float, float64_copy: str = "") -> Tensor:
    """``Σ_b log det(M_b + λI) = Σ_b 2 Σᵢ log L_b,ii`` over the symmetric blocks; refused as :func:`solve_blocks`
    is."""
    factors = _factors(blocks, damping, "logdet", float64_copy)
    return _wide_sum(torch.cat([2 * factor.diagonal().log() for factor in factors]))


def _wide_sum(terms: Tensor) -> Tensor:
    """The sum of ``terms`` in float64 (float32 on Apple's MPS, which has no float64): a float32 sum of 10⁶ logs is
    off by most of a nat (0.65 at P = 10⁶, 1.86 at 10⁷, in a review), too much for a Laplace evidence."""
    return terms.to(torch.float32 if terms.device.type == "mps" else torch.float64).sum()


def _factors(blocks: dict[str, Tensor], damping: float, verb: str, float64_copy: str) -> list[Tensor]:
    """The Cholesky factor of each ``M_b + λI``; where some block has none fit to use, one refusal (for ``verb``) names
    the block that needs the most damping and a damping that works for every block."""
    for what, matrix in blocks.items():
        _check_finite(matrix, what, verb)
        _check_damped_finite(matrix.diagonal() + damping, damping, what, verb, float64_copy)
    factors = [_factor(matrix, damping, what, verb) for what, matrix in blocks.items()]
    refusals = [f for f in factors if isinstance(f, _Refusal)]
    if refusals:
        raise _refused(refusals, damping, verb, float64_copy)
    return factors


def _factor(matrix: Tensor, damping: float, what: str, verb: str) -> Tensor | _Refusal:
    """The Cholesky factor of ``matrix + λI``, or why there is none fit to use (the module docstring); ``matrix`` and
    its damped diagonal are finite (:func:`_factors`)."""
    _check_symmetric(matrix, what, verb)
    size = matrix.shape[0]
    damped = matrix + damping * identity_like(size, matrix)  # out of place: A is shared
    tolerance = size * torch.finfo(matrix.dtype).eps
    factor, info = torch.linalg.cholesky_ex(damped)
    pivots = factor.diagonal().square()
    if int(info) == 0 and (size == 0 or float(pivots.min()) > tolerance * float(pivots.max())):  # 0: an empty tensor
        return factor
    eigenvalues = torch.linalg.eigvalsh(matrix)
    lowest, highest = float(eigenvalues[0]), float(eigenvalues[-1])
    state = ("is not positive definite" if int(info) else
             f"is numerically singular in {str(matrix.dtype).removeprefix('torch.')} (condition number above "
             f"1/(P·eps) = {1 / tolerance:.2g})")
    # λ_min + d > tol·(λ_max + d): the eigenvalues' ratio, which the pivots' cannot fall below, clears P·eps
    need = max(0.0, (tolerance * highest - lowest) / (1 - tolerance))
    return _Refusal(what, state, lowest, highest, need, _suggested(matrix.diagonal(), need),
                    lowest < -tolerance * abs(highest), matrix.dtype == torch.float32)


def _refused(refusals: list[_Refusal], damping: float, verb: str, float64_copy: str) -> TorchfimError:
    """One error for the blocks that do not factor: the one that needs the most damping, and a damping for all; a
    float64 copy named where the refusal is float32's rounding (not eigenvalues below 0 beyond it)."""
    worst = max(refusals, key=lambda r: r.need)
    need, suggested = worst.need, max(r.suggested for r in refusals)
    others = (f" ({len(refusals)} blocks need damping; the one below needs the most, and the damping named is for "
              "all of them)" if len(refusals) > 1 else "")
    rounding = worst.float32 and not any(r.negative for r in refusals)
    wider = f" (or use a float64 copy: {float64_copy}.{verb}(...))" if rounding and float64_copy else ""
    return TorchfimError(
        f"{verb}: {worst.what} plus damping={damping:g} {worst.state}{others}: its smallest eigenvalue is "
        f"{worst.lowest:.3g} and its largest {worst.highest:.3g}; {_cause(any(r.negative for r in refusals))}; pass "
        f"damping > {_up(need):.3g}, e.g. {suggested:.3g}{wider}"
    )


#: What a matrix that is not positive definite lacks, for each verb.
_LACKS = {"solve": "no inverse", "logdet": "no log-determinant"}


def _check_finite(values: Tensor, what: str, verb: str) -> None:
    if not bool(torch.isfinite(values).all()):
        raise TorchfimError(f"{verb}: {what} holds NaN or infinite entries, so it has {_LACKS[verb]}: the computation that "
                            "made it overflowed or was given non-finite inputs; check it (torch.isfinite) and recompute")


def _check_damped_finite(damped: Tensor, damping: float, what: str, verb: str, float64_copy: str) -> None:
    """Refuse a damping that overflows ``what``'s dtype where it is added to the (finite) diagonal, ``damped``: the
    factorisation would fail on ``inf`` and blame the matrix (a damping above float32's 3.4e38 was called "not
    positive definite", and a diagonal's logdet was ``inf``)."""
    if bool(torch.isfinite(damped).all()):
        return
    name = str(damped.dtype).removeprefix("torch.")
    wider = (f", or a float64 copy: {float64_copy}.{verb}(...)" if float64_copy and damped.dtype != torch.float64
             else "")
    raise TorchfimError(
        f"{verb}: damping={damping:g} overflows {name} where it is added to {what} (the largest number "
        f"{name} holds is {torch.finfo(damped.dtype).max:.3g}); pass a smaller damping (with λ this large, "
        f"(A + λI)⁻¹v is v/λ to within |A|/λ){wider}"
    )


def _check_symmetric(matrix: Tensor, what: str, verb: str) -> None:
    """Refuse a matrix whose asymmetry exceeds ``√eps`` of its largest entry: the Cholesky factorisation reads one
    triangle only, so it would solve with a matrix that was never given. torchfim's own results are exactly
    symmetric (:mod:`torchfim._symmetric`), float64 copies of float32 ones too; the rows are compared a slice at a
    time, never a second ``P×P`` copy."""
    size = matrix.shape[0]
    largest = float(matrix.abs().max()) if size else 0.0
    tolerance = torch.finfo(matrix.dtype).eps ** 0.5 * largest
    rows = max(1, (1 << 22) // max(size, 1))
    for start in range(0, size, rows):
        part = slice(start, min(size, start + rows))
        asymmetry = float((matrix[part] - matrix[:, part].T).abs().max())
        if asymmetry > tolerance:
            raise TorchfimError(
                f"{verb}: {what} is not symmetric (A − Aᵀ reaches {asymmetry:.3g}, its largest entry {largest:.3g}), "
                f"and {verb}() treats A as symmetric, reading one triangle only; pass (A + A.T) / 2 to as_structure, "
                "or build the matrix from symmetric terms"
            )


def _up(value: float) -> float:
    """``value`` rounded up to 3 significant digits (a threshold printed so, then passed, must clear it)."""
    if value <= 0 or not math.isfinite(value):
        return value
    step = 10.0 ** (math.floor(math.log10(value)) - 2)
    if step == 0.0:  # a subnormal value: its hundredth underflows, and it prints as it is
        return value
    return math.ceil(value / step * (1 - 1e-9)) * step  # a hair above a printed value is rounding, not more need


def _cause(negative: bool, diagonal: bool = False) -> str:
    """Why the matrix has no inverse: eigenvalues (or ``diagonal`` entries) below 0 beyond rounding, or a singular
    one."""
    if negative:
        return (f"the estimate has negative {'entries' if diagonal else 'eigenvalues'}, as the Hessian estimator Î2 "
                "can (estimator='exact' or 'score' give positive semidefinite ones)")
    if diagonal:
        return "a Fisher's diagonal entry is 0 where its parameter does not act on the outputs"
    return ("a Fisher is singular without damping: its rank is at most inputs × outputs, it is 0 where a parameter "
            "does not act on the outputs, and a softmax output's is singular on its own (adding the same vector to "
            "every class's weights changes no probability)")


def _suggested(diagonal: Tensor, need: float) -> float:
    """A damping that works: ``1e-3 · tr(A)/P``, the usual start, or twice the least damping ``need`` if more."""
    scale = 1e-3 * float(diagonal.sum()) / len(diagonal)
    return _up(max(scale if scale > 0 else 1e-3, 2 * need))
