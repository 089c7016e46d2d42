"""The Catastrophic Fisher Explosion study (torchfim.experiments.explosion), on its hidden tiny preset,
through ``torchfim reproduce explosion`` and its old name ``torchfim explosion``."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from torchfim import cli  # noqa: E402
from torchfim.errors import TorchfimError  # noqa: E402
from torchfim.experiments import explosion as E  # noqa: E402

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


def test_interrupted_then_resumed_gives_the_same_results(reference, tmp_path):
    _, expected = reference
    out = tmp_path / "study"
    # stop after 4 runs (hidden --max-runs), as if killed: run files are complete, nothing final yet
    assert cli.main(["explosion", "--tiny", "--out", str(out), "--no-progress", "--master-seed", "3", "--max-runs", "4"]) == 0
    assert len(list((out / "runs").glob("*.json"))) == 4
    assert not (out / "results.json").exists()
    _no_partial_files(out)
    # without --resume the finished runs are not silently overwritten
    assert cli.main(["explosion", "--tiny", "--out", str(out), "--no-progress", "--master-seed", "3"]) == 2
    # a KeyboardInterrupt raised in the middle of the study keeps the files written before it
    seen: list[str] = []

    def interrupt(run_id: str) -> None:
        seen.append(run_id)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        E.run(out, TINY, master_seed=3, resume=True, progress=False, on_run=interrupt)
    assert len(list((out / "runs").glob("*.json"))) == 7
    _no_partial_files(out)
    assert cli.main(["explosion", "--tiny", "--out", str(out), "--no-progress", "--master-seed", "3", "--resume"]) == 0
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
    assert len(calls) == len(TINY.noisy_alpha_grid) + len(TINY.noisy_variants()) * TINY.n_seeds
    assert res["aggregates"]["digits/mlp noisy, η*/10"]["base"]["lr"] == res["tuning"]["digits/mlp"]["lr_small"]
    assert res["aggregates"]["digits/mlp noisy, η*"]["base"]["lr"] == res["tuning"]["digits/mlp"]["lr_star"]
    for run_id, run in expected["runs"].items():
        assert res["runs"][run_id] == run
    assert (fresh / "memorisation.png").exists()
