"""The Catastrophic Fisher Explosion study (torchfim.experiments.explosion), on its hidden tiny preset,
through ``torchfim reproduce explosion`` and its old name ``torchfim explosion``."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from torchfim import cli
from torchfim.errors import TorchfimError
from torchfim.experiments import explosion as E

TINY = E.TINY


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.is_file()}


def _no_partial_files(out: Path) -> None:
    leftovers = [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    for p in (out / "runs").glob("*"):
        json.loads(p.read_text(encoding="utf-8"))  # every run file parses


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict]:
    """The tiny study, uninterrupted, through the command line."""
    out = tmp_path_factory.mktemp("uninterrupted")
    status = cli.main(["reproduce", "explosion", "--tiny", "--out", str(out), "--no-progress", "--master-seed", "3"])
    assert status == 0
    return out, json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_writes_results_summary_and_figures(reference):
    out, res = reference
    files = _files(out)
    assert {"results.json", "summary.md", "timings.json", "memorisation.png", "curves_digits_mlp.png"} <= files
    n_runs = E.count_runs(TINY)
    assert len(list((out / "runs").glob("*.json"))) == n_runs == len(res["runs"])
    assert res["master_seed"] == 3 and len(res["seeds"]) == TINY.n_seeds
    # η* from the grid, α from its grid; the small rate is η*/10
    t = res["tuning"]["digits/mlp"]
    assert t["lr_star"] in TINY.lr_grid and t["alpha"] in TINY.alpha_grid
    assert t["lr_small"] == pytest.approx(t["lr_star"] / 10)
    agg = res["aggregates"]["digits/mlp"]
    assert agg["small"]["lr"] == pytest.approx(agg["large"]["lr"] / 10)
    assert agg["small_fp"]["alpha"] == t["alpha"] and agg["small"]["alpha"] == 0
    # every comparison is a prob_outperform over the paired seeds
    names = {c["name"] for c in res["comparisons"]}
    assert {"a_explosion", "b_large_beats_small", "b_fp_beats_small", "c_fp_slows_noisy", "c_noisy_slowed_more"} <= names
    for c in res["comparisons"]:
        assert c["n"] == TINY.n_seeds and 0 <= c["p"] <= 1 and c["line"].startswith("P(")
    # Tr(F) is tracked with its standard error; no timing numbers in results.json
    run = res["runs"]["clean-digits-mlp-small-s0"]["result"]
    assert all(s is not None and s > 0 for s in run["curves"]["trace_stderr"])
    assert "seconds" not in json.dumps(res)
    noisy = res["runs"]["noisy-digits-mlp-large-base-s0"]["result"]
    assert noisy["n_noisy"] > 0
    assert res["aggregates"]["digits/mlp noisy, η*"]["fp"]["alpha"] == t["noisy"]["large"]["alpha"]
    assert set(res["verdicts"]) == {"clean", "noisy"}
    summary = (out / "summary.md").read_text(encoding="utf-8")
    assert "Which claims held" in summary and "P(large LR > small LR)" in summary
    assert "epochs on digits" in summary and "epochs on mnist1d" not in summary  # the data sets it ran (a review)


def test_interrupted_then_resumed_gives_the_same_results(reference, tmp_path):
    _, expected = reference
    out = tmp_path / "study"
    # stop after 4 runs (hidden --max-runs), as if killed: run files are complete, nothing final yet
    assert cli.main(["explosion", "--tiny", "--out", str(out), "--no-progress", "--master-seed", "3", "--max-runs", "4"]) == 0
    assert len(list((out / "runs").glob("*.json"))) == 4
    assert not (out / "results.json").exists()
    _no_partial_files(out)
    # the API's resume=False refuses the finished runs; the same command goes on from them, all of this code's
    # (before: refused, naming --resume)
    with pytest.raises(TorchfimError, match="already holds 4 finished runs; pass --resume"):
        E.run(out, TINY, master_seed=3, progress=False)
    assert cli.main(["explosion", "--tiny", "--out", str(out), "--no-progress", "--master-seed", "3", "--max-runs", "1"]) == 0
    assert len(list((out / "runs").glob("*.json"))) == 5
    # a KeyboardInterrupt raised in the middle of the study keeps the files written before it
    seen: list[str] = []

    def interrupt(run_id: str) -> None:
        seen.append(run_id)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        E.run(out, TINY, master_seed=3, resume=True, progress=False, on_run=interrupt)
    assert len(list((out / "runs").glob("*.json"))) == 8
    _no_partial_files(out)
    assert cli.main(["explosion", "--tiny", "--out", str(out), "--no-progress", "--master-seed", "3"]) == 0
    _no_partial_files(out)
    got = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert got == expected
    ref_out = reference[0]
    assert (out / "results.json").read_bytes() == (ref_out / "results.json").read_bytes()
    assert (out / "summary.md").read_bytes() == (ref_out / "summary.md").read_bytes()


def test_parallel_jobs_give_the_same_results(reference, tmp_path):
    _, expected = reference
    out = tmp_path / "jobs"
    res = E.run(out, TINY, master_seed=3, jobs=2, progress=False)
    assert res == expected


def test_settings_mismatch_on_resume_is_refused(reference, tmp_path):
    out, _ = reference
    other = replace(TINY, batch_size=64)
    with pytest.raises(TorchfimError, match="different settings"):
        E.run(out, other, master_seed=3, resume=True, progress=False)


def _copy_runs(out: Path, fresh: Path) -> Path:
    (fresh / "runs").mkdir(parents=True)
    for p in (out / "runs").glob("*.json"):
        (fresh / "runs" / p.name).write_bytes(p.read_bytes())
    return fresh


def test_another_master_seed_on_resume_is_refused(reference, tmp_path, capsys):
    fresh = _copy_runs(reference[0], tmp_path / "seed")
    before = {p.name: p.read_bytes() for p in (fresh / "runs").iterdir()}
    argv = ["reproduce", "explosion", "--tiny", "--resume", "--out", str(fresh), "--no-progress", "--max-runs", "1"]
    assert cli.main([*argv, "--master-seed", "1"]) == 2
    err = capsys.readouterr().err
    assert "was made with master seed 3, not the 1 given; pass --master-seed 3" in err and "a new --out folder" in err
    assert {p.name: p.read_bytes() for p in (fresh / "runs").iterdir()} == before  # no run file rewritten


def test_an_incomplete_run_file_is_named_with_its_fix(reference, tmp_path, capsys):
    fresh = _copy_runs(reference[0], tmp_path / "empty")
    broken = sorted((fresh / "runs").glob("*.json"))[0]
    broken.write_text("{}")
    argv = ["reproduce", "explosion", "--tiny", "--resume", "--out", str(fresh), "--no-progress", "--master-seed", "3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"cannot read the run file {str(broken)!r} (it is incomplete: no 'run_id'" in err
    assert "delete it and rerun with --resume" in err and "different settings" not in err


def test_run_options_with_from_results_are_refused(reference, tmp_path, capsys):
    argv = ["reproduce", "explosion", "--from-results", str(reference[0] / "results.json"), "--out", str(tmp_path / "r")]
    assert cli.main([*argv, "--seeds", "5", "--master-seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "--seeds, --master-seed cannot apply with --from-results" in err and "drop them" in err
    assert not (tmp_path / "r").exists()


def test_more_seeds_reuse_the_finished_runs(reference, tmp_path):
    out, expected = reference
    fresh = tmp_path / "more"
    fresh.mkdir()
    (fresh / "runs").mkdir()
    for p in (out / "runs").glob("*.json"):
        (fresh / "runs" / p.name).write_bytes(p.read_bytes())
    calls: list[str] = []
    res = E.run(fresh, replace(TINY, n_seeds=3), master_seed=3, resume=True, progress=False, on_run=calls.append)
    assert sorted(calls) == sorted(r for r in res["runs"] if r.endswith("-s2"))
    assert res["seeds"][:2] == expected["seeds"]
    for run_id, run in expected["runs"].items():
        assert res["runs"][run_id] == run


def test_resuming_on_run_files_of_other_code_is_named(reference, tmp_path, capsys):
    """Every run file records the code that made it (torch's version, a hash of torchfim's source). The same command
    run again does not go on from run files of other code, naming them and --resume; a study resumed with other code
    names how many of its run files another code made; run files of this code, or a rebuild that adds no run, say
    nothing."""
    import warnings

    import torch

    from torchfim.experiments.code_version import code_version

    out, _ = reference
    files = sorted((out / "runs").glob("*.json"))
    assert all(json.loads(p.read_text())["code"] == code_version() for p in files)
    assert code_version()["torch"] == torch.__version__ and len(code_version()["torchfim"]) == 16
    fresh = tmp_path / "other"
    (fresh / "runs").mkdir(parents=True)
    for i, p in enumerate(files):
        record = json.loads(p.read_text())
        if i == 0:
            record["code"] = {**record["code"], "torch": "0.0.1"}
        elif i == 1:
            del record["code"]
        (fresh / "runs" / p.name).write_text(json.dumps(record))
    more = replace(TINY, n_seeds=3)
    before = {p.name: p.read_bytes() for p in (fresh / "runs").iterdir()}
    argv = ["reproduce", "explosion", "--tiny", "--seeds", "3", "--out", str(fresh), "--no-progress", "--master-seed", "3"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"already holds {len(files)} finished runs, and 2 of the {len(files)} run files were made by other code" in err
    assert "pass --resume to finish that study" in err
    assert {p.name: p.read_bytes() for p in (fresh / "runs").iterdir()} == before
    with pytest.warns(RuntimeWarning, match=rf"2 of the {len(files)} run files were made by other code: torch 0\.0\.1 "
                                            rf"\(now {re.escape(torch.__version__)}\) and another torchfim source"):
        E.run(fresh, more, master_seed=3, resume=True, progress=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*made by other code")
        E.run(fresh, more, master_seed=3, resume=True, progress=False)  # every run there: nothing is added


def test_run_is_deterministic_and_restores_torch_state():
    import torch

    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    spec = E.RunSpec("x", "clean", "digits", "cnn", "small_fp", 0.05, 0.03, 0.3, 11, 0)
    a = E.train_one(spec, TINY)
    b = E.train_one(spec, TINY)
    assert a == b
    assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
    assert a["n_noisy"] > 0 and a["final"]["peak_trace"] > 0
    # whole mini-batches only: the penalty's gradient, reused for 9 steps, came from an epoch's last 14-16 inputs
    # whenever a computed step fell there (about 8× a whole batch's), and the penalised runs collapsed (a review)
    per_epoch = a["n_train"] // TINY.batch_size
    assert a["steps_per_epoch"] == per_epoch and a["steps"] == TINY.epochs_for("digits") * per_epoch


def test_models_have_no_batchnorm_and_the_digest_cnn_size():
    from torch import nn

    for d in ("digits", "mnist1d"):
        for m in ("mlp", "cnn"):
            net = E.build_model(d, m, E.FULL, seed=0)
            assert not any(isinstance(mod, nn.modules.batchnorm._BatchNorm) for mod in net.modules())
    cnn = E.build_model("mnist1d", "cnn", E.FULL, seed=0)
    assert sum(p.numel() for p in cnn.parameters()) == 9610


def test_changing_the_plan_reruns_only_the_changed_runs(reference, tmp_path):
    out, expected = reference
    fresh = tmp_path / "noisy_large"
    (fresh / "runs").mkdir(parents=True)
    for p in (out / "runs").glob("*.json"):
        (fresh / "runs" / p.name).write_bytes(p.read_bytes())
    calls: list[str] = []
    res = E.run(fresh, replace(TINY, noisy_lrs=("small", "large")), master_seed=3, resume=True, progress=False,
                on_run=calls.append)
    # only the noisy runs at η*/10 and the tuning of their α are new
    assert calls and all(c.startswith(("noisy-digits-mlp-small-", "tune_noisy_alpha-digits-mlp-small-")) for c in calls)
    assert len(calls) == len(TINY.noisy_alpha_grid) * TINY.n_tuning_seeds + len(TINY.noisy_variants()) * TINY.n_seeds
    assert res["aggregates"]["digits/mlp noisy, η*/10"]["base"]["lr"] == res["tuning"]["digits/mlp"]["lr_small"]
    assert res["aggregates"]["digits/mlp noisy, η*"]["base"]["lr"] == res["tuning"]["digits/mlp"]["lr_star"]
    for run_id, run in expected["runs"].items():
        assert res["runs"][run_id] == run
    assert (fresh / "memorisation.png").exists()


def test_tuning_picks_the_best_mean_best_validation_over_tuning_seeds(reference):
    _, res = reference
    t = res["tuning"]["digits/mlp"]
    assert len(t["tuning_seeds"]) == TINY.n_tuning_seeds >= 2
    assert not set(t["tuning_seeds"]) & set(res["seeds"])  # no tuning seed is an evaluation seed
    for grid, prefix, chosen, phase in ((TINY.lr_grid, "lr", t["lr_star"], "tune_lr"),
                                        (TINY.alpha_grid, "alpha", t["alpha"], "tune_alpha")):
        means = []
        for k, value in enumerate(grid):
            runs = [r for r in res["runs"].values() if r["spec"]["phase"] == phase
                    and (r["spec"]["lr"] if phase == "tune_lr" else r["spec"]["alpha"]) == value]
            assert sorted(r["spec"]["tuning_index"] for r in runs) == list(range(TINY.n_tuning_seeds))
            best = [max(v for v in r["result"]["curves"]["val_acc"] if v is not None) for r in runs]
            assert t[f"{prefix}_best_val_acc_per_seed"][k] == pytest.approx(best)
            means.append(sum(best) / len(best))
        assert t[f"{prefix}_best_val_acc"] == pytest.approx(means, abs=1e-6)
        assert chosen == grid[max(range(len(grid)), key=lambda i: (means[i], -i))]


def test_every_configuration_records_early_stopping_per_seed(reference):
    _, res = reference
    for label, agg in res["aggregates"].items():
        for entry in agg.values():
            if not isinstance(entry, dict) or "per_seed" not in entry:
                continue
            assert [p["seed_index"] for p in entry["per_seed"]] == list(range(TINY.n_seeds))
            for p in entry["per_seed"]:
                run = next(r["result"] for r in res["runs"].values()
                           if r["spec"]["seed_index"] == p["seed_index"] and r["spec"]["lr"] == entry["lr"]
                           and r["spec"]["alpha"] == entry["alpha"] and r["spec"]["phase"] in ("clean", "noisy")
                           and (label.endswith("(pooled)") or label.split(" ")[0] == f"{r['spec']['dataset']}/{r['spec']['model']}")
                           and (r["spec"]["noise_fraction"] > 0) == ("noisy" in label))
                c = run["curves"]
                i = c["val_acc"].index(max(x for x in c["val_acc"] if x is not None))  # first best validation step
                assert (p["step_of_best_val"], p["test_acc_at_best_val"]) == (c["step"][i], c["test_acc"][i])
                assert p["test_acc"] == c["test_acc"][-1]


def test_gap_closed_and_its_bootstrap_interval():
    from torchfim.experiments.explosion.gap import gap_closed

    large, small = [0.9, 0.92, 0.91], [0.8, 0.81, 0.79]
    fp = [s + 0.5 * (l - s) for l, s in zip(large, small)]  # each seed closes exactly half of its gap
    g = gap_closed([(large, small, fp)])
    assert g["value"] == pytest.approx(0.5) and g["ci_low"] == pytest.approx(0.5) and g["ci_high"] == pytest.approx(0.5)
    noisy = gap_closed([(large, small, [0.85, 0.80, 0.88])])
    assert noisy["value"] == pytest.approx(((0.85 + 0.80 + 0.88) - 2.4) / (2.73 - 2.4), rel=1e-5)
    assert noisy["ci_low"] < noisy["value"] < noisy["ci_high"]
    # pooled over two groups: the summed mean differences are divided
    pooled = gap_closed([(large, small, fp), ([0.5, 0.5], [0.3, 0.3], [0.3, 0.3])])
    assert pooled["value"] == pytest.approx((0.055 + 0.0) / (0.11 + 0.2), rel=1e-5)
    assert gap_closed([(small, small, small)])["value"] is None  # no gap, no fraction


COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "explosion"


def test_committed_study_follows_the_protocol():
    res = json.loads((COMMITTED / "results.json").read_text(encoding="utf-8"))
    s = res["settings"]
    assert s["preset"] == "full" and s["n_seeds"] >= 5 and s["n_tuning_seeds"] >= 2
    assert dict(s["epochs"])["mnist1d"] >= 100 and s["alpha_grid"] == [0.01, 0.03, 0.1, 0.3]
    assert s["noise_fraction"] == 0.25 and set(s["noisy_lrs"]) == {"small", "large"}
    for t in res["tuning"].values():
        assert len(t["tuning_seeds"]) == s["n_tuning_seeds"] and not set(t["tuning_seeds"]) & set(res["seeds"])
        if "alpha" in t:
            assert len(t["alpha_best_val_acc"]) == len(s["alpha_grid"]) and t["alpha"] in s["alpha_grid"]
    for d, m in s["combos"]:
        agg = res["aggregates"][f"{d}/{m}"]
        for v in ("large", "small", "small_fp"):
            assert len(agg[v]["per_seed"]) == s["n_seeds"]
            assert all({"step_of_best_val", "test_acc_at_best_val"} <= set(p) for p in agg[v]["per_seed"])
        assert agg["small"]["train_acc"]["mean"] >= 0.99 or d == "mnist1d"  # digits: small LR fits its training set
        assert agg["gap_closed"]["ci_low"] is not None


def test_committed_study_rebuilds_byte_identical_from_its_run_files(tmp_path):
    out = tmp_path / "rebuilt"
    assert cli.main(["reproduce", "explosion", "--from-results", str(COMMITTED / "results.json"), "--out", str(out)]) == 0
    assert len(list((out / "runs").glob("*.json"))) == len(json.loads((COMMITTED / "results.json").read_text())["runs"])
    for name in ("results.json", "summary.md"):
        assert (out / name).read_bytes() == (COMMITTED / name).read_bytes(), name
    # a folder that already holds run files is refused
    assert cli.main(["reproduce", "explosion", "--from-results", str(COMMITTED / "results.json"), "--out", str(out)]) == 2


def test_an_interruption_says_what_was_kept(tmp_path, monkeypatch, capsys):
    """Ctrl-C before any run finished says nothing was kept (before: "the finished runs are kept ... --resume");
    after some, it counts them and names --resume."""
    import torchfim.experiments.explosion.command as command

    def interrupted(out, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "run", interrupted)
    argv = ["reproduce", "explosion", "--tiny", "--out", str(tmp_path / "study"), "--no-progress"]
    assert cli.main(argv) == 130
    err = capsys.readouterr().err
    assert "no run had finished, so none was kept; run the same command again" in err and "--resume" not in err
    monkeypatch.undo()
    assert cli.main(["explosion", "--tiny", "--out", str(tmp_path / "study"), "--no-progress", "--max-runs", "2"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(command, "run", interrupted)
    assert cli.main([*argv, "--resume"]) == 130
    assert "the 2 finished runs are kept in" in (err := capsys.readouterr().err)
    assert "run the same command again to go on from them" in err and "--resume" not in err


def test_a_tuned_value_at_the_edge_of_its_grid_is_a_caveat():
    """η* chosen as the largest or smallest value of its grid, or α (clean or noisy-label runs) as the largest, is
    named: the grid does not bound it (the committed study's digits/MLP chose η* = 0.316, the top of its grid, without
    a word)."""
    from torchfim.experiments.explosion.claims import _grid_edges

    s = {"lr_grid": (0.0316, 0.1, 0.316), "alpha_grid": (0.01, 0.03, 0.1), "noisy_alpha_grid": (0.01, 0.03, 0.1)}
    tuning = {"a/mlp": {"lr_star": 0.316, "alpha": 0.03, "noisy": {"small": {"alpha": 0.1}, "large": {"alpha": 0.03}}},
              "b/cnn": {"lr_star": 0.0316, "alpha": 0.1}}
    lines = _grid_edges(s, tuning, ["a/mlp", "b/cnn"])
    assert len(lines) == 4
    assert "η* was the largest of [0.0316, 0.1, 0.316] on a/mlp: a larger value" in lines[0]
    assert "η* was the smallest of [0.0316, 0.1, 0.316] on b/cnn: a smaller value" in lines[1]
    assert "α was the largest of [0.01, 0.03, 0.1] on b/cnn:" in lines[2]
    assert "α of the noisy-label runs was the largest of [0.01, 0.03, 0.1] on a/mlp at η*/10:" in lines[3]
    inside = {"a/mlp": {"lr_star": 0.1, "alpha": 0.03, "noisy": {"small": {"alpha": 0.03}}}}
    assert _grid_edges(s, inside, ["a/mlp"]) == []
    # the noisy-label runs' smallest α too (only the clean runs' has a caveat of its own, a weak penalty: a review)
    weakest = {"a/mlp": {"lr_star": 0.1, "alpha": 0.01, "noisy": {"large": {"alpha": 0.01}}}}
    (line,) = _grid_edges(s, weakest, ["a/mlp"])
    assert "α of the noisy-label runs was the smallest of [0.01, 0.03, 0.1] on a/mlp at η*: a smaller value" in line


def test_peak_trace_is_the_largest_measurement_after_the_first_epoch():
    """As the paper's Table 4: a large rate's Tr(F) can peak within the first epoch, before the small rate's explosion
    has begun; that measurement is not the peak (the committed study's mnist1d/CNN at η* peaked at step 28 ± 18,
    within its first epoch of 29 steps in some seeds)."""
    from dataclasses import replace

    from torchfim.experiments.explosion.assemble import _extra

    settings = replace(E.Settings(), batch_size=10)
    curves = {"step": [0, 9, 10, 20, 30], "trace": [50.0, 30.0, 9.0, 7.0, None],
              "trace_stderr": [5.0, 3.0, 0.9, 0.7, None], "train_loss": [2.3, 1.0, 0.5, 0.4, None]}
    got = _extra({"curves": curves, "n_train": 95}, settings, "digits")  # an epoch of ⌈95/10⌉ = 10 steps, not 9
    assert (got["peak_trace"], got["step_of_peak_trace"], got["stderr_at_peak"]) == (9.0, 10, 0.9)
    early = _extra({"curves": curves, "n_train": 1000}, settings, "digits")  # no measurement after 100 steps
    assert early["peak_trace"] is None and early["step_of_peak_trace"] is None
    whole = _extra({"curves": curves, "n_train": 95, "steps_per_epoch": 9}, settings, "digits")  # whole batches
    assert (whole["peak_trace"], whole["step_of_peak_trace"]) == (30.0, 9)


def test_a_run_that_diverges_in_its_first_epoch_is_assembled(tmp_path):
    """A diverged run has no peak after its first epoch: the peak ratio's mean over the seeds met None and stopped the
    whole assembly with a TypeError (a review); the mean curves took their steps from the first run, cutting the others
    to a diverged first run's length. Now the ratio is over the runs that have the figure and the curves run on."""
    results = json.loads((COMMITTED / "results.json").read_text())
    run = results["runs"]["clean-digits-mlp-small-s0"]["result"]
    curves = run["curves"]
    keep = [i for i, step in enumerate(curves["step"]) if step < 5]
    run["curves"] = {k: [v[i] for i in keep] for k, v in curves.items()}
    run.update(diverged=True, steps=5, final={**run["final"], "peak_trace": None, "step_of_peak_trace": None})
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "rebuilt"
    assert cli.main(["reproduce", "explosion", "--from-results", str(path), "--out", str(out)]) == 0
    rebuilt = json.loads((out / "results.json").read_text())
    from torchfim.experiments.explosion.assemble import _extra

    settings = E.Settings(**{k: tuple(map(tuple, v)) if k == "epochs" else v for k, v in results["settings"].items()
                             if k in E.Settings.__dataclass_fields__})
    peaks = {v: [_extra(results["runs"][f"clean-digits-mlp-{v}-s{i}"]["result"], settings, "digits")["peak_trace"]
                 for i in range(6)] for v in ("small", "large")}
    assert peaks["small"].count(None) == 1  # the diverged run's
    mean = {v: sum(p for p in ps if p is not None) / sum(p is not None for p in ps) for v, ps in peaks.items()}
    assert rebuilt["aggregates"]["digits/mlp"]["peak_ratio_small_over_large"] == pytest.approx(
        mean["small"] / mean["large"], rel=1e-3)  # the five runs that have a peak
    assert rebuilt["curves"]["digits/mlp"]["small"]["trace"]["step"] == curves["step"]


