"""What the tests of torchfim.forecast share: float64, a positive definite matrix, the relative error, and
the abscissae of the non-linear model.
"""

from __future__ import annotations

import torch

F64 = torch.float64


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


#: Five abscissae in [-1, 1]: the non-linear model's (test_forecast_fisher.py) and linear models' (test_forecast_result.py).
X = torch.linspace(-1, 1, 5, dtype=F64)
