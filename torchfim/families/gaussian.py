"""The Gaussian family with fixed variance, parametrised by its mean."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import TorchfimError
from .base import Family, _isserlis, _isserlis_moment4, _isserlis_quadratic


class Gaussian(Family):
    """Gaussian ``N(o, σ² I)`` with fixed ``σ`` and mean ``o``.

    ``u = (y − o)/σ²``; ``Λ = I/σ²``; fourth moments by Isserlis' theorem.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise TorchfimError(f"Gaussian sigma must be a positive finite number, got {sigma!r}")
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        mean = o.detach()
        noise = torch.randn(
            (o.shape[0], k, o.shape[1]),
            generator=generator,
            dtype=o.dtype,
            device=generator.device if generator is not None else o.device,
        ).to(o.device)
        return mean.unsqueeze(1) + self.sigma * noise

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        return (y.to(o.dtype) - self._align(y, o)) / self.sigma**2

    def fisher_output(self, o: Tensor) -> Tensor:
        eye = torch.eye(o.shape[-1], dtype=o.dtype, device=o.device)
        return (eye / self.sigma**2).expand(o.shape[0], -1, -1)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        eye = torch.eye(o.shape[-1], dtype=o.dtype, device=o.device)
        return (eye / self.sigma).expand(o.shape[0], -1, -1)

    def fourth_moment(self, o: Tensor) -> Tensor:
        return _isserlis(self.fisher_output(o))

    def _lam_diag(self, o: Tensor) -> Tensor:
        return torch.full_like(o, 1 / self.sigma**2)

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        return _isserlis_moment4(self._lam_diag(o), v, w)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        return _isserlis_quadratic(self._lam_diag(o), k)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        diff = y.to(o.dtype) - self._align(y, o)
        c = o.shape[-1]
        return -0.5 * (diff**2).sum(-1) / self.sigma**2 - 0.5 * c * math.log(2 * math.pi * self.sigma**2)
