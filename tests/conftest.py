"""Shared model factories for the tests (float64, seeded)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

# The tests use tiny models, for which thread start-up costs more than it saves.
torch.set_num_threads(1)

from oracles import FAMILY_WIDTH  # noqa: E402

FAMILIES = tuple(FAMILY_WIDTH)


def tanh_mlp(width: int, seed: int = 0, d_in: int = 3, hidden: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, width)
    ).double()


def relu_mlp(width: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, width)).double()


def tiny_cnn(width: int, seed: int = 0) -> nn.Module:
    """Conv → tanh → avg-pool → conv → tanh → linear on 1×6×6 images."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.Tanh(),
        nn.AvgPool2d(2),
        nn.Conv2d(2, 2, 2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(8, width),
    ).double()


def cnn_inputs(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mlp_inputs(n: int, seed: int = 1, d_in: int = 3) -> torch.Tensor:
    return torch.randn(n, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


MODELS = {
    "tanh_mlp": (tanh_mlp, mlp_inputs),
    "tiny_cnn": (tiny_cnn, cnn_inputs),
}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=tuple(MODELS))
def model_and_inputs(request: pytest.FixtureRequest, family: str) -> tuple[nn.Module, torch.Tensor]:
    make_model, make_inputs = MODELS[request.param]
    return make_model(FAMILY_WIDTH[family]), make_inputs(6)
