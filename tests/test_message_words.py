"""Numbers and names in messages read as English: "1 input", "an int" (a user trial of the command line saw
"1 inputs" and "the factory returned a int"), through :mod:`torchfim._words`."""

from __future__ import annotations

import textwrap
from contextlib import nullcontext
from pathlib import Path

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
from torchfim.report.wording import on_command_line

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
    with on_command_line(), pytest.raises(TorchfimError, match=r"the factory returned a list of numbers \(1 item\)"):
        report_mod.as_data([1.0], "test", "--data")  # before: "1 items"
    with on_command_line(), pytest.raises(TorchfimError, match=r"the factory returned an int; return a tensor"):
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


def test_a_variance_subset_of_one_input_is_said_in_the_singular() -> None:
    """report.md on a variance subset of one input of five (before: "a random subset of 1 (seed 0) inputs"), and the
    same sentences on the whole set."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    text = report_mod.run_report(model, x, out=None, emit=None, progress=False, max_block=0,
                                 variance_inputs=1)["markdown"]
    assert "**Î1 vs Î2 for the trace**, on a random subset of 1 input (seed 0) with one label each:" in text
    assert "is extrapolated from a random subset of 1 input (seed 0) as √((m/n)" in text
    assert "trace estimator, on a random subset of 1 input (seed 0), treated as the data set" in text
    assert "- The variance subset: 1 of the 5 inputs, drawn at random (seed 0);" in text
    assert "1 inputs" not in text and "subset of 1 (seed" not in text
    whole = report_mod.run_report(model, x, out=None, emit=None, progress=False, max_block=0)["markdown"]
    assert "**Î1 vs Î2 for the trace**, on all inputs with one label each:" in whole
    assert "trace estimator, on all inputs, treated as the data set." in whole
    assert "- The variance subset: all 5 inputs;" in whole


def test_the_explosion_hint_counts_one_kept_run(tmp_path) -> None:
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "a.json").write_text("{}")
    hint = interrupted_hint(str(tmp_path))
    assert hint.startswith("the 1 finished run is kept in ") and hint.endswith("go on from it")  # "1 ... run(s) are"


def test_the_library_names_one_thing_in_the_singular() -> None:
    """"(s)" forms where the count is at hand ("1 parameter(s) do not add up", "1 position dim(s)")."""
    from torchfim._words import agreeing
    from torchfim.engine.coverage import moved_message
    from torchfim.engine.labels import unread_targets_note

    assert agreeing(1, "module") == "module" and agreeing(2, "takes", "take") == "take"
    text = moved_message({"lin.weight": ""}, {"lin.weight": "outside"})
    assert "per-sample gradients of 1 parameter do not add up" in text and "(s)" not in text
    note = unread_targets_note(torch.randint(0, 4, (10, 5)), (10, 3, 4), -1, False)
    assert "read as 1 position dim (3,) of 4 classes" in note and "(s)" not in note


def _api_and_command_line(call) -> tuple[str, str]:
    """The refusal of ``call()`` from the API and within the command line's words."""
    said = []
    for words in (nullcontext, on_command_line):
        with words(), pytest.raises(TorchfimError) as err:
            call()
        said.append(str(err.value))
    return said[0], said[1]


def test_the_reports_messages_name_the_apis_keywords_from_the_api(tmp_path) -> None:
    """From the API the report named only the command line's flags ("--checkpoint x.pt: no such file", "pass --data
    MODULE:FACTORY", "--family", "--variance-inputs N"): each names the keyword there, the flag on the command line."""
    torch.manual_seed(0)
    model, x, none = nn.Sequential(nn.Linear(3, 2)), torch.randn(6, 3), tmp_path / "none.pt"
    quiet = {"out": None, "emit": None, "progress": False}
    api, flag = _api_and_command_line(lambda: report_mod.run_report(model, x, checkpoint=none, **quiet))
    assert api.startswith(f"checkpoint='{none}': no such file") and flag.startswith(f"--checkpoint {none}: no such")
    api, flag = _api_and_command_line(lambda: report_mod.run_report(model, **quiet))
    assert api.endswith("pass data, a tensor of inputs (or an (inputs, targets) pair)")
    assert flag.endswith("pass --data MODULE:FACTORY")
    api, flag = _api_and_command_line(
        lambda: report_mod.compute_report(model, report_mod.Data(x, None, "t"), "bernoulli", progress=False))
    assert "do not fit family='bernoulli'" in api and "use family='categorical' for 2" in api
    assert "(or pass the family that matches" in api and "--" not in api
    assert "do not fit --family bernoulli" in flag and "use --family categorical for 2" in flag
    api, flag = _api_and_command_line(
        lambda: report_mod.compute_report(model, report_mod.Data(x.long(), None, "t"), progress=False))
    assert api.startswith("the data holds 6 inputs of shape (3,), and ") and "--data" not in api
    assert flag.startswith("--data gave 6 inputs") and flag.endswith(" (in the --data factory)")
    api, flag = _api_and_command_line(lambda: report_mod.as_data("text", "t"))
    assert api.startswith("data: got a str; pass a tensor") and "factory" not in api  # before: "the factory returned"
    assert flag.startswith("--data: the factory returned a str; return a tensor")
    torch.save(nn.Linear(3, 3).state_dict(), tmp_path / "other.pt")
    api, flag = _api_and_command_line(lambda: report_mod.run_report(checkpoint=tmp_path / "other.pt", **quiet))
    assert "without model it must hold" in api and "set hidden to its widths" in api and "--" not in api
    assert "without --model it must hold" in flag and "pass --model MODULE:FACTORY for the architecture" in flag


