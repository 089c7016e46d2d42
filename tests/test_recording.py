"""The per-module backend's recorded forward: each ruled module records its own call, and nothing stays behind.

The recording replaces each ruled module's forward on the engine's private copy (it does not hook
the module): a call is the module forward's own, with its arguments and its output before any forward
hook of the user's. These tests pin the cases where that differs from a forward hook registered after
the user's.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import Gate
from torch import nn

import torchfim
from torchfim.engine import ModelView, batches
from torchfim.engine.modules.linear import LinearRule
from torchfim.engine.per_module import PerModuleBackend
from torchfim.engine.recording import may_attend


def _recorded(model: nn.Module, x: torch.Tensor) -> tuple[PerModuleBackend, ModelView]:
    view = ModelView(model)
    backend = PerModuleBackend(view)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the coverage check moves nothing (it would warn)
        backend.record(next(batches(x, None, view.device, view.dtype)))
    return backend, view


def _assert_exact(model: nn.Module, x: torch.Tensor) -> None:
    """Diagonal and blocks of the exact Fisher equal the whole-model functional backend's to 1e-10."""
    for structure in ("diag", "blocks"):
        got = torchfim.fisher(model, x, structure=structure)
        want = torchfim.fisher(model, x, structure=structure, backend="functional")
        pairs = [(got, want)] if structure == "diag" else [(got[k], want[k]) for k in want]
        assert all(torch.allclose(g, w, rtol=1e-10, atol=1e-12) for g, w in pairs)


class _Twice(nn.Module):
    """A user's forward hook that scales a layer's output: downstream layers see ``2·(a Wᵀ + b)``."""

    @staticmethod
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return 2.0 * output


def test_a_users_forward_hook_that_replaces_an_output_keeps_the_layer_on_its_rule() -> None:
    """The call's tap is the layer's own output, so the Linear rule's per-sample gradients are right
    and the coverage check moves nothing. (A hook registered after the user's saw ``2·z`` as the
    layer's output: its per-sample gradients came out halved and the layer went to the generic rule.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[0].register_forward_hook(_Twice.hook)
    x = torch.randn(6, 3, dtype=torch.float64)
    backend, view = _recorded(model, x)
    assert backend.moved == {} and all(isinstance(r, LinearRule) for r in backend.rules.values())
    _assert_exact(model, x)


class _DirectForward(nn.Module):
    """A parent that calls its child's ``forward`` directly (no ``__call__``: no hook would fire)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner.forward(x)))


def test_a_module_called_through_its_forward_method_is_recorded_by_its_rule() -> None:
    torch.manual_seed(0)
    model = _DirectForward().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    backend, view = _recorded(model, x)
    assert backend.moved == {}
    assert sorted(type(r).__name__ for r in backend.rules.values()) == [LinearRule.__name__] * 2
    _assert_exact(model, x)


def test_recording_restores_every_forward_and_keeps_one_set_on_the_instance() -> None:
    """After recording (and after a failing forward) no module of the private copy keeps the engine's
    forward; a forward the user set on an instance is the one recorded, and is back afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Gate(4), nn.Linear(4, 3)).double()
    own = model[3].forward
    model[3].forward = lambda h: 1.5 * own(h)  # an instance-level forward
    x = torch.randn(6, 3, dtype=torch.float64)
    view = ModelView(model)
    copies = list(view.model)
    kept = copies[3].__dict__["forward"]  # the user's lambda, rebuilt around the copy's bound forward
    assert kept.__code__ is model[3].forward.__code__ and kept.__closure__[0].cell_contents.__self__ is copies[3]
    backend = PerModuleBackend(view)
    rec = backend.record(next(batches(x, None, view.device, view.dtype)))
    assert torch.allclose(rec.values, model(x), rtol=0, atol=0) and len(rec.calls) == 3
    assert all("forward" not in m.__dict__ for m in copies[:3]) and copies[3].__dict__["forward"] is kept
    with pytest.raises(RuntimeError):
        backend.record(next(batches(torch.randn(6, 5, dtype=torch.float64), None, view.device, view.dtype)))
    assert all("forward" not in m.__dict__ for m in copies[:3]) and copies[3].__dict__["forward"] is kept


class _Custom(nn.Linear):
    """A subclass defined outside torch.nn: its forward could call attention."""


@pytest.mark.parametrize(("model", "attends"), [
    (nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 3)), False),
    (nn.Sequential(nn.Embedding(5, 4), nn.TransformerEncoderLayer(4, 2, 8)), True),
    (nn.Sequential(nn.Linear(3, 3), _Custom(3, 3)), True),
    (Gate(3), True),
])
def test_the_math_attention_kernel_is_set_only_where_a_module_may_call_attention(model: nn.Module,
                                                                                 attends: bool) -> None:
    assert may_attend(model) is attends


class _ByKeyword(nn.Module):
    """Every ruled layer called with its input by keyword (as torch names it: ``input``, or ``x`` for RMSNorm)."""

    def __init__(self) -> None:
        super().__init__()
        # torch < 2.4 has no RMSNorm: a LayerNorm there, called by its name for the input
        self.lin, self.norm, self.rms = nn.Linear(3, 4), nn.BatchNorm1d(4), getattr(nn, "RMSNorm", nn.LayerNorm)(4)
        self.conv, self.embed, self.head = nn.Conv1d(1, 2, 2), nn.Embedding(5, 2), nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        named = "input" if isinstance(self.rms, nn.LayerNorm) else "x"  # each norm's name for its input
        h = self.rms(**{named: self.norm(input=torch.tanh(self.lin(input=x)))})
        c = self.conv(input=x[:, None, :]).flatten(1)
        e = self.embed(input=(x[:, 0] > 0).long())
        return self.head(input=torch.cat([h, c, e], -1))


def test_layers_called_with_their_input_by_keyword_keep_their_rules() -> None:
    """Before, the rules read ``call.args[0]`` of an empty tuple (a bare IndexError), and BatchNorm's
    recording forward refused ``input=``."""
    torch.manual_seed(0)
    model, x = _ByKeyword().double().eval(), torch.randn(6, 3, dtype=torch.float64)
    backend, view = _recorded(model, x)
    assert all(type(rule).__name__ != "GenericRule" for rule in backend.rules.values())
    _assert_exact(model, x)
