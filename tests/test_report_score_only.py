"""The score-only report (``torchfim/report/score_only.py``): where the full report would not fit in memory
(a language model over a real vocabulary) or when asked for, Tr(F) per layer by the score estimator with
error bars from its own labels, the empirical Fisher beside it.

Its numbers are checked against the library's score estimate drawn with the same generator (the same
labels), its error bars against :class:`torchfim.score_norms.ScoreNorms` (whose oracle tests are in
tests/test_score_norms.py), and its derived figures against their definitions.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import types
import warnings

import clients
import pytest
import torch
from torch import nn

import torchfim
from torchfim import _memory, cli
from torchfim import report as report_mod
from torchfim.errors import TorchfimError
from torchfim.report import settings as report_settings
from torchfim.report.cost import full_report_work
from torchfim.report.wording import on_command_line
from torchfim.score_norms import squared_score_norms


def _wide_model() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """10,000 classes: one input's closed forms need 2.98 GiB in float64 (1.49 in float32, tests/test_report_failures.py)."""
    torch.manual_seed(0)
    return nn.Linear(4, 10_000).double(), torch.randn(8, 4, dtype=torch.float64), torch.randint(0, 10_000, (8,))


def test_where_the_full_report_would_not_fit_it_falls_back_to_score_only(monkeypatch):
    """With 1 GiB free, the default mode computes the score-only report, saying why; the exact Fisher is
    never asked for, and the numbers are the library's score estimate with the same labels."""
    model, X, y = _wide_model()
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    exact_calls = []
    original = torchfim.fisher

    def no_exact(*args, **kwargs):
        exact_calls.append(kwargs.get("estimator", "exact"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torchfim, "fisher", no_exact)
    R = report_mod.compute_report(model, report_mod.Data(X, y, "test"), progress=False, seed=3)
    assert R["mode"] == "score_only" and "about 2.98 GiB per input with 1.0 GiB" in R["mode_reason"]
    from torchfim.report.score_only_render import markdown_score_only
    assert "or with more memory" in markdown_score_only(R)  # fallen back to: what would reach the full report
    assert exact_calls == ["empirical"]
    assert R["n_samples"] == 2  # at least two labels per input, whatever n_samples asks
    monkeypatch.setattr(torchfim, "fisher", original)
    diag = torchfim.fisher(model, X, estimator="score", structure="diag", n_samples=2,
                           generator=torch.Generator().manual_seed(4))
    per_layer = dict(zip(("weight", "bias"), diag.split([40_000, 10_000])))
    norms = squared_score_norms(model, X, n_samples=2, generator=torch.Generator().manual_seed(4))
    for layer in R["layers"]:
        want = float(per_layer[layer["name"]].sum())
        assert math.isclose(layer["trace_score_estimate"], want, rel_tol=1e-12)
        assert math.isclose(layer["trace_score_stderr"], norms.trace(layer["name"])[1], rel_tol=1e-12)
        assert math.isclose(layer["trace_score_stderr_inputs"],
                            norms.trace(layer["name"], inputs_as_sample=True)[1], rel_tol=1e-12)
    T = R["trace"]
    assert math.isclose(T["trace_score_estimate"], sum(lay["trace_score_estimate"] for lay in R["layers"]),
                        rel_tol=1e-12)
    assert math.isclose(sum(lay["share_of_trace"] for lay in R["layers"]), 1.0, rel_tol=1e-12)
    one_label = 2 * T["trace_score_stderr"] ** 2  # k · s.e.²: the one-label variance
    assert T["samples_needed_score"] == max(1, math.ceil(one_label / (0.1 * T["trace_score_estimate"]) ** 2))
    empirical = torchfim.fisher(model, X, targets=y, estimator="empirical", structure="trace")
    assert math.isclose(T["trace_empirical"], float(empirical), rel_tol=1e-12)
    assert math.isclose(T["empirical_ratio"], float(empirical) / T["trace_score_estimate"], rel_tol=1e-12)


def test_score_only_when_asked_for_and_its_files(tmp_path, capsys):
    """``--mode score-only`` on the embedded default writes report.md, report.json (no NaN), model.pt and
    its one figure; a full report into the same directory then replaces them, its figure removed."""
    out = tmp_path / "rep"
    base = ["report", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert cli.main([*base, "--mode", "score-only", "--n-samples", "3"]) == 0
    printed = capsys.readouterr().out
    assert "Fisher information report (score only)" in printed
    assert "k10% = labels per input for a 10% relative standard error (one σ) of Tr(F)." in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.pt", "report.json", "report.md", "trace_score_only.png"]
    R = json.loads((out / "report.json").read_text())
    assert R["mode"] == "score_only" and R["n_samples"] == 3 and R["mode_reason"] == "asked for (--mode score-only)"
    assert "--mode score-only" in R["command"]
    assert "Score only: asked for (--mode score-only)." in printed  # before: (score_only=True, --mode score-only)
    text = (out / "report.md").read_text()
    assert "# torchfim report (score only)" in text and "](trace_score_only.png)" in text
    assert f"**Tr(F) ≈ {float(R['trace']['trace_score_estimate']):.4g} ±" in text
    assert "Labels per input for a 10% relative standard error (one σ: s.e. ≤ 10% of Tr(F)): " in text
    assert "| k for 10% rel. s.e. |" in text and "relative error" not in text + printed
    # asked for, its notes advise no smaller data or more memory (a CLI trial), only the mode that gives the rest
    assert "more memory" not in text and "`--mode full` (or the default" in text and "score_only=" not in text
    assert cli.main([*base, "--max-block", "0", "--variance-inputs", "16"]) == 0
    assert "trace_score_only.png" not in {p.name for p in out.iterdir()}
    assert json.loads((out / "report.json").read_text())["trace"]["exact"] > 0


def test_one_input_has_the_label_noise_of_its_trace_and_no_spread_between_inputs():
    """One input is the whole population the report is conditional on: its standard error is that input's label
    noise, ``√(var_j(s_1j)/k)`` over the report's own draws (seed + 1, as the library draws them), while the standard
    error that takes the inputs as a sample of the data needs a spread between inputs and is left out ("–")."""
    torch.manual_seed(1)
    x = torch.randn(1, 4, dtype=torch.float64)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():  # p = (0.15, 0.425, 0.425): the report's two uniforms (0.061, 0.225) pick classes 0 and 1
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.15, 0.425, 0.425], dtype=torch.float64).log())
    R = report_mod.compute_report(model, report_mod.Data(x, None, "one"), progress=False, score_only=True)
    k = R["n_samples"]
    draws = squared_score_norms(model, x, n_samples=k, generator=torch.Generator().manual_seed(R["seed"] + 1))
    s = draws.per_tensor.sum(0)[0].double()  # (k,): the one input's squared score norms
    assert k >= 2 and float(s.var()) > 0  # draws that differ: the error bar is no rounding of 0
    assert R["trace"]["trace_score_stderr"] == pytest.approx(math.sqrt(float(s.var()) / k), rel=1e-12)
    assert R["trace"]["trace_score_stderr_inputs"] is None and R["trace"]["label_spread_unseen"] is False
    text = report_mod.run_report(model, x, out=None, progress=False, emit=None, score_only=True)["markdown"]
    assert "the standard error of E_x Tr(F(x)) is – (input spread and label noise)" in text
    assert "gave the same value" not in text


