"""The coverage check's warning names the likely cause of each parameter it moves; the result stays exact."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import torchfim
from torchfim.engine.coverage import CAUSES, _dependent


class _Block(nn.Module):
    """Returns its hidden state and an output computed from it; the model above uses both."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4) * 0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(x @ self.w)
        return h, torch.tanh(h @ self.w.T)


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _Block(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(self.block(x), -1))


class _TiedOutside(nn.Module):
    """An embedding whose weight the forward also uses directly (no module sees that use)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(self.mix(self.embed(tokens))), self.embed.weight)


@pytest.mark.parametrize(
    ("build", "inputs", "moved", "cause"),
    [(_TwoOutputs, lambda: torch.randn(6, 4, dtype=torch.float64), "block.w", "dependent"),
     (_TiedOutside, lambda: torch.randint(0, 7, (5, 3)), "embed.weight", "outside")],
    ids=["outputs-one-from-another", "used-outside-its-module"],
)
def test_the_moved_parameter_is_named_with_its_likely_cause_and_stays_exact(build, inputs, moved: str,
                                                                           cause: str) -> None:
    torch.manual_seed(0)
    model, x = build().double(), inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure="diag")
    texts = [str(w.message) for w in caught if "do not add up" in str(w.message)]
    assert len(texts) == 1
    assert f"{moved} → the whole model" in texts[0] and f"{moved}: {CAUSES[cause]}" in texts[0]
    assert all(CAUSES[other] not in texts[0] for other in CAUSES if other != cause)
    want = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_outputs_are_dependent_only_when_one_is_computed_from_another() -> None:
    x = torch.randn(3, 4, requires_grad=True)
    h = torch.tanh(x)
    siblings = [h * 2, h + 1]  # both from h, neither from the other
    assert not _dependent(siblings) and not _dependent([h]) and not _dependent([x, x.detach()])
    assert _dependent([h, torch.sin(h) * 3]) and _dependent([torch.sin(h) * 3, h])


class _OutsideInBlock(nn.Module):
    """A Linear whose weight the block also uses directly; the block has a parameter of its own and, with
    ``dependent``, returns its hidden state and an output computed from it."""

    def __init__(self, dependent: bool) -> None:
        super().__init__()
        self.lin, self.scale, self.dependent = nn.Linear(4, 4), nn.Parameter(torch.tensor(1.5)), dependent

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(x) + 0.3 * x @ self.lin.weight.T)
        return h, torch.tanh((h if self.dependent else x) * self.scale)


class _BlockAbove(nn.Module):
    def __init__(self, dependent: bool) -> None:
        super().__init__()
        self.block, self.head = _OutsideInBlock(dependent), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat(self.block(x), -1))


@pytest.mark.parametrize(("dependent", "holder"), [(False, "block"), (True, "the whole model")],
                         ids=["block-suffices", "block-misses-too"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_moved_parameter_goes_on_up_while_the_module_above_misses_it_too(dependent: bool, holder: str,
                                                                          structure: str) -> None:
    # The block's generic rule is handed both outputs' whole sensitivities; where one output is computed
    # from the other, it would count the weight's paths through the later one twice.
    torch.manual_seed(0)
    model, x = _BlockAbove(dependent).double(), torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure=structure)
    texts = [str(w.message) for w in caught if "do not add up" in str(w.message)]
    assert len(texts) == 1 and f"block.lin.weight → {holder}" in texts[0]
    assert "block.scale" not in texts[0]  # the block's own parameter stays with the block
    want = torchfim.fisher(model, x, structure=structure, backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
