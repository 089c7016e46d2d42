"""Confidence ellipses of two parameters from a Fisher forecast.

For a Gaussian posterior with covariance ``Σ = F⁻¹``, the marginal distribution of two parameters
``(θ_i, θ_j)`` is Gaussian with the 2×2 block ``S`` of ``Σ``, and the region holding probability
``p`` is the ellipse ``(θ − θ₀)ᵀ S⁻¹ (θ − θ₀) ≤ Δχ²(p)`` with ``Δχ²(p) = −2 ln(1 − p)`` (the
quantile of a χ² with two degrees of freedom): 2.30 for the one-sigma level ``p = erf(1/√2)``
(68.3%), 6.18 for the two-sigma level ``p = erf(2/√2)`` (95.4%).

matplotlib is imported only when a plot is drawn, so the library works without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import TorchfimError, real_number, whole_number
from .stability import symmetric_matrix

__all__ = ["ONE_SIGMA", "TWO_SIGMA", "delta_chi2", "draw_ellipses", "ellipse_points"]

#: The probabilities within one and two standard deviations of a one-dimensional Gaussian.
ONE_SIGMA = math.erf(1 / math.sqrt(2))
TWO_SIGMA = math.erf(2 / math.sqrt(2))

#: Line styles of successive confidence levels, innermost first.
_LINESTYLES = ("-", "--", ":", "-.")


def delta_chi2(level: float) -> float:
    """``Δχ² = −2 ln(1 − level)``: the two-parameter contour holding probability ``level``.

    Example:
        >>> from torchfim.forecast import ONE_SIGMA, TWO_SIGMA, delta_chi2
        >>> round(delta_chi2(ONE_SIGMA), 2), round(delta_chi2(TWO_SIGMA), 2)
        (2.3, 6.18)
    """
    probability = real_number(level)  # a NumPy number or 0-dim tensor is as good as a float
    if probability is None or not 0 < probability < 1:
        raise TorchfimError(f"a confidence level must be a probability in (0, 1) such as 0.95, got {level!r}")
    return -2.0 * math.log1p(-probability)


def ellipse_points(
    cov2: Tensor, center: Sequence[float] | Tensor, level: float = ONE_SIGMA, n_points: int = 200
) -> Tensor:
    """``n_points`` points on the boundary ``(x − c)ᵀ S⁻¹ (x − c) = Δχ²(level)``, shape ``(n_points, 2)``.

    ``cov2`` is the 2×2 marginal covariance ``S``; the boundary is ``c + √Δχ² · L (cos t, sin t)``
    with ``S = L Lᵀ`` (Cholesky), ``t`` uniform on ``[0, 2π]`` (first and last points coincide). ``center``
    is the ellipse's centre ``c``, two numbers (the two parameters' fiducial values); ``level`` the confidence
    level that fixes ``Δχ²`` for two parameters (:func:`delta_chi2`).

    Example:
        >>> import torch
        >>> from torchfim.forecast import ellipse_points
        >>> pts = ellipse_points(torch.eye(2, dtype=torch.float64), [0.0, 0.0], n_points=5)
        >>> [round(float(r), 3) for r in pts.norm(dim=1)]    # a circle of radius √2.30
        [1.515, 1.515, 1.515, 1.515, 1.515]
    """
    cov2, _ = symmetric_matrix(cov2, what="cov2 (the 2x2 covariance of two parameters)", symbol="S")
    if tuple(cov2.shape) != (2, 2):
        raise TorchfimError(f"cov2 must be the 2x2 covariance of two parameters, got shape {tuple(cov2.shape)}")
    factor, info = torch.linalg.cholesky_ex(cov2)
    if int(info) != 0:
        raise TorchfimError("cov2 is not positive definite, so the two parameters have no confidence ellipse")
    count = whole_number(n_points)
    if count is None or count < 1:
        raise TorchfimError(f"n_points must be a positive integer such as 200, got {n_points!r}")
    angles = torch.linspace(0.0, 2 * math.pi, count, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()], dim=1)
    return _center(center) + math.sqrt(delta_chi2(level)) * circle @ factor.T


def draw_ellipses(
    cov2: Tensor,
    center: Sequence[float] | Tensor,
    *,
    levels: float | Sequence[float] = (ONE_SIGMA, TWO_SIGMA),
    labels: tuple[str, str] = ("x", "y"),
    ax: Any = None,
    **plot_kwargs: Any,
) -> Any:
    """Draw the ``levels`` ellipses of ``cov2`` around ``center`` on ``ax`` (a new figure if ``None``); return ``ax``.

    ``levels`` is one confidence level or several. ``plot_kwargs`` go to ``ax.plot`` (``color``,
    ``linestyle``, …, or matplotlib's short names ``c``, ``ls``, ``lw``) and override the defaults:
    without a ``linestyle`` the levels are solid, dashed, dotted, …; without a ``label`` each is labelled
    with its level (``68.3%``), with one only the innermost carries it (one legend entry per forecast).
    Needs matplotlib unless ``ax`` is given.
    """
    plot_kwargs = _full_names(plot_kwargs)
    levels = (levels,) if real_number(levels) is not None else tuple(levels)
    center = _center(center)[0]
    if ax is None:
        ax = _pyplot().subplots()[1]
    plot_kwargs.setdefault("color", "C0")
    label = plot_kwargs.pop("label", None)
    for k, level in enumerate(levels):
        points = ellipse_points(cov2, center, level)
        # A label of the user's names the innermost ellipse alone: one legend entry per forecast, not per level.
        name = f"{100 * real_number(level):.1f}%" if label is None else label if k == 0 else "_nolegend_"
        style = {"linestyle": _LINESTYLES[k % len(_LINESTYLES)], "label": name, **plot_kwargs}
        ax.plot(points[:, 0].numpy(), points[:, 1].numpy(), **style)
    ax.plot([float(center[0])], [float(center[1])], marker="+", color=plot_kwargs["color"], linestyle="none")
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    return ax


#: matplotlib's short names of the line properties whose defaults draw_ellipses sets or reads.
_ALIASES = {"c": "color", "ls": "linestyle", "lw": "linewidth"}


def _full_names(plot_kwargs: dict[str, Any]) -> dict[str, Any]:
    """``plot_kwargs`` with matplotlib's short names spelled out, so that they override the defaults (matplotlib
    refuses ``ls`` beside the default ``linestyle``)."""
    full = dict(plot_kwargs)
    for short, name in _ALIASES.items():
        if short in full:
            if name in full:
                raise TorchfimError(f"got both {short}= and {name}=, which are the same line property; pass one")
            full[name] = full.pop(short)
    return full


def _center(center: object) -> Tensor:
    """The ellipse's centre as a ``(1, 2)`` float64 tensor; a :class:`TorchfimError` for anything but two numbers."""
    try:
        point = torch.as_tensor(center, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TorchfimError(f"center must be two numbers, the two parameters' fiducial values; got {center!r}") from err
    if point.numel() != 2 or not bool(torch.isfinite(point).all()):
        raise TorchfimError(
            f"center must be two finite numbers, the two parameters' fiducial values; got {center!r}"
        )
    return point.reshape(1, 2)


def _pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise TorchfimError(
            "plotting an ellipse needs matplotlib, which is not installed; run `pip install matplotlib` "
            "(or install torchfim with the cli extra)"
        ) from err
    return plt
