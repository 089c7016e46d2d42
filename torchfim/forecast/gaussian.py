"""The Fisher matrix of a Gaussian data vector with parameter-dependent mean and covariance."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import TorchfimError, warn_user
from ._model import (
    CovLike,
    GaussianModel,
    MeanLike,
    covariance_cholesky,
    parameter_names,
)
from .derivatives import Derivatives, compute_derivatives, default_steps, stencil_terms
from .result import Forecast
from .stability import coarsest_dtype

__all__ = ["forecast", "gaussian_fisher", "whitened_fisher"]


def gaussian_fisher(mean_jacobian: Tensor, cov: Tensor, cov_jacobian: Tensor | None = None) -> Tensor:
    """``F_ab = ∂_a μᵀ C⁻¹ ∂_b μ + ½ tr(C⁻¹ ∂_a C C⁻¹ ∂_b C)``, in float64, from given derivatives.

    This is the Fisher information of one draw of ``x ~ N(μ(θ), C(θ))``: the expected outer
    product of the score, equivalently the Hessian of ``KL(N(μ(θ₀), C(θ₀)) ‖ N(μ(θ), C(θ)))`` at
    ``θ = θ₀``. For ``n`` independent draws multiply it by ``n``.

    Args:
        mean_jacobian: ``(P, d)``; row ``a`` is ``∂μ/∂θ_a``.
        cov: ``(d, d)``, the covariance at θ₀ (symmetric positive definite).
        cov_jacobian: ``(P, d, d)``; entry ``a`` is ``∂C/∂θ_a``; ``None`` for a fixed covariance.

    Both terms are computed in the whitened frame of ``C = L Lᵀ`` (triangular solves, no explicit
    inverse): ``∂_a μᵀ C⁻¹ ∂_b μ = (L⁻¹∂_aμ)·(L⁻¹∂_bμ)`` and ``tr(C⁻¹∂_aC C⁻¹∂_bC) = tr(A_a A_b)``
    with ``A_a = L⁻¹ ∂_aC L⁻ᵀ``.

    Example:
        >>> import torch
        >>> from torchfim.forecast import gaussian_fisher
        >>> A = torch.tensor([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)  # μ = Aθ
        >>> gaussian_fisher(A.T, torch.eye(3, dtype=torch.float64))                     # = AᵀA
        tensor([[2., 2.],
                [2., 5.]], dtype=torch.float64)
    """
    mean_jacobian, cov = _real_tensor(mean_jacobian, "mean_jacobian"), _real_tensor(cov, "cov")
    cov_jacobian = None if cov_jacobian is None else _real_tensor(cov_jacobian, "cov_jacobian")
    if mean_jacobian.dim() != 2:
        raise TorchfimError(f"mean_jacobian must have shape (P, d), got {tuple(mean_jacobian.shape)}")
    n_parameters, d = mean_jacobian.shape
    if tuple(cov.shape) != (d, d):
        raise TorchfimError(f"cov must have shape ({d}, {d}) to match mean_jacobian, got {tuple(cov.shape)}")
    if cov_jacobian is not None and tuple(cov_jacobian.shape) != (n_parameters, d, d):
        raise TorchfimError(
            f"cov_jacobian must have shape ({n_parameters}, {d}, {d}), got {tuple(cov_jacobian.shape)}"
        )
    for name, value in (("mean_jacobian", mean_jacobian), ("cov_jacobian", cov_jacobian)):
        if value is not None and not bool(torch.isfinite(value).all()):
            raise TorchfimError(f"{name} has non-finite entries (NaN or Inf), so the Fisher matrix would be NaN; check "
                                "the derivatives (a mean or covariance that is not finite near θ₀, a stencil step)")
    return whitened_fisher(mean_jacobian, cov, cov_jacobian)


def whitened_fisher(mean_jacobian: Tensor, cov: Tensor, cov_jacobian: Tensor | None = None) -> Tensor:
    """:func:`gaussian_fisher` of checked shapes, where a non-finite derivative gives NaN entries, not an error:
    the step scan and the autograd check read a stencil step at which the model is not finite as unresolved."""
    factor = covariance_cholesky(cov)
    whitened_mean = torch.linalg.solve_triangular(factor, mean_jacobian.detach().to(torch.float64).T, upper=False)
    fisher = whitened_mean.T @ whitened_mean
    if cov_jacobian is not None:
        left = torch.linalg.solve_triangular(factor, cov_jacobian.detach().to(torch.float64), upper=False)
        # L⁻¹ (L⁻¹ ∂C)ᵀ = (L⁻¹ ∂C L⁻ᵀ)ᵀ; the trace below is unchanged by that transpose.
        whitened_cov = torch.linalg.solve_triangular(factor, left.transpose(-1, -2), upper=False)
        fisher = fisher + 0.5 * torch.einsum("aij,bji->ab", whitened_cov, whitened_cov)
    return (fisher + fisher.T) / 2


def _real_tensor(value: object, name: str) -> Tensor:
    """``value`` if it is a real tensor (integers are exact in float64); a :class:`TorchfimError` otherwise."""
    if not isinstance(value, Tensor) or value.is_complex() or value.dtype == torch.bool:
        kind = f"a {value.dtype} tensor" if isinstance(value, Tensor) else type(value).__name__
        raise TorchfimError(f"{name} must be a real tensor, got {kind}; pass torch.as_tensor(..., dtype=torch.float64)")
    return value


def forecast(
    mean: MeanLike,
    cov: CovLike,
    theta0: object,
    *,
    derivatives: str = "autograd",
    step: object = None,
    names: Sequence[str] | None = None,
    check: bool = True,
) -> Forecast:
    """Fisher forecast for a Gaussian data vector ``x ~ N(μ(θ), C(θ))`` at the fiducial ``theta0``.

    Computes ``F_ab = ∂_a μᵀ C⁻¹ ∂_b μ + ½ tr(C⁻¹ ∂_a C C⁻¹ ∂_b C)`` (see :func:`gaussian_fisher`)
    for one draw of the data vector; scale the result by the number of independent draws
    (``n * result``) and add forecasts of independent data sets (``a + b``).

    Args:
        mean: ``θ ↦ μ(θ)``, a 1-D tensor of length ``d``; or a fixed tensor.
        cov: ``θ ↦ C(θ)``, a ``(d, d)`` symmetric positive definite tensor; or a fixed tensor.
        theta0: the fiducial parameters, a 1-D tensor of length ``P``. Its dtype is the dtype the
            derivatives are taken in; the Fisher matrix is always assembled in float64, and its
            inverse judged against the coarsest dtype of θ, the mean and the covariance
            (:attr:`Forecast.precision`).
        derivatives: ``"autograd"`` (forward mode, exact), ``"stencil3"`` or ``"stencil5"``
            (central finite differences; see :mod:`torchfim.forecast.derivatives`). Autograd treats
            ``.item()``, ``float()`` and NumPy inside ``mean`` or ``cov`` as constants and drops those
            terms; a 5-point stencil along each parameter (four more evaluations of the model each)
            catches that, with a ``RuntimeWarning`` where the two disagree far beyond the stencil's error.
        step: the stencils' step, one number or one per parameter (absolute, in θ's units);
            ``None`` takes ``ε^{1/3}·max(|θ_a|, 1)`` (stencil3) or ``ε^{1/5}·max(|θ_a|, 1)``
            (stencil5). Use :func:`scan_steps` to find a stable step and pass its ``.steps``.
        names: one name per parameter, for printing and plots.
        check: with ``derivatives="autograd"``, compare them with the 5-point stencil above (four evaluations of the
            model per parameter); ``False`` leaves it out, for a model known to stay in torch whose evaluations
            are costly.

    Example:
        >>> import torch
        >>> from torchfim.forecast import forecast
        >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)
        >>> line = lambda t: t[0] + t[1] * x                       # straight line, unit noise
        >>> fc = forecast(line, torch.eye(5, dtype=torch.float64), torch.tensor([0.0, 1.0]).double(),
        ...               names=["intercept", "slope"])
        >>> fc.fisher
        tensor([[5.0000, 2.5000],
                [2.5000, 1.8750]], dtype=torch.float64)
        >>> [round(float(s), 4) for s in fc.marginal_errors()]
        [0.7746, 1.2649]
    """
    model = GaussianModel(mean, cov, theta0)
    names = parameter_names(names, model.n_parameters)
    found = compute_derivatives(model, derivatives, step)
    if not isinstance(check, bool):
        raise TorchfimError(f"check must be True or False (compare autograd with a stencil), got {check!r}")
    if derivatives == "autograd" and check:
        _check_autograd(model, found, names)
    fisher = gaussian_fisher(found.mean, model.cov0, found.cov)
    precision = coarsest_dtype(model.theta0.dtype, model.mean0.dtype, model.cov0.dtype)
    return Forecast(fisher, theta0=model.theta0, names=names, precision=precision)


#: How many times the finite difference's error bound autograd must miss it by to be doubted: far beyond noise.
_DOUBT = 100.0
#: Relative disagreements below this are not worth a warning whatever the bound (a term that small hardly matters).
_FLOOR = 1e-3


def _check_autograd(model: GaussianModel, found: Derivatives, names: Sequence[str]) -> None:
    """Warn for each parameter whose autograd derivative of ``(μ, C)`` differs from a 5-point stencil's beyond doubt.

    ``.item()``, ``float()``, ``.tolist()`` or NumPy inside the model make a tensor that depends on θ a constant:
    :func:`torch.func.jvp` drops those terms without a word (a wrong derivative, not a failed one). A finite
    difference sees every term. The stencil, at the step of :func:`default_steps`, is Richardson's
    ``D₅ = (4 D₃(h) − D₃(2h)) / 3`` from two 3-point stencils (four evaluations per parameter); its error is
    bounded by ``‖D₃(h) − D₃(2h)‖`` (the 3-point truncation, far above the 5-point one) plus the rounding of the
    values, in the norm of the Fisher matrix (``‖D‖² = F_aa`` for the derivative along ``θ_a``). A model that
    raises at the stencil's points is not checked: the check is advice, the forecast does not need those points.
    """
    steps = default_steps(model.theta0, "stencil5")
    for a, name in enumerate(names):
        try:
            near = stencil_terms(model, a, float(steps[a]), "stencil3")
            far = stencil_terms(model, a, 2 * float(steps[a]), "stencil3")
        except Exception:  # noqa: BLE001 - whatever the model raises off θ₀, the forecast itself is unaffected
            return
        auto = (found.mean[a], None if found.cov is None else found.cov[a])
        five = _combine(near, far, 4 / 3, -1 / 3)
        distance, size, five_size = _norms(model.cov0, _combine(auto, five, 1.0, -1.0), auto, five)
        truncation, rounding_near, rounding_far = _norms(model.cov0, _combine(near, far, 1.0, -1.0), near[2:], far[2:])
        error = truncation + 2 * rounding_near + rounding_far  # ample for the rounding of (4 D₃(h) − D₃(2h)) / 3
        scale = max(size, five_size)
        if distance > _DOUBT * error and distance > _FLOOR * scale:
            warn_user(
                f"autograd's derivative along {name} differs from a finite difference by {distance / scale:.2g} "
                f"(relative), {distance / max(error, 1e-300):.3g} times the finite difference's error: mean or cov "
                "probably leaves torch there (.item(), float(), .tolist(), numpy), which autograd treats as a "
                "constant and drops, so the Fisher matrix is wrong; write them in torch operations of theta, or "
                "pass derivatives='stencil5' (scan_steps finds its step). A θ₀ on a kink of the model, where the "
                "derivative is undefined, disagrees too."
            )


def _combine(first: Sequence, second: Sequence, u: float, v: float) -> tuple[Tensor, Tensor | None]:
    """``u·first + v·second`` of two pairs (derivative of the mean, of the covariance or ``None``)."""
    cov = None if first[1] is None or second[1] is None else u * first[1] + v * second[1]
    return u * first[0] + v * second[0], cov


def _norms(cov: Tensor, *pairs: Sequence) -> list[float]:
    """``‖D‖ = √(∂μᵀ C⁻¹ ∂μ + ½ tr(C⁻¹ ∂C C⁻¹ ∂C))`` of each pair ``D = (∂μ, ∂C or None)``: the norm ``F`` uses."""
    mean = torch.stack([p[0].to(torch.float64) for p in pairs])
    covs = None if pairs[0][1] is None else torch.stack([p[1].to(torch.float64) for p in pairs])
    return torch.diagonal(whitened_fisher(mean, cov, covs)).clamp_min(0).sqrt().tolist()
