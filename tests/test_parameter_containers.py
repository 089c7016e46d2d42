"""Parameters held in an ``nn.ParameterList`` or ``nn.ParameterDict`` go to the module that reads them.

Such a container is never called: the module above reads its parameters in its own forward. Its rule (the
generic one) covers them from the start, so the coverage check has nothing to move and warns of nothing
(it warned before that their "module is never called"). Oracle: the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of
:mod:`oracles`.
"""

from __future__ import annotations

import pytest
import torch
from engine_checks import assert_quietly_equals_dense
from torch import nn


class _Scaled(nn.Module):
    """Two Linear layers with learned scales and a bias held in a ParameterList or a ParameterDict."""

    def __init__(self, holder: str) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(4, 6), nn.Linear(6, 3)
        scale, shift = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(3))
        self.holder = holder
        self.extra = nn.ParameterDict({"scale": scale, "shift": shift}) if holder == "dict" else nn.ParameterList(
            [scale, shift])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = (self.extra["scale"], self.extra["shift"]) if self.holder == "dict" else self.extra
        return self.outer(torch.tanh(self.inner(x) * scale)) + shift


class _LayerScales(nn.Module):
    """Layers in a ModuleList, each followed by a scale from a ParameterList inside a ModuleList: the
    nearest module above them that is not a container is the model."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 3)])
        self.scales = nn.ModuleList([nn.ParameterList([nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))])])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer, scale in zip(self.layers, self.scales[0]):
            x = torch.tanh(layer(x)) * scale
        return x


class _CalledDict(nn.ModuleDict):
    """A ModuleDict with a forward of its own, holding a ParameterList that forward reads: it is called, so it
    is the one that reads them."""

    def __init__(self) -> None:
        super().__init__({"layer": nn.Linear(4, 3), "scales": nn.ParameterList([nn.Parameter(torch.randn(3))])})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self["layer"](x)) * self["scales"][0]


class _WithCalledDict(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _CalledDict(), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


class _Nested(nn.Module):
    """The container sits in a sub-module that is called: that sub-module reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _Scaled("list"), nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(x))


#: Each model, and the rule (by its module's path) that covers the held parameters, by their names below it.
_CASES = {
    "list": (lambda: _Scaled("list"), {"": {"extra.0", "extra.1"}}),
    "dict": (lambda: _Scaled("dict"), {"": {"extra.scale", "extra.shift"}}),
    "list-in-module-list": (_LayerScales, {"": {"scales.0.0", "scales.0.1"}}),
    "in-called-block": (_Nested, {"block": {"extra.0", "extra.1"}}),
    "in-called-module-dict": (_WithCalledDict, {"block": {"scales.0"}}),
}


@pytest.mark.parametrize("case", list(_CASES))
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_held_parameters_are_covered_by_the_reading_module(case: str, structure: str) -> None:
    make, readers = _CASES[case]
    torch.manual_seed(0)
    model = make().double()
    _, rules = assert_quietly_equals_dense(model, torch.randn(5, 4, dtype=torch.float64), structure)
    assert {path: set(rule.params) for path, rule in rules.items() if any("." in n for n in rule.params)} == readers
