"""Layers whose weight one of torch's forward pre-hooks computes keep their rule (:mod:`torchfim.engine.modules.hooked`).

Pruning (``W = W_orig ⊙ M``), the older weight norm (``W = g ⊙ v/‖v‖``) and the older spectral norm
(``W = W_orig/σ``) on Linear and convolution layers, against the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of
:mod:`oracles`, whose Jacobians are taken with respect to the originals. Before, each such layer went to the
generic rule (exact, and 10-100 times slower on a pruned MLP).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import assert_equals_dense, assert_matches_functional, assert_quietly_equals_dense, module_rules
from oracles import exact_fisher
from torch import nn
from torch.nn.utils import prune

import torchfim
from torchfim.engine.modules.parametrized import ParametrizedRule


def _old_weight_norm(layer: nn.Module, **kw) -> nn.Module:
    with warnings.catch_warnings():  # torch deprecates this spelling for the parametrization
        warnings.simplefilter("ignore", FutureWarning)
        return torch.nn.utils.weight_norm(layer, **kw)


def _mlp(kind: str) -> nn.Module:
    torch.manual_seed(0)
    first, last = nn.Linear(4, 5), nn.Linear(5, 3)
    if kind == "pruned":
        prune.l1_unstructured(first, "weight", amount=0.4)
        prune.random_unstructured(last, "bias", amount=0.34)
    elif kind == "pruned_twice":  # a PruningContainer: the masks combined
        prune.l1_unstructured(first, "weight", amount=0.3)
        prune.ln_structured(first, "weight", amount=0.4, n=2, dim=0)
    elif kind == "weight_norm":
        first, last = _old_weight_norm(first), _old_weight_norm(last, dim=None)
    elif kind == "spectral_norm":
        first = torch.nn.utils.spectral_norm(first)
    elif kind == "frozen_original":
        prune.l1_unstructured(first, "weight", amount=0.4)
        first.weight_orig.requires_grad_(False)
    return nn.Sequential(first, nn.Tanh(), last).double().eval()


def _cnn(kind: str) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1, stride=2)
    if kind == "conv_pruned":
        prune.random_structured(conv, "weight", amount=0.34, dim=0)
    elif kind == "conv_weight_norm":
        conv = _old_weight_norm(conv, dim=1)
    else:
        conv = torch.nn.utils.spectral_norm(conv)
    return nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(12, 3)).double().eval()


_MODELS = {**{k: (lambda k=k: _mlp(k)) for k in ("pruned", "pruned_twice", "weight_norm", "spectral_norm")},
           **{k: (lambda k=k: _cnn(k)) for k in ("conv_pruned", "conv_weight_norm", "conv_spectral_norm")}}


def _inputs(name: str, n: int = 6, seed: int = 1) -> torch.Tensor:
    shape = (n, 2, 4, 4) if name.startswith("conv") else (n, 4)
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _hooked(model: nn.Module) -> list[str]:
    return [path for path, m in model.named_modules() if m._forward_pre_hooks]


@pytest.mark.parametrize("structure", ["diag", "layers", "full"])
@pytest.mark.parametrize("name", list(_MODELS))
def test_hooked_layers_keep_their_rule_and_equal_the_dense_oracle(name: str, structure: str) -> None:
    model = _MODELS[name]()
    backend, rules = assert_quietly_equals_dense(model, _inputs(name), structure)
    assert _hooked(model) and all(isinstance(rules[p], ParametrizedRule) for p in _hooked(model))
    assert not backend.moved and not backend.demoted


@pytest.mark.parametrize(("name", "estimator"), [("pruned", "score"), ("pruned", "hessian"), ("pruned", "empirical"),
                                               ("weight_norm", "score"), ("conv_spectral_norm", "hessian")])
def test_hooked_layers_give_every_estimator_and_variance_of_the_whole_model_backend(name: str, estimator: str) -> None:
    targets = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(2))
    assert_matches_functional(_MODELS[name](), _inputs(name, 9, seed=3), estimator, targets)


def test_a_pruned_layer_squares_by_its_mask_without_forming_per_sample_gradients() -> None:
    """The diagonal's shortcut: ``(G ⊙ M)² = G² ⊙ M²`` from the Linear rule's squares (what makes a pruned
    MLP's diagonal as fast as the unpruned one's); the weight norm has no such shortcut."""
    x = _inputs("pruned")
    pruned, normed = module_rules(_mlp("pruned"), x)[1]["0"], module_rules(_mlp("weight_norm"), x)[1]["0"]
    assert set(pruned.elementwise) == {"weight"} and not normed.elementwise
    assert pruned.squares.__func__ is ParametrizedRule.squares


def test_a_frozen_original_leaves_the_layer_its_other_parameters() -> None:
    model, x = _mlp("frozen_original"), _inputs("pruned")
    full = exact_fisher(model, x, "categorical")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_equals_dense(torchfim.fisher(model, x, structure="layers"), full, model, "layers")
    rule = module_rules(model, x)[1]["0"]
    assert isinstance(rule, ParametrizedRule) and set(rule.params) == {"bias"}


def test_the_spectral_norm_hook_in_training_mode_holds_sigma_and_keeps_its_rule() -> None:
    """The hook's power iteration is paused on the engine's copy (:mod:`torchfim.engine.derivative_settings`)."""
    model, x = _mlp("spectral_norm").train(), _inputs("pruned")
    before = [b.clone() for b in model.buffers()]
    full = exact_fisher(_mlp("spectral_norm"), x, "categorical")
    assert_equals_dense(torchfim.fisher(model, x, structure="full"), full, model, "full")
    assert all(torch.equal(a, b) for a, b in zip(model.buffers(), before))
    assert isinstance(module_rules(model, x)[1]["0"], ParametrizedRule)