def test_draws_that_all_coincide_leave_the_standard_error_out_and_say_why():
    """Where every input's k draws give one value (here the one input's two uniforms, 0.061 and 0.225, both fall in
    class 0 of p = (0.9, 0.05, 0.05)), their spread was not seen: the report states no standard error, and no labels
    per input, rather than ± 0 (an exact Tr(F)) and "1 label enough", and says why and what to do."""
    x = torch.randn(1, 4, dtype=torch.float64)
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64).log())
    R = report_mod.compute_report(model, report_mod.Data(x, None, "one"), progress=False, score_only=True)
    k = R["n_samples"]
    draws = squared_score_norms(model, x, n_samples=k, generator=torch.Generator().manual_seed(R["seed"] + 1))
    assert float(draws.per_tensor.sum(0)[0].var()) == 0  # the case: the draws coincide
    for entry in (R["trace"], *R["layers"]):
        assert entry["trace_score_stderr"] is None and entry["samples_needed_score"] is None, entry
        assert entry["label_spread_unseen"] is True and entry["trace_score_estimate"] > 0
    text = report_mod.run_report(model, x, out=None, progress=False, emit=None, score_only=True)["markdown"]
    assert "± –**" in text and f"The input's {k} labels gave the same value, so the spread" in text
    assert "Draw more labels per input (n_samples=K)" in text


