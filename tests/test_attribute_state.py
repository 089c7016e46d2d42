"""A generic rule runs a module again on the attribute state its call found, and names a module that fails.

A recurrence that reads its initial state from an attribute its parent sets, and leaves its final state
there (as Hugging Face's RecurrentGemma does), is run again by its generic rule after the whole forward:
on the state the call found, not the one it left (:mod:`torchfim.engine.modules.attribute_state`). The
oracle is the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of :mod:`oracles`; RecurrentGemma itself is in
tests/test_clients_transformers_zoo.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import assert_quietly_equals_dense
from torch import nn

import torchfim
from torchfim.engine.modules import GenericRule
from torchfim.errors import TorchfimError
from torchfim.train import FisherTraceMonitor


class _Recurrence(nn.Module):
    """``h_t = a ⊙ h_{t−1} + x_t`` from the initial state ``self.state`` that its parent sets, which it
    leaves at the final state."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.linspace(0.2, 0.9, 3))
        self.state: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, states = self.state, []
        for t in range(x.shape[1]):
            h = self.a * h + x[:, t]
            states.append(h)
        self.state = h
        return torch.stack(states, 1)


class _Sequence(nn.Module):
    """A Linear layer, the recurrence started at ``tanh`` of each sequence's first input, a mean-pooled head."""

    def __init__(self) -> None:
        super().__init__()
        self.inp, self.rec, self.head = nn.Linear(3, 3), _Recurrence(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rec.state = torch.tanh(x[:, 0])
        return self.head(self.rec(self.inp(x)).mean(1))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_recurrence_on_a_state_its_parent_sets_keeps_its_rule_and_equals_the_dense_oracle(structure: str) -> None:
    torch.manual_seed(0)
    model, x = _Sequence().double(), torch.randn(5, 4, 3, dtype=torch.float64)
    backend, rules = assert_quietly_equals_dense(model, x, structure)
    assert not backend.moved and isinstance(rules["rec"], GenericRule)


class _NeedsItsBatch(nn.Module):
    """Reshapes its input by the batch size its parent stored in an attribute: it fails on one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(4))
        self.batch = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.scale * x).reshape(self.batch, 2, 2).sum(1)


class _Parent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _NeedsItsBatch(), nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.block.batch = x.shape[0]
        return self.head(self.block(x))


def test_a_module_that_fails_when_run_again_alone_is_named_with_the_ways_out() -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings(), pytest.raises(TorchfimError, match=r"module 'block' \(_NeedsItsBatch\).*raised "
                                                                       r"RuntimeError.*backend='functional'"):
        warnings.simplefilter("ignore")  # the warning that it goes one sample at a time
        torchfim.fisher(_Parent().double(), torch.randn(5, 4, dtype=torch.float64), structure="diag")


def test_the_monitors_refusal_of_such_a_module_names_no_backend_it_cannot_take() -> None:
    """The monitor takes no ``backend=``: its refusal names freezing the parameters alone (before: it said "Try
    backend='functional'", which FisherTraceMonitor refuses as an unknown keyword)."""
    torch.manual_seed(0)
    monitor = FisherTraceMonitor(_Parent().double(), torch.randn(5, 4, dtype=torch.float64))
    with warnings.catch_warnings(), pytest.raises(TorchfimError, match=r"module 'block' \(_NeedsItsBatch\).*raised "
                                                                       r"RuntimeError.*Freeze the module's parameters") as err:
        warnings.simplefilter("ignore")
        monitor.measure(0)
    assert "backend" not in str(err.value)


def test_the_reports_refusal_of_such_a_module_names_no_backend_it_cannot_take() -> None:
    """``torchfim report`` takes no ``backend=`` either: its refusal names freezing the parameters alone (before: it
    said "Try backend='functional'", which neither the command nor ``compute_report`` takes); ``fisher`` called
    after it still names the backend (the report's setting ends with it)."""
    from torchfim import report as report_mod

    torch.manual_seed(0)
    data = report_mod.Data(torch.randn(5, 4, dtype=torch.float64), None, "test")
    with warnings.catch_warnings(), pytest.raises(TorchfimError, match=r"module 'block' \(_NeedsItsBatch\).*raised "
                                                                       r"RuntimeError.*Freeze the module's parameters") as err:
        warnings.simplefilter("ignore")
        report_mod.compute_report(_Parent().double(), data, progress=False)
    assert "backend" not in str(err.value)
    test_a_module_that_fails_when_run_again_alone_is_named_with_the_ways_out()
