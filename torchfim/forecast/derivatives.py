"""Derivatives of a forecast's mean and covariance with respect to θ.

Three ways, chosen by ``derivatives=``:

* ``"autograd"``: exact (to round-off) forward-mode derivatives, one :func:`torch.func.jvp` per
  parameter; the mean and covariance functions must be written in torch operations.
* ``"stencil3"``: the central difference ``f'(θ) ≈ [f(θ+h) − f(θ−h)] / 2h``; truncation error
  ``h² f'''/6``, round-off error about ``ε |f| / h`` (ε the dtype's machine epsilon).
* ``"stencil5"``: ``f'(θ) ≈ [−f(θ+2h) + 8f(θ+h) − 8f(θ−h) + f(θ−2h)] / 12h``; truncation error
  ``h⁴ f⁽⁵⁾/30``, round-off error about ``1.5 ε |f| / h``.

A stencil's step trades truncation (too large) against round-off (too small);
:func:`torchfim.forecast.scan_steps` finds the range where the two are both negligible.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .._identity import identity_like
from ..errors import TorchfimError, check_choice
from ._model import GaussianModel

__all__ = ["DERIVATIVES", "STENCILS", "Derivatives", "compute_derivatives", "default_steps"]

DERIVATIVES: tuple[str, ...] = ("autograd", "stencil3", "stencil5")

#: Central stencils for a first derivative: pairs (offset in steps k, weight w), so that
#: ``f'(θ) ≈ Σ w f(θ + k h) / h``.
STENCILS: dict[str, tuple[tuple[int, float], ...]] = {
    "stencil3": ((1, 0.5), (-1, -0.5)),
    "stencil5": ((2, -1 / 12), (1, 8 / 12), (-1, -8 / 12), (-2, 1 / 12)),
}

#: Order of each stencil's truncation error (``h^order``).
_ORDER = {"stencil3": 2, "stencil5": 4}


@dataclass(frozen=True)
class Derivatives:
    """``∂μ/∂θ_a`` (rows of ``mean``, shape ``(P, d)``) and ``∂C/∂θ_a`` (``cov``, shape ``(P, d, d)``).

    ``cov`` is ``None`` when the covariance is a fixed tensor.
    """

    mean: Tensor
    cov: Tensor | None


def default_steps(theta0: Tensor, stencil: str) -> Tensor:
    """The textbook step ``h_a = ε^{1/(m+1)} · max(|θ_a|, 1)`` for a stencil of order ``m``.

    It balances round-off (``∝ ε/h``) against truncation (``∝ h^m``) for a function whose
    derivatives are of the order of its values; ``ε`` is the machine epsilon of ``theta0``'s dtype.

    Example:
        >>> import torch
        >>> from torchfim.forecast import default_steps
        >>> default_steps(torch.tensor([0.5, -20.0], dtype=torch.float64), "stencil3")   # ε^(1/3) ≈ 6.1e-6
        tensor([6.0555e-06, 1.2111e-04], dtype=torch.float64)
    """
    check_choice("stencil", stencil, tuple(_ORDER))
    if not isinstance(theta0, Tensor) or not theta0.is_floating_point():
        kind = f"a {theta0.dtype} tensor" if isinstance(theta0, Tensor) else type(theta0).__name__
        raise TorchfimError(f"theta0 must be a floating-point tensor (its dtype sets the step), got {kind}; "
                            "use theta0.double()")
    eps = torch.finfo(theta0.dtype).eps
    return eps ** (1.0 / (_ORDER[stencil] + 1)) * theta0.abs().clamp_min(1.0)


def stencil_derivative(model: GaussianModel, index: int, step: float, stencil: str) -> tuple[Tensor, Tensor | None]:
    """The stencil derivative of ``(μ, C)`` along parameter ``index`` with step ``step``.

    Returns ``(∂μ/∂θ_index, ∂C/∂θ_index)``; the second is ``None`` for a fixed covariance and the
    first is zero for a fixed mean.
    """
    mean, cov, _, _ = stencil_terms(model, index, step, stencil)
    return mean, cov


def stencil_terms(
    model: GaussianModel, index: int, step: float, stencil: str
) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
    """The stencil derivative of ``(μ, C)`` and the size of its rounding error, from one set of evaluations.

    Returns ``(∂μ, ∂C, δμ, δC)``: the derivatives as :func:`stencil_derivative`, and entrywise
    ``δf = ε Σ_k |w_k| |f(θ + k h)| / h`` (``ε`` the machine epsilon of ``f``'s dtype), what rounding
    each value ``f(θ + k h)`` to its dtype can contribute to the derivative. A derivative no larger
    than that is round-off, whatever its value (zero, when ``f(θ ± h)`` round to the same numbers).
    ``h`` is the step as ``θ`` resolves it (:func:`resolved_step`).
    """
    step = resolved_step(model.theta0, index, step)
    d_mean = torch.zeros_like(model.mean0) if model.mean_fn is None else 0.0
    d_cov = None if model.cov_fn is None else 0.0
    r_mean = torch.zeros_like(model.mean0) if model.mean_fn is None else 0.0
    r_cov = None if model.cov_fn is None else 0.0
    with torch.no_grad():
        for offset, weight in STENCILS[stencil]:
            theta = model.theta0.clone()
            theta[index] = theta[index] + offset * step
            mean, cov = model.evaluate(theta)
            if model.mean_fn is not None:
                d_mean = d_mean + weight * mean
                r_mean = r_mean + abs(weight) * torch.finfo(mean.dtype).eps * mean.abs()
            if d_cov is not None:
                d_cov = d_cov + weight * cov
                r_cov = r_cov + abs(weight) * torch.finfo(cov.dtype).eps * cov.abs()
    if d_cov is None:
        return d_mean / step, None, r_mean / step, None
    return d_mean / step, d_cov / step, r_mean / step, r_cov / step


def resolved_step(theta0: Tensor, index: int, step: float) -> float:
    """The step ``h' = fl(θ + h) − θ`` that ``θ = theta0[index]`` takes in its dtype when asked for ``h``.

    ``θ + h`` rounds to a number of ``θ``'s dtype, so the points a stencil evaluates lie ``k·h'``
    from ``θ``, not ``k·h``; dividing by ``h`` would add a relative error up to ``ulp(θ)/h`` (1e-4 at
    ``θ = 3.3``, ``h = 1e-3`` in float32), dividing by ``h'`` none. A step that ``θ`` does not resolve
    (``h' = 0``) is kept as asked: :func:`step_resolves` names it.
    """
    value = theta0[index]
    taken = float((value + step) - value)  # exact (Sterbenz): both are numbers of the dtype, close together
    return taken if taken != 0.0 else step


def step_resolves(theta0: Tensor, index: int, step: float, stencil: str) -> bool:
    """Whether every point ``θ_index + k·h`` of the stencil differs from ``θ_index`` in ``theta0``'s dtype.

    A step below half the spacing of the dtype's numbers at ``θ`` rounds ``θ ± h`` back to ``θ``:
    the stencil then differences equal values and the "derivative" is 0 (or, with one side rounded
    away, a multiple of the true one).
    """
    value = theta0[index]
    return all(bool(value + offset * step != value) for offset, _ in STENCILS[stencil])


def compute_derivatives(model: GaussianModel, method: str = "autograd", step: object = None) -> Derivatives:
    """Derivatives of ``model``'s mean and covariance at its ``theta0`` by ``method``.

    ``step`` (stencils only) is a positive number, or one per parameter; ``None`` takes
    :func:`default_steps`.
    """
    check_choice("derivatives", method, DERIVATIVES)
    if method == "autograd":
        if step is not None:
            raise TorchfimError("step is only used by the stencils; drop it or pass derivatives='stencil5'")
        return _autograd_derivatives(model)
    steps = default_steps(model.theta0, method) if step is None else check_steps(step, model.theta0)
    for a in range(model.n_parameters):
        if not step_resolves(model.theta0, a, float(steps[a]), method):
            raise TorchfimError(
                f"the step {float(steps[a]):.3g} of parameter {a} is below the resolution of {model.theta0.dtype} at "
                f"theta0[{a}] = {float(model.theta0[a]):.6g}: θ ± h rounds back to θ and the derivative would be 0; "
                "pass a larger step (scan_steps finds one) or theta0 in float64"
            )
    columns = [stencil_derivative(model, a, float(steps[a]), method) for a in range(model.n_parameters)]
    mean = torch.stack([m for m, _ in columns])
    cov = None if model.cov_fn is None else torch.stack([c for _, c in columns])
    return Derivatives(mean=mean, cov=cov)


def check_steps(step: object, theta0: Tensor) -> Tensor:
    """``step`` as one positive finite step per parameter (a scalar is used for all of them)."""
    try:
        steps = torch.as_tensor(step, dtype=torch.float64).reshape(-1)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TorchfimError(f"step must be a positive number or one per parameter, got {step!r}") from err
    if steps.numel() == 1:
        steps = steps.expand(theta0.numel())
    if steps.numel() != theta0.numel() or not bool((torch.isfinite(steps) & (steps > 0)).all()):
        raise TorchfimError(
            f"step must be a positive finite number or {theta0.numel()} of them (one per parameter), got {step!r}"
        )
    return steps.clone()


def _autograd_derivatives(model: GaussianModel) -> Derivatives:
    """Forward mode: one Jacobian-vector product per parameter direction ``e_a``."""
    basis = identity_like(model.n_parameters, model.theta0)
    mean_rows, cov_rows = [], []
    for direction in basis:
        mean_rows.append(_jvp(model.mean_fn, model.theta0, direction, model.mean0, "mean"))
        if model.cov_fn is not None:
            cov_rows.append(_jvp(model.cov_fn, model.theta0, direction, model.cov0, "cov"))
    return Derivatives(mean=torch.stack(mean_rows), cov=torch.stack(cov_rows) if cov_rows else None)


def _jvp(function, theta0: Tensor, direction: Tensor, value0: Tensor, what: str) -> Tensor:
    if function is None:
        return torch.zeros_like(value0)
    try:
        with torch.no_grad():  # forward mode alone (grad mode does not stop it): no graph through an emulator's weights
            _, tangent = torch.func.jvp(function, (theta0,), (direction,))
    except (RuntimeError, NotImplementedError) as err:
        raise TorchfimError(
            f"autograd could not differentiate {what} ({err}); write it in torch operations of theta, "
            "or pass derivatives='stencil5'"
        ) from err
    return tangent.detach()