def test_a_real_vocabulary_language_model_gets_the_score_only_report():
    """GPT-2 from a config with its real vocabulary (50,257): the full report would need about 2.4e3 GiB per
    input, so the report is score-only, and its Tr(F) is the library's score estimate with the same labels
    over the positions the labels score, as the library reads the batch (unpadded, next-token: the last left
    out)."""
    transformers = clients.need("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50_257, n_positions=16)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 50_257, (4, 6))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    R = report_mod.compute_report(model, report_mod.as_data(batch, "test"), mask="attention_mask", progress=False)
    assert R["mode"] == "score_only" and "6 positions × 50,257" in R["mode_reason"]
    want = torchfim.fisher(model, batch, estimator="score", structure="trace",
                           n_samples=2, mask="attention_mask", generator=torch.Generator().manual_seed(1))
    assert math.isclose(R["trace"]["trace_score_estimate"], float(want), rel_tol=1e-5)
    assert R["trace"]["trace_score_stderr"] > 0 and R["trace"]["trace_empirical"] > 0


def test_full_mode_refuses_what_does_not_fit_with_the_fix(monkeypatch):
    model, X, _ = _wide_model()
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    with pytest.raises(TorchfimError, match=r"for the score-only report pass score_only=True \(or score_only=None, "
                                            r"which chooses it here\)"):
        report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, score_only=False)
    with pytest.raises(TorchfimError, match="score_only must be None"):
        report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, score_only="yes")


def test_a_full_report_over_its_time_budget_falls_back_unless_asked_for(monkeypatch):
    """With the budget set to 0 s the estimate exceeds it: ``auto`` gives the score-only report, naming the
    estimate and ``--mode full``; ``score_only=False`` computes the full report anyway."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = report_mod.Data(torch.randn(16, 4, dtype=torch.float64), None, "test")
    assert report_mod.compute_report(model, data, progress=False, max_block=0)["mode"] == "full"
    monkeypatch.setattr(report_settings, "FULL_REPORT_SECONDS", 0.0)
    R = report_mod.compute_report(model, data, progress=False, max_block=0)
    assert R["mode"] == "score_only"
    assert re.search(r"the full report would take about [\d,]+ min here, more than its budget of 0: over the 16 "
                     r"inputs it pulls back about 3 output vectors per input.*pass score_only=False to compute it",
                     R["mode_reason"])
    with on_command_line():  # the command line's words alone (before: "score_only=False (--mode full)" for both)
        R = report_mod.compute_report(model, data, progress=False, max_block=0)
    assert "pass --mode full to compute it anyway" in R["mode_reason"] and "score_only" not in R["mode_reason"]
    assert report_mod.compute_report(model, data, progress=False, max_block=0, score_only=False)["mode"] == "full"


@pytest.mark.parametrize("case", ["mlp", "tokens"])
def test_the_estimate_counts_the_pull_backs_the_full_report_makes(case, monkeypatch):
    """The cost model's count of one-vector pull-backs through one input, ``W·(3n + 3m + S·n)``, against the
    vectors × inputs the engine pulls back during a whole full report (spied on ``pull_back``), within a
    factor 2 either way: the count behind the time estimate is the report's."""
    from torchfim.engine import per_module

    torch.manual_seed(0)
    if case == "mlp":
        model, X = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 5)).double(), torch.randn(24, 4).double()
    else:
        model, X = nn.Sequential(nn.Embedding(7, 4), nn.Linear(4, 6)).double(), torch.randint(0, 7, (24, 3))
    counted = []
    pull_back = per_module.pull_back

    def spy(output, calls, v, *args, **kwargs):
        counted.append(v.shape[0] * v.shape[1])
        return pull_back(output, calls, v, *args, **kwargs)

    monkeypatch.setattr(per_module, "pull_back", spy)
    R = report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, variance_inputs=8,
                                  score_only=False)
    width = 5 if case == "mlp" else 3 * 6
    spectra = sum(1 for layer in R["layers"] if layer["spectrum"] is not None)
    want, _ = full_report_work(width, 24, 8, R["model"]["n_parameters"], spectra)
    assert 0.5 <= sum(counted) / want <= 2, (sum(counted), want)


