"""The report's note on targets that are not the family's labels names the data's shapes and the fix. It named the
first 8 inputs' shapes, on which the check runs ("must have shape (8, 3) for outputs of shape (8, 3), got (8,)" of
40 inputs), and told a user who gave class indices to a Gaussian family to "pass one target per input" (a trial)."""

from __future__ import annotations

import pytest
import torch
from report_fixtures import fast_figures  # noqa: F401
from torch import nn

import torchfim
import torchfim.report
from torchfim.families import get_family
from torchfim.report.check import check_model_and_data
from torchfim.report.data import Data
from torchfim.report.wording import on_command_line


def _note(model: nn.Module, x: torch.Tensor, y: torch.Tensor, family: str) -> str | None:
    data, note, _, _ = check_model_and_data(model, Data(x, y, "test"), get_family(family), family)
    assert (data.targets is None) == (note is not None)  # skipped exactly where a note says so
    return note


def _mlp(outputs: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs))


def test_class_indices_given_to_a_gaussian_family_are_named_in_the_data_shapes() -> None:
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    note = _note(_mlp(), x, y, "gaussian")
    assert "of shape (40,)" in note and "have shape (40, 3)" in note and "(8" not in note
    assert "class indices: pass family='categorical'" in note and "pass one target per input" not in note
    with on_command_line():
        assert "class indices: pass --family categorical" in _note(_mlp(), x, y, "gaussian")
    assert _note(_mlp(), x, torch.randn(40, 3), "gaussian") is None  # real targets of the right shape: the labels


def test_other_shapes_say_the_data_shapes_and_keep_the_family_reasons() -> None:
    x = torch.randn(30, 4)
    wrong = _note(_mlp(), x, torch.randn(30, 2), "gaussian")  # real targets, too few per input
    assert "of shape (30, 2)" in wrong and "pass targets of shape (30, 3), one per input" in wrong
    assert "class indices" not in wrong
    one_hot = _note(_mlp(), x, torch.eye(3)[torch.randint(0, 3, (30,))], "categorical")
    assert "y.argmax" in one_hot and "(8" not in one_hot
    out_of_range = _note(_mlp(), x, torch.full((30,), 7), "categorical")  # not a shape problem: the family's reason
    assert "must lie in [0, 2]" in out_of_range and "of shape" not in out_of_range


def test_positions_are_counted_in_the_shapes() -> None:
    """Outputs (B, 5, 3) read one vector per position: class indices (B, 5) for a Gaussian family at each."""

    class PerPosition(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x)

    torch.manual_seed(0)
    x, y = torch.randn(12, 5, 4), torch.randint(0, 3, (12, 5))
    note = _note(PerPosition(), x, y, "gaussian")
    assert "of shape (12, 5)" in note and "have shape (12, 5, 3)" in note and "one per position" in note
    assert _note(PerPosition(), x, y, "categorical") is None


@pytest.mark.usefixtures("fast_figures")
def test_the_report_says_the_note_in_the_data_shapes(tmp_path) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    res = torchfim.report.run_report(_mlp(), (x, y), family="gaussian", out=tmp_path / "r", progress=False,
                                     emit=None, max_block=0)
    assert res["results"]["empirical"] is None
    text = (res["out"] / "report.md").read_text()
    assert "the data's targets, of shape (40,), are not labels of the gaussian family" in text
    assert "(8, 3)" not in text
