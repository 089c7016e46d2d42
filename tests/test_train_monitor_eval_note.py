"""The monitor measures in eval mode on its own copy of the model, and now says so once, naming the modules whose
forward that changes; ``torchfim.fisher`` refuses the same modules in training mode (it switched silently before)."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from torch import nn

import torchfim
from torchfim.train import FisherTraceMonitor
from torchfim.train.eval_note import switched_modules


def _bn_dropout() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3),
                         nn.Dropout(0.1)).double()


def _said(mon: FisherTraceMonitor, steps: range) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step in steps:
            mon.measure(step)
    return [str(w.message) for w in caught if "eval mode" in str(w.message)]


def test_the_switch_to_eval_mode_is_named_once_and_the_model_keeps_its_mode() -> None:
    model, x = _bn_dropout().train(), mlp_inputs(32)
    model(mlp_inputs(32, seed=3))  # running statistics away from their initial values
    mon = FisherTraceMonitor(model, x, generator=torch.Generator().manual_seed(0))
    said = _said(mon, range(3))
    assert len(said) == 1  # once per monitor, not once per measurement
    assert "1 BatchNorm module ('1') and 2 Dropout modules ('3', '5') were in training mode" in said[0]
    assert "running statistics" in said[0] and "stay in training mode" in said[0]
    assert all(m.training for m in model.modules())
    # what it measured: the model in eval mode, which torchfim.fisher takes (and refuses in training mode)
    with pytest.raises(torchfim.TorchfimError, match=r"model\.eval\(\)"):
        torchfim.fisher(model, x, structure="trace")
    model.eval()
    ref = FisherTraceMonitor(model, x, generator=torch.Generator().manual_seed(0))
    assert _said(ref, range(3)) == []  # nothing switched, nothing said
    assert [r.trace for r in ref.history] == [r.trace for r in mon.history]


def test_nothing_is_said_where_eval_mode_changes_nothing() -> None:
    """A model in training mode without such modules, Dropout(p=0), and modules already in eval mode."""
    plain = tanh_mlp(3).train()
    assert _said(FisherTraceMonitor(plain, mlp_inputs(16)), range(2)) == []
    model = _bn_dropout().train()
    model[3].p = 0.0
    model[1].eval()
    model[5].eval()
    assert switched_modules(model) == {}
    assert _said(FisherTraceMonitor(model, mlp_inputs(16)), range(2)) == []
    model[1].train()  # one module, in the singular
    said = _said(FisherTraceMonitor(model, mlp_inputs(16)), range(2))
    assert len(said) == 1 and "1 BatchNorm module ('1') was in training mode" in said[0]
    assert "Dropout" not in said[0] and "runs it as model.eval() does" in said[0]


def test_other_kinds_and_a_model_put_in_training_mode_later() -> None:
    """RReLU and a layer's own dropout are named by kind; a model first measured in eval mode is named when the
    monitor first finds it in training mode."""
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 3)).double().eval()
    mon = FisherTraceMonitor(model, mlp_inputs(16))
    assert _said(mon, range(2)) == []
    model.train()
    said = _said(mon, range(2, 5))
    assert len(said) == 1 and "1 RReLU module ('1') was in training mode" in said[0] and "mean slope" in said[0]
    lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.2)
    assert switched_modules(nn.ModuleDict({"rnn": lstm})) == {"LSTM": ["rnn"]}