def test_the_re_create_line_leaves_out_what_the_score_only_report_did_not_use(tmp_path, capsys, monkeypatch):
    """A review: ``--mode score-only --variance-inputs 50`` echoed ``--variance-inputs 50`` on report.md's Re-create
    line, though the score-only report has no variance subset (nor spectra, ``--max-block``). Set but unused, they
    are now named as such and left out of the line, also where the report fell back for memory; where it fell back
    for time, they sized the estimate that chose it, and stay."""
    out = tmp_path / "rep"
    assert cli.main(["report", "--epochs", "1", "--no-progress", "--out", str(out), "--mode", "score-only",
                     "--variance-inputs", "50", "--max-block", "10", "--seed", "2"]) == 0
    printed = capsys.readouterr().out
    R = json.loads((out / "report.json").read_text())
    assert R["command"] == f"torchfim report --mode score-only --out {shlex.quote(str(out))} --seed 2 --epochs 1"
    assert R["unused_options"] == {"variance_inputs": 50, "max_block": 10}
    note = ("options of the full report's Î1-vs-Î2 subset and spectra, not used here: --variance-inputs 50 and "
            "--max-block 10 (left out of the Re-create line)")
    assert f"- **Re-create:** `{R['command']}`" in (out / "report.md").read_text()
    assert f"- The {note}." in (out / "report.md").read_text() and f"Note: {note}." in printed
    model, X, y = _wide_model()
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    R = report_mod.compute_report(model, report_mod.Data(X, y, "test"), progress=False, variance_inputs=4)
    assert R["mode"] == "score_only" and R["unused_options"] == {"variance_inputs": 4}
    from torchfim.report.score_only_render import markdown_score_only
    text = markdown_score_only(R)  # from the API, its keywords (before: "--variance-inputs 4", "`--mode full`")
    assert "not used here: variance_inputs=4." in text and "or with more memory; `score_only=False` computes" in text
    assert "--" not in text.replace("---", "")
    monkeypatch.setattr(report_settings, "FULL_REPORT_SECONDS", 0.0)
    small = nn.Sequential(nn.Linear(4, 3)).double()
    R = report_mod.compute_report(small, report_mod.Data(X, None, "test"), progress=False, variance_inputs=4,
                                  max_block=0)
    assert R["mode"] == "score_only" and R["unused_options"] == {}
    assert "not used here" not in markdown_score_only(R)


def test_a_full_report_of_more_than_a_minute_says_its_estimate_first(monkeypatch, capsys):
    """With progress on, a full report estimated at over a minute (under its budget) says the estimate before it
    starts: a user trial's GPT-2 report took 344 s while its progress bar's time left swung from 2.5 to 18 min. The
    command line prints it; a caller of the API is warned (it printed "torchfim report: ..." there too), at once."""
    from torchfim.report import compute as report_compute

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    data = report_mod.Data(torch.randn(16, 4, dtype=torch.float64), None, "test")
    monkeypatch.setattr(report_compute, "full_report_seconds", lambda *args: 300.0)
    said = "torchfim report: the full report will take about 5 min here"
    with on_command_line(), warnings.catch_warnings():
        warnings.simplefilter("error")  # the command line's note is printed, not warned
        assert report_mod.compute_report(model, data, progress=True, max_block=0)["mode"] == "full"
    printed = capsys.readouterr().err
    assert said in printed and "the score-only report (--mode score-only) takes" in printed
    events = []  # the warning shown before the first measurement, not once the report it announces has run
    measure_trace = report_compute.measure_trace
    monkeypatch.setattr(report_compute, "measure_trace", lambda *a: events.append("measured") or measure_trace(*a))
    monkeypatch.setattr(warnings, "showwarning", lambda message, *rest: events.append(str(message)))
    for score_only in (None, False):  # asked for: said too
        events.clear()
        assert report_mod.compute_report(model, data, progress=True, max_block=0, score_only=score_only)["mode"] == "full"
        assert events[0].startswith(said) and "(score_only=True)" in events[0] and events[1:] == ["measured"]
        assert "will take about" not in capsys.readouterr().err
    events.clear()
    monkeypatch.setattr(report_compute, "full_report_seconds", lambda *args: 30.0)
    report_mod.compute_report(model, data, progress=True, max_block=0)
    monkeypatch.setattr(report_compute, "full_report_seconds", lambda *args: 1e6)  # over budget: score-only instead
    assert report_mod.compute_report(model, data, progress=True, max_block=0)["mode"] == "score_only"
    assert "will take about" not in capsys.readouterr().err and not [e for e in events if "will take" in e]


def test_the_pull_back_is_timed_as_the_best_of_three(monkeypatch):
    """One timing taken while another program held the cores (a user trial: a 10-second report estimated at 47
    minutes) sent the automatic mode to the score-only report; the best of three leaves such a slow run out."""
    from torchfim.report import cost

    ticks, calls = iter([0.0, 50.0, 100.0, 100.5, 200.0, 201.0]), []  # three runs: 50 s (held cores), 0.5 s, 1 s
    monkeypatch.setattr(cost, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))  # cost's clock alone
    original = cost.PullBack
    monkeypatch.setattr(cost, "PullBack", lambda seconds, width: calls.append(seconds) or original(seconds, width))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    data = report_mod.Data(torch.randn(8, 4), None, "test")
    got = cost.time_pull_back(model, data, torchfim.families.Categorical(), None, -1)
    assert calls == [0.5 / 8] and got.width == 3
