"""The Poisson family: log-rates, one per output."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError
from .base import Family, _isserlis, _isserlis_moment4, _isserlis_quadratic, _to_generator_device


class Poisson(Family):
    """Independent Poisson counts with log-rates ``o``: ``λ = exp(o)``.

    ``u = y − λ``; ``Λ = diag(λ)``; fourth moments: Isserlis pairings of ``Λ`` plus
    the fourth cumulant ``λ_a`` when ``a = b = c = d``.
    """

    name = "poisson"

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        y = super().check_targets(y, o)
        if bool((y < 0).any()) or not bool((y == y.round()).all()):
            raise TorchfimError("poisson targets must be non-negative integer counts")
        return y

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        rate = _to_generator_device(torch.exp(o.detach()), generator)
        rate = rate.unsqueeze(1).expand(rate.shape[0], k, rate.shape[1]).contiguous()
        return torch.poisson(rate, generator=generator).to(o.device)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        return y.to(o.dtype) - torch.exp(self._align(y, o))

    def fisher_output(self, o: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(o))

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(0.5 * o))

    def fourth_moment(self, o: Tensor) -> Tensor:
        rate = torch.exp(o)
        moments = _isserlis(torch.diag_embed(rate))
        idx = torch.arange(o.shape[-1], device=o.device)
        moments[:, idx, idx, idx, idx] += rate
        return moments

    # The fourth cumulant λ_a adds to the Gaussian (Isserlis) part when a = b = c = d.
    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        rate = torch.exp(o)
        return _isserlis_moment4(rate, v, w) + (rate.unsqueeze(1) * v**2 * w**2).sum(-1)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        rate = torch.exp(o)
        return _isserlis_quadratic(rate, k) + (rate * torch.diagonal(k, dim1=-2, dim2=-1) ** 2).sum(-1)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        logr = self._align(y, o)
        y = y.to(o.dtype)
        return (y * logr - torch.exp(logr) - torch.lgamma(y + 1)).sum(-1)
