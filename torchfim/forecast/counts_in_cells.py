"""Counts in cells of several tracers of one Gaussian field: the model and its Fisher matrix in closed form.

Tracer ``α`` (``α = 1..T``) has a mean count ``n̄_α`` per cell and a linear bias ``b_α``. In each
cell a Gaussian field ``δ ~ N(0, P)`` sets the Poisson rates ``λ_α = n̄_α (1 + b_α δ)`` and the
counts are ``N_α ~ Poisson(λ_α)``, independently given ``δ``. By the law of total covariance,

    ``C_αβ = Cov(N_α, N_β) = n̄_α n̄_β b_α b_β P + δ_αβ n̄_α``        (clustering + shot noise),

and the forecast treats the count fluctuations of one cell (or one Fourier mode) as a Gaussian data
vector with zero mean and covariance ``C``. The parameters are ``θ = (ln b_1, …, ln b_T, ln P)``.

With ``x_α = n̄_α b_α² P`` (signal-to-noise of tracer α) and ``X = Σ_α x_α``, the Fisher matrix
``F_ab = ½ tr(C⁻¹ ∂_a C C⁻¹ ∂_b C)`` of one cell is, in closed form (Abramo 2012; derivation in
``docs/forecast.md``):

    ``F[ln b_α, ln b_β] = δ_αβ X x_α / (1 + X) + x_α x_β (1 − X) / (1 + X)²``
    ``F[ln b_α, ln P]   = x_α X / (1 + X)²``
    ``F[ln P,   ln P]   = ½ (X / (1 + X))²``

The last is the FKP result for one tracer (``X = n̄ b² P``): information on the amplitude saturates
at ½ per cell when ``X ≫ 1`` (cosmic variance). Only ratios of biases escape that limit. The matrix
is singular: scaling ``P`` by ``e^{2t}`` and every bias by ``e^{−t}`` leaves ``C`` unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import TorchfimError, real_number, whole_number
from .gaussian import forecast
from .result import Forecast

__all__ = ["CountsInCells", "fkp_fisher", "multi_tracer_fisher"]

#: Largest ``b_α √P`` for which :meth:`CountsInCells.sample` can keep every rate positive.
_MAX_CONTRAST = 0.2


def fkp_fisher(signal_to_noise: Tensor | float) -> Tensor:
    """The FKP Fisher information on ``ln P`` of one Gaussian mode: ``½ (n̄P / (1 + n̄P))²``.

    ``signal_to_noise`` is ``n̄P`` (or ``n̄b²P`` for a biased tracer).

    Example:
        >>> from torchfim.forecast import fkp_fisher
        >>> float(fkp_fisher(1.0))     # n̄P = 1: a quarter of the cosmic-variance limit ½
        0.125
    """
    x = torch.as_tensor(signal_to_noise, dtype=torch.float64)
    if not bool((torch.isfinite(x) & (x >= 0)).all()):  # n̄P < 0 would give information, even infinite at −1
        raise TorchfimError(
            f"signal_to_noise (n̄P, or n̄b²P) must be finite and non-negative, got {signal_to_noise!r}; "
            "pass the mean count per cell times the power, both positive"
        )
    return 0.5 * (x / (1 + x)) ** 2


def multi_tracer_fisher(densities: Tensor, biases: Tensor, power: float) -> Tensor:
    """The closed-form Fisher matrix of one cell for ``θ = (ln b_1, …, ln b_T, ln P)`` (module docstring).

    Args:
        densities: ``(T,)`` mean counts per cell ``n̄_α`` of the tracers, positive.
        biases: ``(T,)`` their biases ``b_α``, positive.
        power: the variance ``P`` of the field in one cell, positive.

    Example:
        >>> import torch
        >>> from torchfim.forecast import multi_tracer_fisher
        >>> F = multi_tracer_fisher(torch.tensor([100.0]), torch.tensor([1.0]), 0.01)   # n̄b²P = 1
        >>> F
        tensor([[0.5000, 0.2500],
                [0.2500, 0.1250]], dtype=torch.float64)
    """
    densities, biases, power = _check_tracers(densities, biases, power)
    x = densities * biases**2 * power
    total = x.sum()
    n = x.numel()
    fisher = torch.empty(n + 1, n + 1, dtype=torch.float64)
    fisher[:n, :n] = torch.diag(total * x / (1 + total)) + torch.outer(x, x) * (1 - total) / (1 + total) ** 2
    fisher[:n, n] = fisher[n, :n] = x * total / (1 + total) ** 2
    fisher[n, n] = fkp_fisher(total)
    return fisher


class CountsInCells:
    """Counts of ``T`` tracers in one cell: Poisson noise on a Gaussian field (module docstring).

    Example:
        >>> import torch
        >>> from torchfim.forecast import CountsInCells
        >>> cells = CountsInCells(densities=[500.0, 100.0], biases=[1.0, 2.0], power=0.01)
        >>> cells.names
        ('ln b1', 'ln b2', 'ln P')
        >>> fc = cells.forecast()                 # one cell; (1000 * fc) for 1000 independent cells
        >>> round(float(fc.fix("ln b1", "ln b2").fisher), 6)     # FKP with X = 5 + 4 = 9
        0.405
    """

    def __init__(self, densities: Sequence[float] | Tensor, biases: Sequence[float] | Tensor, power: float) -> None:
        self.densities, self.biases, self.power = _check_tracers(densities, biases, power)
        n = self.densities.numel()
        self.names: tuple[str, ...] = tuple(f"ln b{a + 1}" for a in range(n)) + ("ln P",)
        self.theta0: Tensor = torch.cat([self.biases.log(), torch.tensor([self.power], dtype=torch.float64).log()])

    def covariance(self, theta: Tensor) -> Tensor:
        """``C_αβ = n̄_α n̄_β b_α b_β P + δ_αβ n̄_α`` with ``b = exp(θ[:T])`` and ``P = exp(θ[T])``."""
        weighted = self.densities.to(theta.dtype) * theta[:-1].exp()
        return theta[-1].exp() * torch.outer(weighted, weighted) + torch.diag(self.densities.to(theta.dtype))

    def forecast(self, *, derivatives: str = "autograd", step: object = None) -> Forecast:
        """The Fisher forecast of one cell by :func:`torchfim.forecast.forecast` (no closed form used).

        ``derivatives`` (``"autograd"``, ``"stencil3"`` or ``"stencil5"``) and ``step`` (the stencils' step, one
        number or one per parameter) are passed on to :func:`torchfim.forecast.forecast`.
        """
        zero_mean = torch.zeros(self.densities.numel(), dtype=torch.float64)
        return forecast(zero_mean, self.covariance, self.theta0, derivatives=derivatives, step=step, names=self.names)

    def sample(self, n_cells: int, generator: torch.Generator) -> Tensor:
        """Counts ``(n_cells, T)``: ``δ ~ N(0, P)`` per cell, then ``N_α ~ Poisson(n̄_α (1 + b_α δ))``.

        Needs ``b_α √P ≤ 0.2`` so that a negative rate (a 5σ field) is negligible; those rare
        rates are set to zero.
        """
        cells = whole_number(n_cells)
        if cells is None or cells < 0:
            raise TorchfimError(f"n_cells must be a non-negative integer (cells to sample), got {n_cells!r}")
        contrast = float(self.biases.max()) * self.power**0.5
        if contrast > _MAX_CONTRAST:
            raise TorchfimError(
                f"b·√P = {contrast:.3g} is too large for Gaussian rates to stay positive; sample with "
                f"b·√P ≤ {_MAX_CONTRAST} (a smaller power or bias)"
            )
        field = self.power**0.5 * torch.randn(cells, 1, generator=generator, dtype=torch.float64)
        rates = (self.densities * (1 + self.biases * field)).clamp_min(0)
        return torch.poisson(rates, generator=generator)


def _check_tracers(densities: object, biases: object, power: object) -> tuple[Tensor, Tensor, float]:
    densities = torch.as_tensor(densities, dtype=torch.float64).reshape(-1)
    biases = torch.as_tensor(biases, dtype=torch.float64).reshape(-1)
    if densities.numel() == 0 or densities.shape != biases.shape:
        raise TorchfimError(
            f"densities and biases must have one entry per tracer, got {densities.numel()} and {biases.numel()}"
        )
    # An infinite bias or power is no tracer either: the Fisher matrix would be all NaN.
    finite = bool(torch.isfinite(densities).all() & torch.isfinite(biases).all())
    if not bool((densities > 0).all() & (biases > 0).all()) or not finite:
        raise TorchfimError(
            f"densities (mean counts per cell) and biases must be positive and finite, got {densities.tolist()} and "
            f"{biases.tolist()}; pass finite positive numbers"
        )
    value = real_number(power)
    if value is None or not (value > 0 and math.isfinite(value)):
        raise TorchfimError(
            f"power must be a positive finite number (the field's variance per cell, such as 0.01), got {power!r}"
        )
    return densities, biases, value
