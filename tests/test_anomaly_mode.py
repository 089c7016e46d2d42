"""torchfim inside ``torch.autograd.set_detect_anomaly(True)``, where users look for the NaN of their training.

Anomaly mode checks every gradient for NaN by reading a Python bool, which a backward batched over several
output vectors cannot do: it failed, torch printed that failure as "Error detected in ViewBackward0" with a
traceback into torchfim (as if the user's model had an anomaly), and the pull-back went on vector by vector.
Now the pull-back goes vector by vector from the start in anomaly mode. The oracles are the dense float64
definitions (:mod:`oracles`), and the warnings are recorded.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import BY_NAME
from oracles import blocks, exact_fisher, variance_oracle

import torchfim

NAMES = ("layer_norm_mlp", "custom", "gru", "strided_cnn")


def _anomalies(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message).splitlines()[0] for w in record if "Error detected" in str(w.message)]


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("name", NAMES)
def test_the_exact_fisher_in_anomaly_mode_is_the_definition_without_anomalies(name: str, structure: str) -> None:
    case = BY_NAME[name]
    model, x = case.build(3), case.inputs(5)
    dense = exact_fisher(model, x, "categorical")
    with warnings.catch_warnings(record=True) as record, torch.autograd.set_detect_anomaly(True):
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure=structure, backend="modules")
    assert _anomalies(record) == []
    torch.testing.assert_close(got, dense.diagonal() if structure == "diag" else dense, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_the_variances_in_anomaly_mode_are_the_closed_forms_without_anomalies(name: str) -> None:
    case = BY_NAME[name]
    model, x = case.build(3), case.inputs(4)
    oracle = variance_oracle(model, x, "categorical", 1)
    with warnings.catch_warnings(record=True) as record, torch.autograd.set_detect_anomaly(True):
        warnings.simplefilter("always")
        score = torchfim.fisher_variance(model, x, estimator="score", structure="layers", backend="modules")
        hessian = torchfim.fisher_variance(model, x, estimator="hessian", structure="diag", backend="modules")
    assert _anomalies(record) == []
    for key, block in blocks(oracle["score"], model).items():
        torch.testing.assert_close(score[key], block, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(hessian, oracle["hessian"].diagonal(), rtol=1e-8, atol=1e-12)


def test_anomaly_mode_is_the_callers_again_and_still_finds_a_nan() -> None:
    """torchfim leaves the mode as it found it: the caller's NaN is still reported, with its forward named."""
    case = BY_NAME["tanh_mlp"]
    model, x = case.build(3), case.inputs(5)
    with torch.autograd.set_detect_anomaly(True):
        torchfim.fisher(model, x, backend="modules")
        assert torch.is_anomaly_enabled()
        w = torch.zeros(3, dtype=torch.float64, requires_grad=True)
        with pytest.raises(RuntimeError, match="returned nan"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (w.sqrt() * 0).sum().backward()
