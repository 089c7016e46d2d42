"""Class labels given to the Gaussian family: an integer tensor of one class index per input, as classification has,
is named as such with the fix (family='categorical') where its shape does not fit the outputs, and integer targets
that do fit are still read as real values, with a warning that says how to mean either. Float targets say nothing.
The oracle is a float64 brute force of the empirical Fisher's trace, ``(1/n) Σᵢ ‖Jᵢᵀ (yᵢ − oᵢ)‖²`` for σ = 1.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

import torchfim
from torchfim import TorchfimError
from torchfim.families import get_family


def _model_and_inputs(outputs: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, outputs)).double()
    return model, torch.randn(10, 4, dtype=torch.float64)


def _empirical_trace(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """``(1/n) Σᵢ ‖Jᵢᵀ (yᵢ − oᵢ)‖²`` by jacobians of each input's outputs (Gaussian, σ = 1)."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    total = 0.0
    for xi, yi in zip(x, y.double().reshape(len(x), -1)):
        jac = jacrev(lambda p, xi=xi: functional_call(model, p, (xi[None],))[0])(params)
        residual = yi - model(xi[None])[0].detach()
        total += sum(float(torch.einsum("c,c...->...", residual, j).square().sum()) for j in jac.values())
    return total / len(x)


def test_class_indices_for_a_gaussian_are_named_with_the_fix() -> None:
    model, x = _model_and_inputs(3)
    labels = torch.randint(0, 3, (10,))
    with pytest.raises(TorchfimError, match=r"got \(10,\); integer targets, one per input, look like class indices: "
                                            r"pass family='categorical' .*else targets of shape \(10, 3\)"):
        torchfim.fisher(model, x, family="gaussian", estimator="empirical", targets=labels, structure="trace")
    with pytest.raises(TorchfimError, match=r"got \(10,\); pass one target per input"):  # floats: no class hint
        torchfim.fisher(model, x, family="gaussian", estimator="empirical", targets=labels.double(), structure="trace")
    with pytest.raises(TorchfimError, match="look like class indices"):  # the family's own check, any family
        get_family("poisson").check_targets(labels, model(x))


@pytest.mark.parametrize("outputs, shape", [(1, (10,)), (3, (10, 3))])
def test_integer_targets_that_fit_are_read_as_values_with_a_warning(outputs: int, shape: tuple[int, ...]) -> None:
    model, x = _model_and_inputs(outputs)
    y = torch.randint(0, 3, shape)
    want = _empirical_trace(model, x, y)
    with pytest.warns(RuntimeWarning, match=r"targets for family 'gaussian' are torch.int64 integers.*"
                                            r"family='categorical'.*family='bernoulli'.*y\.float\(\)"):
        got = torchfim.fisher(model, x, family="gaussian", estimator="empirical", targets=y, structure="trace")
    assert float(got) == pytest.approx(want, rel=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # real-valued targets, and integers where the family counts them: no warning
        got = torchfim.fisher(model, x, family="gaussian", estimator="empirical", targets=y.double(), structure="trace")
        torchfim.fisher(model, x, family="poisson", estimator="empirical", targets=y, structure="trace")
    assert float(got) == pytest.approx(want, rel=1e-10)
