"""`torchfim reproduce soen-sun --quick`: outputs exist, are consistent with the maths, and match torchfim."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

import torchfim
from torchfim import _io
from torchfim.cli import main as cli_main
from torchfim.experiments import soen_sun

PNGS = ("fig_a_bound_ratios.png", "fig_b_variance_by_activation.png", "fig_c_depth_width.png", "fig_d_training.png")
SECTIONS = ("meta", "settings", "datasets", "bound_ratios", "activations", "seeds", "seed_ranges", "depth_width",
            "training")


#: One small configuration of each experiment: a run in seconds.
TINY = soen_sun.Settings(
    n_inputs=8, width=4, activations=("relu",), settings_ab=(("digits", "categorical"),), depths=(1,),
    widths=(4,), train_activations=("tanh",), checkpoints=(0,), extra_seeds=(),
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("soen_sun")
    rc = cli_main(["reproduce", "soen-sun", "--out", str(out), "--quick", "--no-progress"])
    assert rc == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_files_exist_and_are_complete(quick_run):
    out, results = quick_run
    for name in PNGS:
        path = out / name
        assert path.is_file(), name
        assert path.stat().st_size > 20_000, f"{name} is suspiciously small"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for section in SECTIONS:
        assert section in results, section
    assert results["meta"]["quick"] is True and results["meta"]["complete"] is True
    # wall-clock seconds only in timings.json: results.json holds none of them
    timings = json.loads((out / "timings.json").read_text(encoding="utf-8"))
    assert timings["seconds_total"] >= sum(timings["seconds"].values()) > 0 and "second" not in json.dumps(results)
    s = soen_sun.QUICK
    assert len(results["activations"]) == len(results["bound_ratios"]) == len(s.settings_ab) * len(s.activations)
    assert len(results["seeds"]) == len(s.extra_seeds) * len(s.settings_ab) * len(s.activations)
    assert len(results["depth_width"]) == len(s.depths) + len(s.widths)
    assert len(results["training"]) == len(s.train_activations) * len(s.checkpoints)
    with open(out / "results.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    assert {r["section"].split(":")[0] for r in rows} >= {"activations", "bound_ratios", "seeds", "depth_width",
                                                           "training"}
    summary = (out / "summary.md").read_text(encoding="utf-8")
    for heading in ("## What was run", "## Figures", "## Key numbers", "## Conclusions"):
        assert heading in summary
    assert "Not yet run" not in summary
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"


def test_bounds_are_upper_bounds(quick_run):
    _, results = quick_run
    n_ratios = 0
    for rec in results["bound_ratios"]:
        for lay in rec["layers"]:
            for bound, st in lay["ratios"].items():
                if st["count"]:
                    assert st["min"] >= 1 - 1e-9, (rec["activation"], rec["dataset"], lay["layer"], bound, st["min"])
                    assert st["min"] <= st["median"] <= st["max"]
                    n_ratios += st["count"]
        for bound, ratio in rec["trace_ratio"].items():
            if ratio is not None:
                assert ratio >= 1 - 1e-9, (rec["activation"], rec["dataset"], bound, ratio)
    assert n_ratios > 1000


def test_hessian_variance_zeros_where_the_maths_says(quick_run):
    _, results = quick_run
    for rec in results["activations"] + results["seeds"]:
        # o is linear in the output layer's weights and bias: ∂²o/∂θ_p² = 0 there, whatever the activation.
        assert rec["layers"][-1]["var_hessian_diag_max"] == 0
        assert rec["layers"][-1]["var_hessian_diag_sum"] == 0
        if rec["activation"] == "relu":
            # piecewise linear: ∂²o/∂θ_p² = 0 for every parameter (inside each layer), so Var(Î2)_pp = 0 ...
            for lay in rec["layers"]:
                assert lay["var_hessian_diag_max"] == 0, (rec["dataset"], lay["layer"])
            assert rec["trace"]["var_hessian"] == 0  # ... and tr ∇²o = 0 too
            assert rec["trace"]["var_score"] > 0  # Î1 never has zero variance
        else:
            assert all(lay["var_hessian_diag_sum"] > 0 for lay in rec["layers"][:-1])
        assert all(lay["var_score_diag_sum"] > 0 for lay in rec["layers"])
    relu_a = [r for r in results["bound_ratios"] if r["activation"] == "relu"]
    assert relu_a and all(lay["ratios"]["hessian_spectral"]["count"] == 0 for r in relu_a for lay in r["layers"])
    gauss = [r for r in results["bound_ratios"] if r["family"] == "gaussian"]
    for rec in gauss:  # Λ = I: the Î2 bound is an equality; Î1's are (C+2-1)/2 and (C²+2C-1)/2 times the variance
        for lay in rec["layers"]:
            for bound, value in (("hessian_spectral", 1.0), ("score_spectral", 5.5), ("score_kurtosis", 59.5)):
                st = lay["ratios"][bound]
                if st["count"]:
                    assert st["min"] == pytest.approx(value, rel=1e-9) and st["max"] == pytest.approx(value, rel=1e-9)


def _digits_mlp(width: int, activation: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(64, width), activation(), nn.Linear(width, width), activation(), nn.Linear(width, 10)
    )
    return model.double()


def test_numbers_match_direct_recomputation(quick_run):
    from sklearn.datasets import load_digits

    _, results = quick_run
    settings = results["settings"]
    (rec,) = [r for r in results["activations"] if (r["dataset"], r["family"], r["activation"])
              == ("digits", "categorical", "tanh")]
    (rec_a,) = [r for r in results["bound_ratios"] if (r["dataset"], r["family"], r["activation"])
                == ("digits", "categorical", "tanh")]
    assert settings["depth"] == 2
    model = _digits_mlp(settings["width"], nn.Tanh, settings["seed"])
    reference = soen_sun.build_mlp(64, settings["width"], 2, "tanh", seed=settings["seed"])
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p, q)
    X = torch.as_tensor(load_digits().data / 16.0, dtype=torch.float64)
    x = X[torch.tensor(results["datasets"]["digits"]["indices"])]
    assert x.shape[0] == settings["n_inputs"] == rec["n_inputs"]
    assert rec["num_params"] == sum(p.numel() for p in model.parameters())

    def close(a, b):
        assert float(a) == pytest.approx(float(b), rel=1e-9, abs=1e-300)

    close(rec["trace"]["fisher"], torchfim.fisher(model, x, structure="trace"))
    close(rec["trace"]["var_score"], torchfim.fisher_variance(model, x, estimator="score", structure="trace"))
    close(rec["trace"]["var_hessian"], torchfim.fisher_variance(model, x, estimator="hessian", structure="trace"))
    close(rec_a["trace_bound"]["score_tightest"], torchfim.variance_bound(model, x, estimator="score", structure="trace"))
    close(rec_a["trace_bound"]["hessian_spectral"],
          torchfim.variance_bound(model, x, estimator="hessian", structure="trace"))
    # per layer (weight + bias) sums of the diagonal, through compare_estimators
    cmp = torchfim.compare_estimators(model, x, family="categorical")
    rows = {r.name: r for r in cmp.rows}
    for i, lay in enumerate(rec["layers"]):
        w, b = rows[f"{2 * i}.weight"], rows[f"{2 * i}.bias"]
        close(lay["fisher_diag_sum"], w.fisher_diag_sum + b.fisher_diag_sum)
        close(lay["var_score_diag_sum"], w.score_variance + b.score_variance)
        close(lay["var_hessian_diag_sum"], w.hessian_variance + b.hessian_variance)
    # a box statistic of a bound ratio: the smallest ratio of the first layer's spectral Î1 bound
    bound = torchfim.score_variance_bound_spectral(model, x, structure="diag")
    var = torchfim.fisher_variance(model, x, estimator="score", structure="diag")
    size = rec["layers"][0]["size"]
    fisher = torchfim.fisher(model, x, structure="diag")
    keep = var[:size] > soen_sun.ZERO_VARIANCE_RTOL * fisher[:size] ** 2  # zero up to round-off, per entry
    close(rec_a["layers"][0]["ratios"]["score_spectral"]["min"], (bound[:size][keep] / var[:size][keep]).min())


def test_training_rows_are_consistent(quick_run):
    _, results = quick_run
    for r in results["training"]:
        assert r["rel_se_score"] == pytest.approx(math.sqrt(r["var_score_trace"]) / r["fisher_trace"], rel=1e-12)
        for est in ("score", "hessian"):
            k = math.ceil(r[f"var_{est}_trace"] / (soen_sun.REL_ERROR * r["fisher_trace"]) ** 2 * (1 - 1e-12))
            assert r[f"samples_needed_{est}"] == max(1, k)
    epochs = [r["epoch"] for r in results["training"] if r["activation"] == results["training"][0]["activation"]]
    assert epochs == list(soen_sun.QUICK.checkpoints)


def test_interrupted_run_keeps_finished_sections(tmp_path, monkeypatch):

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    from torchfim.experiments.soen_sun import figures

    monkeypatch.setattr(figures, "plot_depth_width", interrupt)
    with pytest.raises(KeyboardInterrupt):
        soen_sun.run(tmp_path, settings=TINY, progress=False)
    results = json.loads((tmp_path / "results.json").read_text(encoding="utf-8"))
    assert len(results["activations"]) == 1 and len(results["depth_width"]) == 2
    assert results["training"] == [] and "complete" not in results["meta"] and not (tmp_path / "timings.json").exists()
    assert (tmp_path / "fig_a_bound_ratios.png").is_file() and not (tmp_path / "fig_d_training.png").exists()
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "Run incomplete" in summary and "*Not yet run (interrupted or in progress): training.*" in summary
    assert torch.get_num_threads() >= 1
    # its Figures section describes the figures drawn, and names those not drawn (before: all four described)
    figures = summary.split("## Figures")[1].split("## Key numbers")[0]
    assert "- `fig_a_bound_ratios.png` (a):" in figures and "- `fig_b_variance_by_activation.png` (b):" in figures
    assert "(c):" not in figures and "(d):" not in figures
    assert "- Not drawn, the run stopped while drawing them: `fig_c_depth_width.png`." in figures
    assert "- Not drawn, their parts unfinished: `fig_d_training.png`." in figures


def test_an_interrupted_rerun_leaves_no_figure_of_the_earlier_run(tmp_path, monkeypatch):
    """A finished run, then the same study interrupted in its depth-width part: the folder holds the figures the
    new summary.md describes, not the earlier run's fig_c and fig_d beside the new results (which summary.md
    said were "Not drawn")."""
    soen_sun.run(tmp_path, settings=TINY, progress=False)
    assert all((tmp_path / png).is_file() for png in PNGS)

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    from torchfim.experiments.soen_sun import figures

    monkeypatch.setattr(figures, "plot_depth_width", interrupt)
    with pytest.raises(KeyboardInterrupt):
        soen_sun.run(tmp_path, settings=TINY, progress=False)
    assert [png for png in PNGS if (tmp_path / png).exists()] == list(PNGS[:2])
    listed = (tmp_path / "summary.md").read_text(encoding="utf-8")
    assert "- Not drawn, the run stopped while drawing them: `fig_c_depth_width.png`." in listed
    assert "- Not drawn, their parts unfinished: `fig_d_training.png`." in listed


def test_interrupted_while_drawing_the_second_figure_lists_the_first(tmp_path, monkeypatch):
    """Interrupted while drawing fig_b, after fig_a was written: summary.md describes fig_a and names fig_b as
    not drawn, exactly the figures in the folder (before: both named "Not drawn", fig_a.png beside it)."""

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    from torchfim.experiments.soen_sun import figures

    monkeypatch.setattr(figures, "plot_activations", interrupt)
    with pytest.raises(KeyboardInterrupt):
        soen_sun.run(tmp_path, settings=TINY, progress=False)
    assert [png for png in PNGS if (tmp_path / png).exists()] == [PNGS[0]]
    listed = (tmp_path / "summary.md").read_text(encoding="utf-8").split("## Figures")[1].split("## Key numbers")[0]
    described = [png for png in PNGS if f"- `{png}` (" in listed]
    not_drawn = " ".join(line for line in listed.splitlines() if line.startswith("- Not drawn"))
    assert described == [PNGS[0]]
    assert [png for png in PNGS if png in not_drawn] == list(PNGS[1:])
    assert f"- Not drawn, the run stopped while drawing them: `{PNGS[1]}`." in listed


@pytest.mark.parametrize(("plot", "call", "written", "unfinished"), [
    ("plot_bound_ratios", 1, 0, "seeds, depth_width, training"), ("plot_activations", 1, 1, "seeds, depth_width, training"),
    ("plot_activations", 2, 1, "depth_width, training"), ("plot_depth_width", 1, 2, "training"),
    ("plot_training", 1, 3, "")], ids=["fig_a", "fig_b", "fig_b again (seeds)", "fig_c", "fig_d"])
def test_interrupted_while_drawing_any_figure_names_its_part_finished_and_the_figures_written(
        tmp_path, monkeypatch, plot, call, written, unfinished):
    """Stopped while drawing any figure (fig_b twice: its part's, then with the seeds' ranges): summary.md describes
    exactly the figures in the folder, names the part whose figure was being drawn finished (its key numbers, not
    "Not yet run") and that figure "stopped while drawing", and only the later parts unfinished (before: stopped in
    fig_a, fig_c or fig_d, the part was "Not yet run" and its figure "their parts unfinished")."""
    from torchfim.experiments.soen_sun import figures

    drawing, calls = getattr(figures, plot), []

    def interrupt_on_call(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise KeyboardInterrupt
        return drawing(*args, **kwargs)

    monkeypatch.setattr(figures, plot, interrupt_on_call)
    with pytest.raises(KeyboardInterrupt):
        soen_sun.run(tmp_path, settings=TINY, progress=False)
    summary = (tmp_path / "summary.md").read_text(encoding="utf-8")
    listed = summary.split("## Figures")[1].split("## Key numbers")[0]
    stopped = {"plot_bound_ratios": PNGS[:2], "plot_activations": PNGS[1:2], "plot_depth_width": PNGS[2:3],
               "plot_training": PNGS[3:]}[plot]
    later = PNGS[written + len(stopped):]
    assert [png for png in PNGS if (tmp_path / png).exists()] == list(PNGS[:written])
    assert [png for png in PNGS if f"- `{png}` (" in listed] == list(PNGS[:written])
    assert f"- Not drawn, the run stopped while drawing them: {', '.join(f'`{png}`' for png in stopped)}." in listed
    assert ("Not drawn, their parts unfinished" in listed) == bool(later)
    part_heading = {"plot_bound_ratios": "**(b) Trace", "plot_activations": "**(b) Trace",
                    "plot_depth_width": "**(c) Depth", "plot_training": "**(d) Training"}[plot]
    assert part_heading in summary and "Run incomplete" in summary
    if unfinished:  # the parts after it, with no rows
        assert f"*Not yet run (interrupted or in progress): {unfinished}.*" in summary
    else:
        assert "Not yet run" not in summary


def test_an_interrupted_command_names_its_partial_output_and_that_it_does_not_resume(tmp_path, monkeypatch, capsys):
    """(before: "interrupted" alone)"""
    from torchfim.experiments.soen_sun import command

    def interrupted(out, **kwargs):
        Path(out).mkdir()
        (Path(out) / "summary.md").write_text("**Run incomplete.**", encoding="utf-8")
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run", interrupted)
    out = tmp_path / "study"
    assert cli_main(["reproduce", "soen-sun", "--quick", "--no-progress", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert f"interrupted; the finished parts are in {out}/ (summary.md, marked 'Run incomplete'" in err
    assert "the study does not resume: run the same command again to start it over" in err


def test_the_interrupted_hint_prints_a_folder_given_with_a_slash_with_one(tmp_path):
    """(before: "are in DIR// (" for ``--out DIR/``)"""
    from torchfim.experiments.soen_sun.command import interrupted_hint

    assert interrupted_hint(f"{tmp_path}/").startswith(f"nothing was written to {tmp_path}/ yet")
    (tmp_path / "summary.md").write_text("**Run incomplete.**", encoding="utf-8")
    assert interrupted_hint(f"{tmp_path}/").startswith(f"the finished parts are in {tmp_path}/ (summary.md")


def test_atomic_writers(tmp_path):
    path = tmp_path / "sub" / "r.json"
    _io.write_json(path, {"a": 1})
    with pytest.raises(ValueError):
        _io.write_json(path, {"a": float("nan")})  # JSON has no NaN; the old file stays
    assert json.loads(path.read_text()) == {"a": 1}
    _io.write_text(tmp_path / "t.md", "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"
    from matplotlib.figure import Figure

    fig = Figure()
    fig.subplots().plot([0, 1], [1, 0])
    _io.save_figure(fig, tmp_path / "f.png")
    assert (tmp_path / "f.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.png", "sub", "t.md"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["r.json"]


def test_a_repeated_run_writes_results_json_byte_for_byte(tmp_path):
    """Wall-clock seconds go to timings.json, so two runs of the same settings write the same results.json and
    summary.md (before, results.json held the seconds of each part and never compared equal)."""
    for name in ("a", "b"):
        soen_sun.run(tmp_path / name, settings=TINY, progress=False, command="same")
    for name in ("results.json", "summary.md", "results.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "timings.json").is_file()


def test_a_part_stopped_halfway_is_named_with_the_rows_it_has(quick_run):
    """A part interrupted after some of its configurations has rows in results.json and results.csv: the summary
    says how many, where it said only "Not yet run"."""
    from torchfim.experiments.soen_sun.summary import PARTS, summary

    _, results = quick_run
    text = summary(results, soen_sun.QUICK, set(PARTS) - {"depth_width"})
    rows = len(results["depth_width"])
    assert rows > 0
    assert f"depth_width ({rows} rows so far in results.json and results.csv, summarised once it finishes)" in text


def test_resume_is_answered_with_why_not_and_what_to_do(tmp_path, capsys):
    """(before: "unrecognized arguments: --resume", an option the explosion study has)"""
    out = tmp_path / "study"
    assert cli_main(["reproduce", "soen-sun", "--resume", "--quick", "--out", str(out)]) != 0
    err = capsys.readouterr().err
    assert "--resume: the soen-sun study does not resume" in err and "without --resume to start it over" in err
    assert not out.exists()
