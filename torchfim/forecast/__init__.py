"""Fisher forecasts for Gaussian data vectors, as cosmologists compute them.

For a data vector ``x ~ N(μ(θ), C(θ))`` the Fisher matrix at the fiducial ``θ₀`` is

    ``F_ab = ∂_a μᵀ C⁻¹ ∂_b μ + ½ tr(C⁻¹ ∂_a C C⁻¹ ∂_b C)``

for one draw of ``x`` (``n`` independent draws: ``n·F``). The derivatives come from forward-mode
autograd or from 3- and 5-point central stencils. Because badly chosen stencil steps and
ill-conditioned Fisher matrices make forecasts unstable (Bhandari, Leonard, Rau & Mandelbaum,
arXiv:2101.00298), the package also scans steps for the plateau where a derivative is stable and
diagnoses the inversion of ``F``.

* :func:`forecast` → :class:`Forecast`: ``.fisher``, ``.covariance()`` (``F⁻¹``, float64, via the
  unit-free eigendecomposition), ``.marginal_errors()`` (``√(F⁻¹)_aa``), ``.conditional_errors()``
  (``1/√F_aa``), ``.diagnostics()``, ``.fix(...)``, ``.plot_ellipse(i, j)`` (needs matplotlib).
* :func:`scan_steps` → :class:`StepScan`: per parameter the steps tried, the derivative with each,
  the change between neighbours, the plateau and the ``round_off``/``truncation`` flags.
* :func:`inversion_diagnostics` → :class:`InversionDiagnostics`: condition numbers, eigenvalues,
  and how far the marginal errors move when ``F`` is perturbed.
* :class:`CountsInCells`, :func:`multi_tracer_fisher`, :func:`fkp_fisher`: the multi-tracer
  counts-in-cells model (Poisson noise on Gaussian clustering) and its closed-form Fisher matrix
  (Abramo 2012), which reduces to the FKP result for one tracer.

The derivations are in ``docs/forecast.md``.

Example:
    >>> import torch
    >>> from torchfim.forecast import forecast
    >>> x = torch.linspace(0, 1, 5, dtype=torch.float64)
    >>> fc = forecast(lambda t: t[0] + t[1] * x, torch.eye(5, dtype=torch.float64),
    ...               torch.tensor([0.0, 1.0], dtype=torch.float64), names=["intercept", "slope"])
    >>> print(fc)
    parameter      theta0  marginal σ  conditional σ
    intercept           0      0.7746         0.4472
    slope               1       1.265         0.7303
"""

from .counts_in_cells import CountsInCells, fkp_fisher, multi_tracer_fisher
from .derivatives import DERIVATIVES, default_steps
from .ellipse import ONE_SIGMA, TWO_SIGMA, delta_chi2, ellipse_points
from .gaussian import forecast, gaussian_fisher
from .result import Forecast
from .stability import InversionDiagnostics, inversion_diagnostics, stable_inverse
from .stepscan import ParameterScan, StepScan, scan_steps

__all__ = [
    "DERIVATIVES",
    "ONE_SIGMA",
    "TWO_SIGMA",
    "CountsInCells",
    "Forecast",
    "InversionDiagnostics",
    "ParameterScan",
    "StepScan",
    "default_steps",
    "delta_chi2",
    "ellipse_points",
    "fkp_fisher",
    "forecast",
    "gaussian_fisher",
    "inversion_diagnostics",
    "multi_tracer_fisher",
    "scan_steps",
    "stable_inverse",
]
