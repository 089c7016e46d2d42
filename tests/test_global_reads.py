"""A hook or function that reads a parameter through a name outside the model.

In a notebook a forward hook is often written against the model's global name,
``layer.register_forward_hook(lambda m, a, out: out @ model[2].weight.T + model[0].bias)``. Such a read
reaches the user's tensor itself, not the engine's copy of the module tree, and a stand-in that
``torch.func.functional_call`` puts in the copy's slot never reaches it (closures, bound methods and
containers that hold a module are rebuilt around the copy; a global name is not). Before, both backends
took that use for a constant: **the exact diagonal 14 % off**, with a warning that said the result stayed
exact. Now the per-module backend's coverage check gives such parameters products by autograd on the
tensors themselves, one sample at a time, and ``backend="functional"`` refuses the model with the fix.
Oracles: those of ``test_engine_oracles`` (float64 Jacobians of the user's model through
``functional_call`` on the user's own tree, where the global read sees the substituted tensor).
"""

from __future__ import annotations

import functools
import warnings
import weakref

import pytest
import torch
from cases import ALL_FAMILIES, Case, mlp_inputs, tanh_mlp
from test_engine_oracles import _close, _oracle, _view
from torch import Tensor, nn

import torchfim
from torchfim.errors import TorchfimError

#: The models by a key that their hooks hold (an int: nothing that the engine's copy would rebuild).
_MODELS: weakref.WeakValueDictionary[int, nn.Module] = weakref.WeakValueDictionary()


def _reads_the_global_model(key: int, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
    model = _MODELS[key]  # as a notebook's hook reads the global `model`
    return out @ model[2].weight.T + model[0].bias


def global_reads(c: int) -> nn.Module:
    """``tanh_mlp`` whose hidden layer's output goes on through its own weight and the first layer's bias,
    both read through the model's global name."""
    model = tanh_mlp(c)
    _MODELS[id(model)] = model
    model[2].register_forward_hook(functools.partial(_reads_the_global_model, id(model)))
    return model


CASE = Case("global_reads", global_reads, mlp_inputs)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_exact_fisher_counts_reads_through_a_global_name(family: str) -> None:
    res = _oracle(CASE, family)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = {s: torchfim.fisher(res["model"], res["x"], family=family, structure=s, backend="modules")
               for s in ("full", "diag", "trace", "blocks")}
    for structure, value in got.items():
        _close(value, _view(res["exact"], structure, res["model"]), 1e-10)
    assert any("read through a name outside the model" in str(w.message) for w in caught)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_the_score_variance_and_estimator_count_reads_through_a_global_name(family: str) -> None:
    res = _oracle(CASE, family)
    for structure in ("diag", "trace"):
        got = torchfim.fisher_variance(res["model"], res["x"], family=family, estimator="score",
                                       structure=structure, backend="modules")
        want = res["var_score_trace"] if structure == "trace" else _view(res["var_score"], structure, res["model"])
        _close(got, want, 1e-8)
    k = 400
    est = torchfim.fisher(res["model"], res["x"], family=family, estimator="score", structure="trace",
                          n_samples=k, generator=torch.Generator().manual_seed(3))
    se = (float(res["var_score_trace"]) / k) ** 0.5
    assert abs(float(est) - float(torch.diagonal(res["exact"]).sum())) <= 4 * se


@pytest.mark.parametrize("compute", [
    lambda m, x: torchfim.fisher(m, x, estimator="hessian", structure="diag"),
    lambda m, x: torchfim.fisher(m, x, estimator="hessian", structure="full"),
    lambda m, x: torchfim.fisher_variance(m, x, estimator="hessian", structure="trace"),
])
def test_second_derivatives_of_parameters_read_through_a_global_name_are_refused(compute: object) -> None:
    """Forward-mode AD along a stand-in cannot follow the read (before: the Hessian variance's diagonal off by
    97 % of its largest entry, and the result carried an autograd graph)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coverage check's, tested above
        with pytest.raises(TorchfimError, match=r"second derivatives of '0.bias'.* estimator='score'"):
            compute(global_reads(3), mlp_inputs(5))


def test_the_functional_backend_refuses_reads_through_a_global_name() -> None:
    model = global_reads(3)
    with pytest.raises(TorchfimError, match=r"reads parameters '0.bias', '2.weight' through a name outside the model.*backend='auto'"):
        torchfim.fisher(model, mlp_inputs(5), backend="functional")


def test_a_model_without_such_reads_passes_the_functional_check() -> None:
    """The check follows reads of the tensors themselves only: the same model with its hook reading through
    the hook's module argument (which the copy rebinds) is computed by the functional backend, exactly."""
    res = _oracle(Case("module_reads", _reading_the_module, mlp_inputs), "categorical")
    got = torchfim.fisher(res["model"], res["x"], structure="full", backend="functional")
    _close(got, res["exact"], 1e-10)


def _reading_the_module(c: int) -> nn.Module:
    model = tanh_mlp(c)
    first = model[0]
    model[2].register_forward_hook(lambda module, args, out: out @ module.weight.T + first.bias)
    return model
