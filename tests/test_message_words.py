"""Numbers and names in messages read as English: "1 input", "an int" (a user trial of the command line saw
"1 inputs" and "the factory returned a int"), through :mod:`torchfim._words`."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from torchfim import cli
from torchfim import report as report_mod
from torchfim._words import a_or_an, counted
from torchfim.damped_solve import check_damping
from torchfim.errors import TorchfimError
from torchfim.experiments.explosion.command import interrupted_hint

FACTORIES = '''
def number():
    return 3
'''


def test_counts_and_articles() -> None:
    assert [counted(n, "input") for n in (0, 1, 2)] == ["0 inputs", "1 input", "2 inputs"]
    assert counted(1, "entry", "entries") == "1 entry" and counted(3, "entry", "entries") == "3 entries"
    assert counted(1_076_010, "parameter", spec=",") == "1,076,010 parameters"
    words = ["int", "float", "ndarray", "OrderedDict", "uint8", "Tensor", "array", "8%", "10%", "11", "110", "18,000"]
    assert [a_or_an(w) for w in words] == ["an int", "a float", "a ndarray", "an OrderedDict", "a uint8", "a Tensor",
                                           "an array", "an 8%", "a 10%", "an 11", "a 110", "an 18,000"]


def test_the_command_line_names_a_factorys_type_with_its_article(tmp_path, monkeypatch, capsys) -> None:
    (tmp_path / "facts.py").write_text(textwrap.dedent(FACTORIES))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "--model", "facts.py:number", "--no-progress"]) == 2
    assert "the factory returned an int, not a torch.nn.Module" in capsys.readouterr().err  # before: "a int"
    with pytest.raises(TorchfimError, match=r"the factory returned a list of numbers \(1 item\)"):  # "1 items"
        report_mod.as_data([1.0], "test", "--data")
    with pytest.raises(TorchfimError, match=r"the factory returned an int; return a tensor"):
        report_mod.as_data(3, "test", "--data")
    with pytest.raises(TorchfimError, match=r"got an array of shape"):  # the damping's "got a array"
        check_damping(np.ones(3))


def test_a_report_on_one_input_says_one_input() -> None:
    """The terminal summary and report.md of a report on one input (before: "1 inputs", "1 label(s)")."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    got = report_mod.run_report(model, report_mod.Data(torch.randn(1, 3), None, "one"), out=None, emit=None,
                                progress=False)
    table, text = got["table"], got["markdown"]
    assert table.startswith("Fisher information report: 26 parameters, 1 input, family categorical")
    assert "with 1 label/input, over all n=1 input;" in table
    assert "- **Data:** one: 1 input of shape (3,)" in text and "(exact, mean over all 1 input)" in text
    assert "with 1 label per input gave" in text
    assert "1 inputs" not in table + text and "label(s)" not in table + text


def test_the_explosion_hint_counts_one_kept_run(tmp_path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")
    hint = interrupted_hint(str(tmp_path))
    assert hint.startswith("the 1 finished run is kept in ") and hint.endswith("go on from it")  # "1 ... run(s) are"
