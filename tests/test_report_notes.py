"""What the report says beside its numbers: the positions its labels score (every number over the same ones),
torchfim's warnings during the run, and the Gaussian family's σ; each against a float64 brute force."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import exact_fisher
from test_report_positions import N, T, _lm_and_data, _oracle
from torch import nn

from torchfim import cli
from torchfim import report as report_mod
from torchfim.families import Gaussian


def test_labels_of_minus_100_leave_their_positions_out_of_every_number():
    """Labels -100 at unpadded positions too, no mask: Tr(F), the observed positions per input and the
    empirical/true ratio are over the labelled positions alone, like with like (before: Tr(F) over every
    position, the empirical over the labelled ones, their ratio comparing different positions)."""
    model, batch = _lm_and_data()
    g = torch.Generator().manual_seed(5)
    dropped = (torch.rand(N, T, generator=g) < 0.3) & (torch.arange(T) > 0)  # the first stays: one label per input
    labels = batch["labels"].masked_fill(dropped, -100)
    batch = {"input_ids": batch["input_ids"], "labels": labels}
    R = report_mod.compute_report(model, report_mod.as_data(batch, "test"), variance_inputs=3, max_block=0,
                                  progress=False)
    trace, empirical = _oracle(model, {**batch, "attention_mask": (labels != -100).long()})
    everywhere, _ = _oracle(model, {**batch, "attention_mask": torch.ones(N, T, dtype=torch.long)})
    assert everywhere > 1.1 * trace  # the positions matter
    assert R["trace"]["exact"] == pytest.approx(trace, rel=1e-10)
    assert R["empirical"]["trace"] == pytest.approx(empirical, rel=1e-10)
    assert R["empirical"]["trace_ratio"] == pytest.approx(empirical / trace, rel=1e-10)
    assert R["outputs"]["observed_positions_per_input"] == pytest.approx(float((labels != -100).sum()) / N)
    # the score-only report's ratio is over the same positions: its estimate is within its error bars of them
    S = report_mod.compute_report(model, report_mod.as_data(batch, "test"), n_samples=300, score_only=True,
                                  progress=False)
    assert abs(S["trace"]["trace_score_estimate"] - trace) < 4 * S["trace"]["trace_score_stderr"]
    assert S["trace"]["trace_empirical"] == pytest.approx(empirical, rel=1e-10)


def _softmax_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3), nn.Softmax(-1)).double()


@pytest.mark.parametrize("score_only", [False, True])
def test_the_librarys_warnings_are_in_the_report_once_each(score_only):
    """A model ending in a softmax under the categorical family: the library's warning that every number is
    that of another model is in report.json, report.md and the terminal summary, once, and not warned
    (before: warned twice on the terminal, attributed to ``<frozen runpy>``, and in no file)."""
    x = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = report_mod.run_report(_softmax_model(), x, out=None, progress=False, emit=None, variance_inputs=4,
                                    max_block=0, score_only=score_only)
    assert not [w for w in caught if str(w.message).startswith("torchfim:")]
    R = got["results"]
    assert len(R["warnings"]) == 1 and R["warnings"][0].startswith("the model's outputs are probability vectors")
    assert got["markdown"].count("probability vectors") == 1 and got["table"].count("probability vectors") == 1
    assert "**Warning from torchfim:** the model's outputs are probability vectors" in got["markdown"]


@pytest.mark.parametrize("action", ["error", "ignore"])
def test_the_callers_warning_filters_hold_during_a_report(action):
    """``-W error`` makes the library's warning an error where it is warned (before: the report kept it and
    finished, raising nothing); a caller who ignores it finds it neither warned nor in the report."""
    x = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter(action)
        if action == "error":
            with pytest.raises(RuntimeWarning, match="probability vectors"):
                report_mod.run_report(_softmax_model(), x, out=None, progress=False, emit=None, variance_inputs=4,
                                      max_block=0)
            return
        got = report_mod.run_report(_softmax_model(), x, out=None, progress=False, emit=None, variance_inputs=4,
                                    max_block=0)
    assert not caught and got["results"]["warnings"] == []


def test_other_warnings_pass_through_and_none_is_kept_from_a_clean_model():
    class Warns(nn.Linear):
        def forward(self, x):
            warnings.warn("the user's own", UserWarning, stacklevel=2)
            return super().forward(x)

    x = torch.randn(10, 4, dtype=torch.float64)
    with pytest.warns(UserWarning, match="the user's own"):
        R = report_mod.compute_report(Warns(4, 3).double(), report_mod.Data(x, None, "t"), max_block=0, progress=False)
    assert R["warnings"] == []


def test_the_gaussian_familys_sigma_is_said_and_used():
    """``Gaussian(sigma=2)`` (``--sigma 2``): Tr(F) is the float64 ``tr(JᵀJ)/σ²`` and the report says σ and what it
    scales (before: σ = 1, silently)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(15, 3, dtype=torch.float64)
    got = report_mod.run_report(model, x, family=Gaussian(sigma=2.0), out=None, progress=False, emit=None,
                                max_block=0)
    want = float(torch.trace(exact_fisher(model, x, "gaussian"))) / 4
    assert got["results"]["trace"]["exact"] == pytest.approx(want, rel=1e-10)
    assert got["results"]["sigma"] == 2.0
    said = " (σ = 2: the Fisher scales as 1/σ², Var Î1 as 1/σ⁴, Var Î2 as 1/σ²"
    assert "`gaussian`" + said in got["markdown"] and "gaussian" + said in got["table"]
    default = report_mod.run_report(model, x, family="gaussian", out=None, progress=False, emit=None, max_block=0)
    assert "(σ = 1:" in default["table"]
    assert default["results"]["trace"]["exact"] == pytest.approx(4 * want, rel=1e-10)


