"""``torchfim report`` with no model: the default report writes every file, its numbers are the library's (the
trace, each layer's variances alone), its report.md describes every figure with numbers, its checkpoint
recreates it, and its model trains every epoch however long that takes.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import report_fixtures
import torch
from report_fixtures import PNG_MAGIC, _files, _leftovers
from torch import nn

import torchfim
from torchfim import cli
from torchfim import report as report_mod
from torchfim.datasets import load_digits
from torchfim.toy import mlp

fast_figures = report_fixtures.fast_figures  # a fixture the tests take


# A tiny default: a 64-8-10 MLP trained 2 epochs (deterministic: the epoch cap ends training),
# variances on 24 of the digits.
TINY = ["--hidden", "8", "--epochs", "2", "--variance-inputs", "24", "--no-progress"]


@pytest.fixture(scope="module")
def default_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("default") / "rep"
    import io
    from contextlib import redirect_stdout

    buffer = io.StringIO()
    with redirect_stdout(buffer):
        status = cli.main(["report", *TINY, "--out", str(out)])
    assert status == 0
    return out, json.loads((out / "report.json").read_text()), buffer.getvalue()


def _model_from(out: Path, hidden=(8,)) -> nn.Module:
    model = mlp(64, hidden, 10)
    model.load_state_dict(torch.load(out / "model.pt", weights_only=True))
    return model.eval()


# ------------------------------------------------------------------------------ the default report
def test_default_report_writes_every_file(default_report):
    out, R, stdout = default_report
    want = set(report_mod.FILES) | {report_mod.EMPIRICAL_FIGURE}
    assert _files(out) == want
    assert set(R["files"]) == want
    for name in want:
        if name.endswith(".png"):
            data = (out / name).read_bytes()
            assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
    assert not _leftovers(out.parent)
    # the terminal summary: one row per layer, the whole model, and where the report went
    for layer in R["layers"]:
        assert any(line.startswith(layer["name"]) for line in stdout.splitlines())
    assert "whole model" in stdout and f"wrote {out}" in stdout


def test_default_report_trace_matches_the_library(default_report):
    out, R, _ = default_report
    model = _model_from(out)
    X, y = load_digits()
    assert R["data"]["n_inputs"] == X.shape[0] == 1797
    exact = torchfim.fisher(model, X, structure="trace")
    assert R["trace"]["exact"] == pytest.approx(float(exact), rel=1e-6)
    assert sum(layer["trace_exact"] for layer in R["layers"]) == pytest.approx(float(exact), rel=1e-5)
    # error bars: the exact standard error of the score estimate (one label per input)
    var1 = torchfim.fisher_variance(model, X, estimator="score", structure="trace")
    assert R["trace"]["trace_score_stderr"] == pytest.approx(math.sqrt(float(var1)), rel=1e-5)
    # the whole-model labels-per-input equals torchfim.samples_needed for the score estimator
    assert R["trace"]["samples_needed"]["score"] == torchfim.samples_needed(model, X, estimator="score")
    # empirical Fisher with the true labels
    emp = torchfim.fisher(model, X, estimator="empirical", targets=y, structure="trace")
    assert R["empirical"]["trace"] == pytest.approx(float(emp), rel=1e-5)
    # every diagonal entry of this small model is in the scatter's points
    points = R["empirical"]["points"]
    assert sum(len(p["index"]) for p in points.values()) == R["model"]["n_parameters"]
    diag = torchfim.fisher(model, X, structure="diag")
    first = points[R["layers"][0]["name"]]
    assert first["exact"][:5] == pytest.approx(diag[first["index"][:5]].tolist(), rel=1e-5)


def test_per_layer_variances_are_those_of_the_layer_alone(default_report):
    out, R, _ = default_report
    model = _model_from(out)
    X, _ = load_digits()
    S = X[R["data"]["variance_subset_indices"]]
    assert S.shape[0] == 24
    layer = R["layers"][0]
    for p_name, p in model.named_parameters():
        p.requires_grad_(p_name == layer["name"])
    for est in ("score", "hessian"):
        var = torchfim.fisher_variance(model, S, estimator=est, structure="trace")
        assert layer["subset"][f"var_{est}"] == pytest.approx(float(var), rel=1e-5)
        bound = torchfim.variance_bound(model, S, estimator=est, structure="trace")
        assert layer["subset"][f"bound_{est}"] == pytest.approx(float(bound), rel=1e-5)
        assert layer["subset"][f"bound_{est}"] >= layer["subset"][f"var_{est}"] * (1 - 1e-6)
    # Î2 is exact for the last linear layer: ∇²_θ o = 0 there
    last = R["layers"][-1]
    assert last["subset"]["var_hessian"] == 0 and last["samples_needed"]["hessian"] == 1
    # spectra: the eigenvalues of a block sum to the layer's trace
    for layer in R["layers"]:
        assert layer["spectrum"]["sum"] == pytest.approx(layer["trace_exact"], rel=1e-4)


def test_the_samples_needed_figure_names_a_one_sigma_relative_standard_error(default_report):
    """Its title said "10% relative error", which reads as a worst case; the target is s.e. ≤ 10% of the value."""
    from matplotlib.figure import Figure

    from torchfim.report import figures

    _, R, _ = default_report
    for compact in (False, True):
        ax = Figure().add_subplot(1, 1, 1)
        figures._ax_samples(ax, R, compact=compact)
        title = ax.get_title()
        assert title.startswith("Labels per input for 10% rel. s.e. (one σ) of Tr") and "relative error" not in title


def test_report_md_describes_every_figure_with_numbers(default_report):
    out, R, _ = default_report
    md = (out / "report.md").read_text()
    for name in R["files"]:
        if name.endswith(".png"):
            assert f"]({name})" in md, name
    for section in ("Tr(F) per layer", "Î1 vs Î2", "## 3. Labels per input for a 10% relative standard error (one σ)",
                    "Eigenvalues", "Empirical vs true"):
        assert section in md
    # samples_needed's target is a one-σ relative standard error: "10% relative error" read as a worst case
    assert "**Labels per input for a 10% relative standard error** (one σ) of Tr(F)" in md
    assert "about two estimates in three fall within 10%" in md and "relative error" not in md
    from torchfim.report.format import fmt

    assert fmt(R["trace"]["exact"]) in md
    for layer in R["layers"]:
        assert f"`{layer['name']}`" in md and fmt(layer["trace_exact"]) in md
    assert "24" in md and "subset" in md  # says the variance parts use a subset


def test_checkpoint_of_the_default_recreates_the_report(default_report, tmp_path, capsys, fast_figures):
    out, R, _ = default_report
    again = tmp_path / "again"
    status = cli.main(["report", "--hidden", "8", "--variance-inputs", "24", "--no-progress",
                       "--checkpoint", str(out / "model.pt"), "--out", str(again)])
    assert status == 0, capsys.readouterr().err
    R2 = json.loads((again / "report.json").read_text())
    assert R2["model"]["training"] is None
    assert R2["trace"]["exact"] == pytest.approx(R["trace"]["exact"], rel=1e-7)
    assert R2["layers"][0]["subset"]["var_hessian"] == pytest.approx(R["layers"][0]["subset"]["var_hessian"], rel=1e-6)


def test_the_default_model_trains_every_epoch_however_long_it_takes(monkeypatch, capsys):
    """A slow machine (here a clock that leaps 100 s at every reading) gets the model of a fast one: all the epochs,
    the same weights, so a seeded report and its Re-create line are reproducible, and a rerun after an
    interruption builds the model whose finished steps it kept. Before, training stopped at the first epoch past
    60 s: ``--epochs 4000`` twice, seed 0, trained 1197 and 2259 epochs (Tr(F) 2.40e-5 and 3.36e-5)."""
    import torchfim.toy as toy_mod

    want, _, trained = report_mod.default_model(hidden=(8,), epochs=3, seed=2)
    clock = iter(range(0, 10**6, 100))
    monkeypatch.setattr(toy_mod.time, "perf_counter", lambda: float(next(clock)))
    got, _, slow = report_mod.default_model(hidden=(8,), epochs=3, seed=2)
    assert trained["epochs"] == slow["epochs"] == 3 and not slow["stopped_by_time"]
    assert all(torch.equal(a, b) for a, b in zip(got.state_dict().values(), want.state_dict().values(), strict=True))
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    assert "all of them however long they take" in " ".join(capsys.readouterr().out.split())


def test_a_state_dict_that_does_not_fit_the_default_is_named_as_the_caller_gave_it():
    """``default_model(state_dict)`` called without a checkpoint's name said ``checkpoint='the checkpoint' does not
    match the model``, and told its caller to drop a ``model`` it never passed; now "the state dict", and the fix in
    ``default_model``'s own keywords. The report, which passes the file's name, still names the file."""
    narrow = mlp(64, (8,), 10, seed=0).state_dict()
    with pytest.raises(torchfim.TorchfimError) as caught:
        report_mod.default_model(narrow)
    said = str(caught.value)
    assert said.startswith("the state dict does not match the model: ")
    assert "(8, 64) in the state dict but (32, 64) in the model" in said
    assert "checkpoint" not in said and "without model" not in said and "pass hidden=(...)" in said
    with pytest.raises(torchfim.TorchfimError, match=r"^checkpoint='model\.pt' does not match the model: .* in the "
                       r"checkpoint but .*; without model it must hold the default MLP 64-32-32-10"):
        report_mod.default_model(narrow, checkpoint_name="model.pt")
    loaded, _, training = report_mod.default_model(narrow, hidden=(8,))
    assert training is None and torch.equal(loaded[0].weight, narrow["0.weight"])
