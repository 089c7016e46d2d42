"""Layers with a parametrized weight keep their rule; the originals' gradients follow by the chain rule.

Weight norm ``W = g ⊙ v/‖v‖``, spectral norm (eval) and an orthogonal map on Linear and convolution layers
(:mod:`torchfim.engine.modules.parametrized`), against the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of
:mod:`oracles`, whose Jacobians are taken with respect to the originals.
"""

from __future__ import annotations

import warnings

import clients
import pytest
import torch
from engine_checks import assert_equals_dense, assert_matches_functional, assert_quietly_equals_dense, module_rules
from oracles import exact_fisher
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal, spectral_norm, weight_norm

import torchfim
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.parametrized import ParametrizedRule


class _LearnedScale(nn.Module):
    """A parametrization with a parameter of its own: ``W ↦ s·W``."""

    def __init__(self) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.tensor(1.3))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.s * w


def _mlp(kind: str) -> nn.Module:
    torch.manual_seed(0)
    first, last = nn.Linear(4, 5), nn.Linear(5, 3)
    if kind == "weight_norm":
        first = weight_norm(first)
    elif kind == "spectral_norm":
        last = spectral_norm(last)
    elif kind == "orthogonal":
        first = orthogonal(nn.Linear(4, 4))
        last = nn.Linear(4, 3)
    elif kind == "frozen_norms":
        first = weight_norm(first)
        first.parametrizations.weight.original0.requires_grad_(False)
    elif kind == "learned":
        parametrize.register_parametrization(first, "weight", _LearnedScale())
    return nn.Sequential(first, nn.Tanh(), last).double().eval()


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    conv = weight_norm(nn.Conv2d(2, 3, 3, padding=1, stride=2))
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double().eval()


_MODELS = {"weight_norm": lambda: _mlp("weight_norm"), "spectral_norm": lambda: _mlp("spectral_norm"),
           "orthogonal": lambda: _mlp("orthogonal"), "frozen_norms": lambda: _mlp("frozen_norms"),
           "conv_weight_norm": _cnn}
_INPUTS = {"conv_weight_norm": (6, 2, 4, 4)}


@pytest.mark.parametrize("structure", ["diag", "layers", "full"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_parametrized_layers_keep_their_rule_and_equal_the_dense_oracle(name: str, structure: str) -> None:
    model = _MODELS[name]()
    x = torch.randn(*_INPUTS.get(name, (6, 4)), dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    backend, rules = assert_quietly_equals_dense(model, x, structure)
    parametrized = [path for path, m in model.named_modules() if parametrize.is_parametrized(m)]
    assert parametrized and all(isinstance(rules[p], ParametrizedRule) for p in parametrized)
    assert not backend.moved and not backend.demoted


@pytest.mark.parametrize(("name", "estimator"), [("weight_norm", "score"), ("weight_norm", "empirical"),
                                               ("spectral_norm", "score"), ("spectral_norm", "hessian"),
                                               ("orthogonal", "hessian")])
def test_parametrized_layers_give_every_estimator_and_variance_of_the_whole_model_backend(name: str, estimator: str) -> None:
    """(torch has no forward-mode derivative of its fused weight norm, which the Hessian estimator needs.)"""
    x = torch.randn(9, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert_matches_functional(_MODELS[name](), x, estimator,
                              torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2)))


def test_a_parametrization_with_parameters_of_its_own_goes_to_the_generic_rule_and_stays_exact() -> None:
    model, x = _mlp("learned"), torch.randn(6, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = exact_fisher(model, x, "categorical")
    assert_equals_dense(torchfim.fisher(model, x, structure="layers"), full, model, "layers")
    assert isinstance(module_rules(model, x)[1]["0"], GenericRule)


def test_hubert_keeps_its_weight_normed_position_convolution_on_the_convolution_rule() -> None:
    model, x = clients.tiny_hubert()
    logits = lambda out: out.logits  # noqa: E731
    reference = torchfim.fisher(model, x, structure="diag", output=logits, backend="functional")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing moved
        got = torchfim.fisher(model, x, structure="diag", output=logits)
    assert torch.allclose(got, reference, rtol=1e-10, atol=1e-14 * reference.abs().max())
    assert isinstance(module_rules(model, x, logits)[1]["hubert.encoder.pos_conv_embed.conv"], ParametrizedRule)