def test_the_command_line_takes_sigma_for_the_gaussian_family_only(capsys):
    assert cli.main(["report", "--sigma", "2", "--out", "unused", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--sigma is the noise scale of the Gaussian family" in err and "pass --family gaussian" in err
    assert cli.main(["report", "--family", "gaussian", "--sigma", "0", "--out", "unused"]) == 2
    assert "expected a positive number" in capsys.readouterr().err



def test_the_terminal_table_names_the_inputs_of_each_column():
    """Each column says whether it is over all n inputs or the m-input subset, which one is extrapolated, and
    that 'lower Var Tr' is of the trace (before: s.e. Î1 over all inputs beside Var Î1 on the subset, both
    unlabelled, 'better' and the extrapolated k10% Î2 unexplained)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(30, 3, dtype=torch.float64)
    table = report_mod.run_report(model, x, out=None, progress=False, emit=None, max_block=0,
                                  variance_inputs=8)["table"]
    header = table.splitlines()[1].split("  ")
    for column in ("Tr(F) n=30", "s.e. Î1 n=30", "Var Î1 m=8", "Var Î2 m=8", "lower Var Tr", "k10% Î1 n=30",
                   "k10% Î2* n=30"):
        assert column in [c.strip() for c in header]
    assert "a random subset of m=8 of the n=30 inputs" in table and "*Î2's extrapolated from the subset" in table
    assert "the lower variance of the trace (not of the diagonal" in table
    assert ("k10% = labels per input for a 10% relative standard error (one σ: s.e. ≤ 10% of the value) of the trace"
            in table and "relative error" not in table)
    assert "(≈ n/m times that on all n: s.e.² ≈ Var·m/(n·k))" in table
    whole = report_mod.run_report(model, x, out=None, progress=False, emit=None, max_block=0)["table"]
    assert "Var Î1 m=30" in whole and "k10% Î2 n=30" in whole and "extrapolated" not in whole
    # on all the inputs, no subset to scale from (it said "on all the inputs (≈ n/m times that on all n …)")
    assert "on all the inputs (s.e.² = Var/k with k labels per input)" in whole and "n/m" not in whole


@pytest.mark.parametrize("command_line", [False, True])
def test_a_kept_warning_names_the_family_as_the_user_sets_it(command_line):
    """Integer targets under the Gaussian family: the library's warning, kept in the report, names the other
    families as ``--family categorical`` on the command line and ``family='categorical'`` in the API (before:
    the API's keyword on the command line, which has no such argument)."""
    from contextlib import nullcontext

    from torchfim.report.wording import on_command_line

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x, y = torch.randn(15, 3, dtype=torch.float64), torch.randint(0, 2, (15, 2))
    with on_command_line() if command_line else nullcontext():
        got = report_mod.run_report(model, (x, y), family="gaussian", out=None, progress=False, emit=None,
                                    variance_inputs=4, max_block=0)
    (kept,) = got["results"]["warnings"]
    assert "are torch.int64 integers" in kept
    named = ("--family categorical", "--family bernoulli") if command_line else ("family='categorical'",
                                                                                 "family='bernoulli'")
    assert all(n in kept for n in named) and ("family='" in kept) != command_line
