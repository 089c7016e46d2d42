"""Inverting a Fisher matrix stably, and telling when its inverse cannot be trusted.

A Fisher matrix whose parameters have very different units has a huge condition number without
being hard to invert: the diagonal scaling ``D = diag(F)^{-1/2}`` removes the units, and what is
left, ``R = D F D`` (ones on the diagonal), carries the degeneracies between parameters. The
inverse is therefore taken as ``F⁻¹ = D R⁻¹ D`` with ``R⁻¹`` from the eigendecomposition of ``R``
in float64, and a matrix is declared singular when the smallest eigenvalue of ``R`` is below
``P·ε₆₄`` times the largest.

Whether the resulting errors are *meaningful* is a different question: an entry of ``F`` known to
relative accuracy ``η`` (from numerical derivatives, say) moves the marginal errors by up to about
``η`` times the condition number of ``R``. :func:`inversion_diagnostics` measures this directly,
as Yahia-Cherif et al. (A&A 649, A52, 2021) propose and Bhandari et al. (arXiv:2101.00298)
recommend checking: it perturbs every entry by a random relative amount and records how far the
marginal errors move.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import TorchfimError, real_number, whole_number
from ._model import parameter_names

__all__ = ["InversionDiagnostics", "inversion_diagnostics", "stable_inverse"]


def stable_inverse(
    fisher: Tensor, names: Sequence[str] | None = None, *, precision: torch.dtype | None = None
) -> Tensor:
    """``F⁻¹`` in float64 via the unit-free ``R = D F D`` (``D = diag(F)^{-1/2}``) and its eigenvalues.

    Raises a :class:`TorchfimError` if a parameter has no information (``F_aa = 0``) or negative information
    (``F_aa < 0``, which no Fisher matrix has), ``R`` has a negative
    eigenvalue beyond rounding (no expected Fisher matrix has), or ``R`` is singular to the precision ``F`` was
    computed in, float64 or coarser (a combination of parameters the data cannot measure).

    Args:
        fisher: ``(P, P)``, the Fisher matrix: a tensor, a NumPy array, or nested lists of numbers (read in
            float64); it must be finite and symmetric to the rounding of its precision (:func:`symmetric_matrix`).
        names: one name per parameter, for the messages.
        precision: the dtype ``F`` was computed in when that is coarser than its own dtype (a matrix
            assembled in float64 from float32 derivatives: ``torch.float32``). ``None``: ``fisher``'s
            dtype. Singularity and definiteness are judged against the coarser of the two.

    Example:
        >>> import torch
        >>> from torchfim.forecast import stable_inverse
        >>> stable_inverse(torch.tensor([[4.0, 0.0], [0.0, 1e-12]], dtype=torch.float64))
        tensor([[2.5000e-01, 0.0000e+00],
                [0.0000e+00, 1.0000e+12]], dtype=torch.float64)
    """
    fisher, given = symmetric_matrix(fisher, precision)
    names = None if names is None else parameter_names(names, fisher.shape[0])
    inverse, problem = _scaled_inverse(fisher, None if given == torch.float64 else given)
    if problem is not None:
        _raise(problem, names)
    return inverse


def check_fisher(fisher: Tensor, names: Sequence[str] | None = None, *, precision: torch.dtype | None = None) -> None:
    """Raise, as :func:`stable_inverse` does, for what no Fisher matrix can be; accept a singular one.

    Refused: non-finite entries, negative information (``F_aa < 0``), and an indefinite ``F`` (an
    eigenvalue of ``R`` below minus its rounding, or ``F_ab ≠ 0`` beside ``F_aa = 0``). A singular
    ``F``, a parameter without information among them, passes: it has no inverse, but each ``F_aa``
    is still the information on ``θ_a`` with the others fixed. Arguments as for :func:`stable_inverse`.
    """
    given = _given(fisher, precision)
    fisher = fisher.detach().to(torch.float64)
    diagonal = torch.diagonal(fisher)
    none = diagonal == 0
    if bool(none.any()) and not bool(fisher[none].any()):  # parameters without information: set aside their rows
        names = None if names is None else [n for n, empty in zip(names, none.tolist(), strict=True) if not empty]
        fisher = fisher[~none][:, ~none]
        if fisher.numel() == 0:
            return
    found = _unit_free(fisher, given)
    if not isinstance(found, _UnitFree):
        _raise(found, names)


#: A parameter without information that correlates with others: ``|F_ab|² ≤ F_aa F_bb`` fails.
_ZERO_BUT_CORRELATED = (
    "has no Fisher information (F_aa = 0) but F_ab ≠ 0 with another parameter, which no Fisher matrix has "
    "(|F_ab|² ≤ F_aa F_bb): the matrix is not positive semi-definite; check how it was built"
)


def _raise(problem: tuple[int, str], names: Sequence[str] | None) -> None:
    index, detail = problem
    label = f"parameter {names[index]!r}" if names is not None and index >= 0 else "the Fisher matrix"
    raise TorchfimError(f"{label} {detail}")


def coarsest_dtype(*dtypes: torch.dtype | None) -> torch.dtype:
    """The floating dtype of largest machine epsilon among ``dtypes`` (others ignored); float64 if none.

    Example:
        >>> import torch
        >>> from torchfim.forecast.stability import coarsest_dtype
        >>> coarsest_dtype(torch.float64, torch.float32, torch.int64, None)
        torch.float32
    """
    floating = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(floating, key=lambda d: torch.finfo(d).eps, default=torch.float64)


def precision_of(fisher: Tensor, precision: torch.dtype | None = None) -> torch.dtype:
    """The precision a Fisher matrix was computed in: the coarser of its dtype and ``precision`` (checked)."""
    if precision is not None and not (isinstance(precision, torch.dtype) and precision.is_floating_point):
        raise TorchfimError(f"precision must be a floating torch dtype such as torch.float32, got {precision!r}")
    return coarsest_dtype(torch.as_tensor(fisher).dtype, precision)


def symmetric_matrix(
    matrix: object, precision: torch.dtype | None = None, *, what: str = "a Fisher matrix", symbol: str = "F"
) -> tuple[Tensor, torch.dtype]:
    """``matrix`` as a symmetrised float64 tensor, and the precision it was computed in (:func:`precision_of`).

    A tensor or NumPy array keeps its dtype as the precision; nested lists or tuples of numbers are read in
    float64 (not torch's default float32, which would round them). Anything but a finite, non-empty, square
    matrix, symmetric to that precision's rounding, raises a :class:`TorchfimError` naming ``what`` (the
    matrix, for the messages) and ``symbol`` (its letter in ``F − Fᵀ``): a silently symmetrised matrix would
    give errors for a matrix that was never given.
    """
    try:
        if isinstance(matrix, (list, tuple)):
            matrix = torch.as_tensor(matrix, dtype=torch.float64)
        elif not isinstance(matrix, Tensor) and hasattr(matrix, "__array__"):
            matrix = torch.as_tensor(matrix)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TorchfimError(f"{what} must be a (P, P) tensor of numbers; could not read {matrix!r} ({err})") from err
    if not isinstance(matrix, Tensor) or matrix.is_complex() or matrix.dtype == torch.bool:
        raise TorchfimError(
            f"{what} must be a real (P, P) tensor (or NumPy array, or nested lists of numbers), got "
            f"{type(matrix).__name__}" + (f" of dtype {matrix.dtype}" if isinstance(matrix, Tensor) else "")
        )
    given = precision_of(matrix, precision)
    matrix = matrix.detach().to(torch.float64)
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise TorchfimError(f"{what} must be square (P, P), got shape {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise TorchfimError(f"{what} has non-finite entries (NaN or Inf); check what it was built from "
                            "(a forecast's mean, covariance and steps)")
    # Round-off leaves a Fisher made in float32 asymmetric at ~1e-7 of its largest entry, not 1e-10.
    largest = float(matrix.abs().max())
    asymmetry = float((matrix - matrix.T).abs().max())
    if asymmetry > max(1e-10, 64 * torch.finfo(given).eps) * largest:
        raise TorchfimError(
            f"{what} must be symmetric, but {symbol} − {symbol}ᵀ reaches {asymmetry:.3g} (its largest entry "
            f"{largest:.3g}, more than {given}'s round-off); pass ({symbol} + {symbol}.T) / 2"
        )
    return (matrix + matrix.T) / 2, given


def _given(fisher: Tensor, precision: torch.dtype | None) -> torch.dtype | None:
    """:func:`precision_of` when coarser than float64, else ``None`` (the form :func:`_scaled_inverse` takes)."""
    given = precision_of(fisher, precision)
    return None if given == torch.float64 else given


#: The fix for a parameter, or a combination of them, that the data do not constrain.
_UNCONSTRAINED = "fix the parameter (Forecast.fix) or add data or a prior that constrains it"


def _scaled_inverse(fisher: Tensor, given: torch.dtype | None = None) -> tuple[Tensor, tuple[int, str] | None]:
    """``(F⁻¹, None)``, or ``(NaNs, (index, why))`` when ``F`` cannot be inverted (index −1: no one parameter).
    ``given``: a coarser dtype ``F`` was given in than float64 (None: float64), whose rounding ``n ε λ_max`` bounds
    what an eigenvalue of ``R`` can tell from 0: at most that, it is singular; below ``−10 n ε λ_max``, indefinite."""
    failed = torch.full_like(fisher, math.nan)
    found = _unit_free(fisher, given)
    if not isinstance(found, _UnitFree):
        return failed, found
    eigenvalues = found.eigenvalues
    if float(eigenvalues[0]) <= found.rounding:
        ratio = float(eigenvalues[-1] / eigenvalues[0]) if float(eigenvalues[0]) > 0 else math.inf
        return failed, (
            -1,
            (
                f"is singular to {str(given or torch.float64)[6:]} precision (condition number of the unit-free matrix "
                f"{ratio:.3g}): some combination of parameters is not constrained; {_UNCONSTRAINED}"
            ),
        )
    inverse = (found.vectors / eigenvalues) @ found.vectors.T
    return inverse * found.scale[:, None] * found.scale[None, :], None


@dataclass(frozen=True, eq=False)
class _UnitFree:
    """``R = D F D = V diag(eigenvalues) Vᵀ`` with ``D = diag(scale)``, and the rounding ``n ε λ_max`` of ``R``."""

    scale: Tensor
    eigenvalues: Tensor
    vectors: Tensor
    rounding: float


def _unit_free(fisher: Tensor, given: torch.dtype | None) -> _UnitFree | tuple[int, str]:
    """The eigendecomposition of the unit-free ``R``, or ``(index, why)`` when ``F`` is no Fisher matrix at all:
    non-finite, ``F_aa ≤ 0``, or indefinite beyond rounding (``given`` as for :func:`_scaled_inverse`)."""
    diagonal = torch.diagonal(fisher)
    if not bool(torch.isfinite(fisher).all()):
        return -1, "has non-finite entries; check what it was built from (a mean, a covariance) for NaN or Inf"
    if bool((diagonal < 0).any()):
        index = int(torch.nonzero(diagonal < 0)[0])
        return index, (
            f"has negative Fisher information (F_aa = {float(diagonal[index]):.3g}), which an expected Fisher matrix "
            "never has: the matrix is not positive definite; check how it was built (a covariance that is not "
            "positive definite, a sign, derivatives too coarse for the data)"
        )
    if bool((diagonal == 0).any()):
        correlated = (diagonal == 0) & (fisher != 0).any(dim=1)
        if bool(correlated.any()):
            return int(torch.nonzero(correlated)[0]), _ZERO_BUT_CORRELATED
        index = int(torch.nonzero(diagonal == 0)[0])
        return index, (
            "has no Fisher information (F_aa = 0): the data do not depend on it, autograd lost track of it (float(), "
            ".item(), numpy in mean or cov; try derivatives='stencil5'), or a stencil step lost the change of the mean "
            f"and covariance to rounding (scan_steps finds a step that does not); {_UNCONSTRAINED}"
        )
    scale = diagonal.rsqrt()
    unit_free = fisher * scale[:, None] * scale[None, :]
    eigenvalues, vectors = torch.linalg.eigh((unit_free + unit_free.T) / 2)
    rounding = fisher.shape[0] * torch.finfo(given or torch.float64).eps * float(eigenvalues[-1])
    if float(eigenvalues[0]) < -10 * rounding:
        return -1, (
            f"is not positive semi-definite (the unit-free matrix has the eigenvalue {float(eigenvalues[0]):.3g}, "
            f"beside {float(eigenvalues[-1]):.3g}), which an expected Fisher matrix never is: check how it was built "
            "(a covariance that is not positive definite, a sign, derivatives too coarse for the data)"
        )
    return _UnitFree(scale=scale, eigenvalues=eigenvalues, vectors=vectors, rounding=rounding)


@dataclass(frozen=True, eq=False)
class InversionDiagnostics:
    """How trustworthy the inverse of a Fisher matrix is.

    Attributes:
        eigenvalues: eigenvalues of ``F`` (ascending); they depend on the parameters' units.
        condition_number: ``λ_max/λ_min`` of ``F`` (``inf`` if ``λ_min ≤ 0``).
        unit_free_condition_number: the same for ``R = D F D``, ``D = diag(F)^{-1/2}``: invariant
            under rescaling the parameters, it is what governs the loss of accuracy on inversion.
        eps: relative size of the perturbations: ``F'_ab = F_ab (1 + eps·g_ab)``, ``g`` symmetric
            with independent standard normal entries on and above the diagonal.
        n_trials: number of perturbed matrices.
        max_relative_change: ``max |σ'_a/σ_a − 1|`` over parameters and trials (``σ`` the marginal
            errors); ``inf`` when ``F`` or a perturbed ``F'`` cannot be inverted.
        tolerance: the largest ``max_relative_change`` accepted as stable.
    """

    eigenvalues: Tensor
    condition_number: float
    unit_free_condition_number: float
    eps: float
    n_trials: int
    max_relative_change: float
    tolerance: float

    @property
    def unstable(self) -> bool:
        """``True`` when the marginal errors move by more than ``tolerance`` (or cannot be computed)."""
        return not self.max_relative_change <= self.tolerance

    @property
    def amplification(self) -> float:
        """``max_relative_change / eps``: how much a relative error in ``F`` is magnified in the errors."""
        return self.max_relative_change / self.eps

    def __str__(self) -> str:
        verdict = "UNSTABLE" if self.unstable else "stable"
        return (
            f"condition number {self.condition_number:.3g} (unit-free {self.unit_free_condition_number:.3g}); "
            f"eigenvalues {self.eigenvalues.min():.3g} … {self.eigenvalues.max():.3g}; "
            f"perturbing F by {self.eps:g} (relative, {self.n_trials} trials) moves the marginal errors by "
            f"up to {self.max_relative_change:.3g} ({verdict} at tolerance {self.tolerance:g})"
        )


def inversion_diagnostics(
    fisher: Tensor,
    *,
    eps: float = 1e-3,
    n_trials: int = 100,
    tolerance: float = 0.01,
    generator: torch.Generator | None = None,
    precision: torch.dtype | None = None,
) -> InversionDiagnostics:
    """Condition numbers, eigenvalues, and the sensitivity of the marginal errors to perturbations of ``F``.

    ``fisher`` is the square, symmetric Fisher matrix ``F`` to examine (a tensor, a NumPy array or nested lists
    of numbers; an asymmetric or non-finite one is refused, as :func:`stable_inverse` refuses it). Each of
    ``n_trials`` perturbed matrices is ``F'_ab = F_ab (1 + eps·g_ab)`` with ``g`` symmetric,
    its entries on and above the diagonal independent standard normals (drawn from ``generator``;
    ``None`` uses a fresh generator seeded with 0, so the result is reproducible). The result is
    flagged ``unstable`` when the marginal errors ``σ_a = √(F⁻¹)_aa`` move by more than
    ``tolerance`` (relative) in any trial. With the defaults: a Fisher matrix known to 0.1% must give
    marginal errors good to 1%. ``precision``: as for :func:`stable_inverse`; a matrix singular to
    that precision cannot be inverted (``max_relative_change = inf``).

    Example:
        >>> import torch
        >>> from torchfim.forecast import inversion_diagnostics
        >>> well = torch.tensor([[1.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        >>> inversion_diagnostics(well).unstable
        False
        >>> degenerate = torch.tensor([[1.0, 0.99999], [0.99999, 1.0]], dtype=torch.float64)
        >>> inversion_diagnostics(degenerate).unstable
        True
    """
    number = real_number(eps)  # a NumPy number or 0-dim tensor is as good as a float
    if number is None or not 0 < number < 1:
        raise TorchfimError(f"eps must be a relative perturbation in (0, 1) such as 1e-3, got {eps!r}")
    trials = whole_number(n_trials)
    if trials is None or trials < 1:
        raise TorchfimError(f"n_trials must be a positive integer such as 100, got {n_trials!r}")
    limit = real_number(tolerance)
    if limit is None or not limit > 0:
        raise TorchfimError(f"tolerance must be a positive relative change such as 0.01, got {tolerance!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TorchfimError(f"generator must be a torch.Generator or None (the perturbations' source), got "
                            f"{type(generator).__name__}; pass torch.Generator().manual_seed(seed)")
    fisher, given = symmetric_matrix(fisher, precision)
    eigenvalues = torch.linalg.eigvalsh(fisher)
    return InversionDiagnostics(
        eigenvalues=eigenvalues,
        condition_number=_condition(eigenvalues),
        unit_free_condition_number=_unit_free_condition(fisher),
        eps=number,
        n_trials=trials,
        max_relative_change=_max_relative_change(
            fisher, number, trials, generator, None if given == torch.float64 else given
        ),
        tolerance=limit,
    )


def _condition(eigenvalues: Tensor) -> float:
    smallest, largest = float(eigenvalues[0]), float(eigenvalues[-1])
    return largest / smallest if smallest > 0 else math.inf


def _unit_free_condition(fisher: Tensor) -> float:
    diagonal = torch.diagonal(fisher)
    if bool((diagonal <= 0).any()):
        return math.inf
    scale = diagonal.rsqrt()
    unit_free = fisher * scale[:, None] * scale[None, :]
    return _condition(torch.linalg.eigvalsh((unit_free + unit_free.T) / 2))


def _max_relative_change(
    fisher: Tensor, eps: float, n_trials: int, generator: torch.Generator | None, given: torch.dtype | None
) -> float:
    inverse, problem = _scaled_inverse(fisher, given)
    if problem is not None:
        return math.inf
    errors = torch.diagonal(inverse).sqrt()
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    n = fisher.shape[0]
    draws = torch.randn(n_trials, n, n, generator=generator, dtype=torch.float64)
    symmetric = draws.triu() + draws.triu(1).transpose(-1, -2)
    worst = 0.0
    for g in symmetric:
        perturbed, problem = _scaled_inverse(fisher * (1 + eps * g), given)
        if problem is not None:
            return math.inf
        change = (torch.diagonal(perturbed).sqrt() / errors - 1).abs().max()
        worst = max(worst, float(change))
    return worst