def test_the_reports_notes_name_the_apis_keywords_from_the_api() -> None:
    from torchfim.report.format import family_text
    from torchfim.report.run import _summarise
    from torchfim.report.settings import variance_plan

    ends = {nullcontext: "freeze parameters with requires_grad_(False)", on_command_line: "(False) in --model"}
    for words, said in ((nullcontext, "pass variance_inputs=N to"), (on_command_line, "pass --variance-inputs N to")):
        with words():
            reduced, skipped = (variance_plan(None, 1000, P)[2] for P in (100_000, 2_000_000))
        assert said in reduced and said in skipped and skipped.endswith(ends[words])
    assert family_text({"family": "gaussian", "sigma": 2.0}).endswith("; family=Gaussian(sigma=σ) sets it)")
    lines: list[str] = []
    results = {"resumed_steps": 1, "files": ["report.md"], "timings": {"total": 1.0}}
    _summarise(lines.append, "", results, Path("rep"))
    assert "read 1 finished step back from an interrupted run of this report (resume=False computes them" in lines[1]


class _TwoOutputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.linear(x), x


def test_a_model_returning_a_tuple_is_told_how_to_wrap_it_in_the_callers_words() -> None:
    """The report said only "make forward return one tensor": the command line has no output= to pick one, and a
    user's model class need not change (a user trial)."""
    x = torch.randn(6, 3)
    api, flag = _api_and_command_line(
        lambda: report_mod.compute_report(_TwoOutputs(), report_mod.Data(x, None, "t"), progress=False))
    assert "pass a wrapper module whose forward returns that tensor (e.g. model(x)[0])" in api and "--" not in api
    assert "have the --model factory return a wrapper module" in flag


def test_a_report_on_one_parameter_tensor_counts_it_and_names_the_blocks_structure() -> None:
    """report.md said "2 trainable parameters in 1 parameter tensors" and its section 4 named the spectra's blocks by
    the structure's old name, ``structure="layers"``."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2, bias=False)
    data = report_mod.Data(torch.randn(12, 3), None, "twelve")
    text = report_mod.run_report(model, data, out=None, emit=None, progress=False)["markdown"]
    assert "6 trainable parameters in 1 parameter tensor (" in text
    section = text.split("## 4.")[1].split("\n## ")[0]
    assert 'the same block as `structure="blocks"` gives' in section and '"layers"`' not in text


def test_the_trace_figure_counts_the_labels_per_input() -> None:
    """The legend of the per-layer trace figure said "score estimate Î1 (4 label/input)"."""
    from matplotlib.figure import Figure

    from torchfim.report import figures

    layer = {"name": "w", "trace_exact": 1.0, "trace_score_estimate": 1.1, "trace_score_stderr": 0.1}
    for k, said in ((1, "(1 label/input)"), (4, "(4 labels/input)")):
        ax = Figure().add_subplot(1, 1, 1)
        figures._ax_trace(ax, {"layers": [layer], "n_samples": k, "data": {"n_inputs": 5}, "trace": {"exact": 1.0}})
        assert any(said in t for t in ax.get_legend_handles_labels()[1])


def test_the_penalty_names_one_input_and_one_step() -> None:
    """FisherPenalty(every=2) computing on a last mini-batch of one input: before "a mini-batch of 1 inputs ... for
    the next 1 steps"."""
    from torchfim.train import FisherPenalty

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)), torch.randn(8, 3)
    pen = FisherPenalty(model, alpha=0.1, every=2, generator=torch.Generator().manual_seed(0))
    pen(x, step=0).backward()
    with pytest.warns(RuntimeWarning, match=r"on a mini-batch of 1 input \(against 8 before\) and reuses it for the "
                                            r"next 1 step;"):
        pen(x[:1], step=2).backward()