def test_a_run_whose_outputs_overflow_at_a_measurement_is_recorded_as_diverged(monkeypatch):
    """A step with a finite loss can leave weights whose outputs overflow; where the next step measures Tr(F), the
    run is a divergence (as a non-finite loss is), not an error that ends the whole study (the full study's
    mnist1d/CNN at η = 1 stopped so: "the model produced non-finite outputs")."""
    import torch

    original, calls = torch.optim.SGD.step, []

    def overflowing(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 5:  # after the 5th step: step 5 is measured before it is taken (TINY: every 5 early on)
            with torch.no_grad():
                for group in self.param_groups:
                    for p in group["params"]:
                        p.mul_(1e30)
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", overflowing)
    spec = E.RunSpec("x", "clean", "digits", "mlp", "small", 0.05, 0.0, 0.0, 11, 0)
    result = E.train_one(spec, TINY)
    assert result["diverged"] is True and result["steps"] == 5
    assert result["curves"]["step"] == [0, 5]  # the measurement before step 0, and the last one, Tr(F) not measured
    assert result["curves"]["trace"][-1] is None


def test_the_summary_counts_the_diverged_runs_of_every_configuration():
    """Each row of the (b) and (c) tables says how many of its runs diverged, 0 too (the summary did not say; a reader
    could not tell a study without divergences from one that never looked)."""
    from torchfim.experiments.explosion.summary import summary

    results = json.loads((COMMITTED / "results.json").read_text(encoding="utf-8"))
    results["aggregates"]["digits/mlp"]["small"]["diverged"] = 1
    results["aggregates"]["mnist1d/cnn noisy, η*"]["fp"]["diverged"] = 2
    text = summary(results, [])
    rows = [line for line in text.splitlines() if line.startswith(("| digits/", "| mnist1d/"))]
    clean = [r.rsplit("|", 2)[1].strip() for r in rows if r.count("|") == 13]  # (b): 12 columns
    noisy = [r.rsplit("|", 2)[1].strip() for r in rows if r.count("|") == 14]  # (c): 13 columns
    assert clean == ["0/6", "1/6"] + ["0/6"] * 10  # digits/mlp at η*/10 is the second row
    assert noisy == ["0/6"] * 7 + ["2/6"]  # mnist1d/cnn at η* with the penalty is the last
    assert text.count("| diverged (loss or outputs non-finite) |") == 2


def test_a_study_without_pooled_columns_does_not_say_they_decide(reference):
    """The ``--quick`` (and tiny) study, one data set and model with 2 seeds, said its pooled columns decide: it has
    none, and no verdict can be reached; a study with pooled columns says what they add, with too few seeds too."""
    from torchfim.experiments.explosion.claims import _pooled_words

    summary = (reference[0] / "summary.md").read_text(encoding="utf-8")
    assert "(pooled)" not in summary and "they decide" not in summary
    assert ("With 2 seeds and no pooled column (one data set and model), no comparison can reach a conclusion: every "
            "verdict is 'not significant'") in summary
    committed = json.loads((COMMITTED / "results.json").read_text(encoding="utf-8"))
    settings, verdicts = committed["settings"], committed["verdicts"]
    assert _pooled_words(settings, verdicts, 6) == " Pooled columns pair the runs of every data set and model."
    assert "so only a pooled column, of 6 pairs or more, can" in _pooled_words({**settings, "n_seeds": 2}, verdicts, 6)
    alone = {"clean": {"digits/mlp": {}}, "noisy": {}}
    assert _pooled_words({**settings, "n_seeds": 8}, alone, 6) == ""
