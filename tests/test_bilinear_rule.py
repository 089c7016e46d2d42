"""``nn.Bilinear`` on a rule of its own (:mod:`torchfim.engine.modules.bilinear`), against the dense oracle.

``z_k = x₁ᵀ W_k x₂ + b_k``: a Linear layer's products on ``x₁ ⊗ x₂``, with the squares and squared norms
factored where each sample has one position. Before, the layer went to the generic rule.
"""

from __future__ import annotations

import pytest
import torch
from engine_checks import assert_equals_dense, assert_matches_functional, assert_quietly_equals_dense, module_rules
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.engine.modules.bilinear import BilinearRule


class _Pair(nn.Module):
    """Two views of the input through a bilinear layer (at each position where ``positions``), tanh, head."""

    def __init__(self, positions: bool, bias: bool) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(3, 4, 5, bias=bias)
        self.head = nn.Linear(5, 3)
        self.positions = positions

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.tanh(self.bilinear(x[..., :3], input2=torch.tanh(x[..., 2:6])))
        return self.head(z.mean(1) if self.positions else z)


def _model(positions: bool, bias: bool = True, frozen: str | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _Pair(positions, bias).double().eval()
    if frozen:
        getattr(model.bilinear, frozen).requires_grad_(False)
    shape = (6, 4, 6) if positions else (6, 6)
    return model, torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("structure", ["diag", "layers", "full"])
@pytest.mark.parametrize(("positions", "bias"), [(False, True), (True, True), (False, False)])
def test_bilinear_layers_keep_their_rule_and_equal_the_dense_oracle(positions: bool, bias: bool, structure: str) -> None:
    backend, rules = assert_quietly_equals_dense(*_model(positions, bias), structure)
    assert isinstance(rules["bilinear"], BilinearRule) and not backend.moved and not backend.demoted


@pytest.mark.parametrize("frozen", ["weight", "bias"])
def test_a_frozen_bilinear_tensor_leaves_the_other_on_the_rule(frozen: str) -> None:
    model, x = _model(False, frozen=frozen)
    assert_equals_dense(torchfim.fisher(model, x, structure="diag"), exact_fisher(model, x, "categorical"), model, "diag")
    assert set(module_rules(model, x)[1]["bilinear"].params) == {"weight", "bias"} - {frozen}


@pytest.mark.parametrize("positions", [False, True])
@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_bilinear_layers_give_the_whole_model_backends_estimators_and_variances(estimator: str, positions: bool) -> None:
    """The score's per-sample squared norms (its trace variances) through the factored shortcut where each
    sample has one position, through per-sample gradients where it has several."""
    model, x = _model(positions)
    assert_matches_functional(model, x, estimator, torch.randint(0, 3, (len(x),)))
