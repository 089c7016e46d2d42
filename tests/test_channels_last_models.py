"""A model in channels-last layout (``model.to(memory_format=torch.channels_last)`` on channels-last inputs) has the
Fisher, the estimators and the variances of the same model in the default layout: the layout is storage, not
arithmetic. GroupNorm's forward-mode rule failed on a channels-last input ("view size is not compatible"), so every
second derivative (Î2, its variance, its bound) of such a model raised torch's error from inside the pass. The
oracle is the float64 Jacobian and Hessian of :mod:`oracles`, taken on the model in the default layout."""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import exact_fisher, variance_oracle
from torch import nn

import torchfim


class _Net(nn.Module):
    """conv → GroupNorm → tanh → flatten → Linear: the conv's output, GroupNorm's input, is channels-last."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.norm(self.conv(x))).flatten(1))


@pytest.fixture(scope="module")
def setting():
    torch.manual_seed(0)
    plain = _Net().double().eval()
    with torch.no_grad():  # affine parameters away from their defaults
        plain.norm.weight.uniform_(0.5, 1.5)
        plain.norm.bias.normal_()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    last = copy.deepcopy(plain).to(memory_format=torch.channels_last)
    assert last.conv.weight.is_contiguous(memory_format=torch.channels_last)
    return plain, x, last, x.to(memory_format=torch.channels_last), variance_oracle(plain, x, "categorical", 1)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_the_hessian_variance_of_a_channels_last_model_is_the_oracles(setting, backend: str) -> None:
    _, _, last, x_last, oracle = setting
    diag = torchfim.fisher_variance(last, x_last, estimator="hessian", structure="diag", backend=backend)
    trace = torchfim.fisher_variance(last, x_last, estimator="hessian", structure="trace", backend=backend)
    assert torch.allclose(diag, torch.diagonal(oracle["hessian"]), rtol=1e-8, atol=1e-16)
    assert torch.allclose(trace, oracle["hessian_trace"], rtol=1e-8, atol=0)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_the_hessian_estimate_of_a_channels_last_model_is_the_default_layouts(setting, backend: str) -> None:
    """The same labels (one seed) give the same Î2 in both layouts, and its bound holds its variance."""
    plain, x, last, x_last, oracle = setting
    estimates = [torchfim.fisher(m, xx, estimator="hessian", structure="diag", n_samples=3, backend=backend,
                                 generator=torch.Generator().manual_seed(2)) for m, xx in ((last, x_last), (plain, x))]
    assert torch.allclose(estimates[0], estimates[1], rtol=1e-10, atol=1e-15)
    bound = torchfim.variance_bound(last, x_last, estimator="hessian", structure="diag", backend=backend)
    assert bool((bound >= torch.diagonal(oracle["hessian"]) * (1 - 1e-9)).all())


def test_the_exact_fisher_of_a_channels_last_model_is_the_oracles(setting) -> None:
    plain, x, last, x_last, _ = setting
    full = torchfim.fisher(last, x_last, structure="full")
    assert torch.allclose(full, exact_fisher(plain, x, "categorical"), rtol=1e-10, atol=1e-15)
