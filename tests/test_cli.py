"""The command line, the demo, the data loaders and the helper scripts."""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import torchfim
from torchfim import cli
from torchfim.datasets import load_digits, load_mnist1d
from torchfim.demo import ESTIMATORS, format_table, run_demo

ROOT = Path(__file__).resolve().parents[1]

# Small settings: a 64-8-10 MLP trained for 3 epochs (the epoch cap, not the time limit, ends
# training, so runs are deterministic and the in-process and subprocess runs agree).
SMALL = dict(seconds=600.0, seed=3, epochs=3, hidden=(8,))
SMALL_ARGS = ["--seconds", "600", "--seed", "3", "--epochs", "3", "--hidden", "8"]

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ROW = re.compile(rf"^(\w+)\s+({_NUMBER})\s+({_NUMBER}|—)\s+({_NUMBER})\s+({_NUMBER})\s+({_NUMBER})\s+({_NUMBER})$")


def table_rows(lines) -> dict[str, list[str]]:
    """Estimator name -> its printed cells (Tr(F), s.e., diag mean, diag median, diag max, time)."""
    rows = {}
    for line in lines:
        m = _ROW.match(line.strip())
        if m and m.group(1) in ESTIMATORS:
            rows[m.group(1)] = list(m.groups()[1:])
    return rows


@pytest.fixture(scope="module")
def small_demo():
    lines: list[str] = []
    result = run_demo(out=lines.append, progress=False, **SMALL)
    return result, lines


# ----------------------------------------------------------------------------------- the demo
def test_demo_prints_all_four_estimators(small_demo):
    result, lines = small_demo
    rows = table_rows(lines)
    assert list(rows) == list(ESTIMATORS)
    header = next(line for line in lines if line.startswith("estimator"))
    for column in ("Tr(F)", "s.e.", "diag mean", "diag median", "diag max", "time(s)"):
        assert column in header
    assert result["training"]["epochs"] == SMALL["epochs"]
    assert not result["training"]["stopped_by_time"]
    assert result["n_parameters"] == 64 * 8 + 8 + 8 * 10 + 10
    for name in ESTIMATORS:
        numbers = result["estimators"][name]
        assert all(math.isfinite(v) for k, v in numbers.items() if k != "trace_se")
        assert math.isnan(numbers["trace_se"]) == (name in ("exact", "empirical"))
        assert (rows[name][1] == "—") == (name in ("exact", "empirical"))
        assert numbers["trace"] > 0
        assert numbers["diag_mean"] == pytest.approx(numbers["trace"] / result["n_parameters"])
        assert numbers["diag_median"] <= numbers["diag_max"]


def test_demo_exact_trace_matches_a_recomputation(small_demo):
    """The printed exact Tr(F) is torchfim.fisher(structure="trace") of the trained model."""
    result, lines = small_demo
    model, X = result["model"], result["inputs"]
    assert X.shape == (1797, 64)
    recomputed = float(torchfim.fisher(model, X, estimator="exact", structure="trace"))

    printed = float(table_rows(lines)["exact"][0])  # 4 significant digits
    assert printed == pytest.approx(recomputed, rel=1e-3)
    assert result["estimators"]["exact"]["trace"] == pytest.approx(recomputed, rel=1e-5)

    # The s.e. of a sampled row is the closed-form standard deviation of that estimator's Tr(F) over its labels.
    for name in ("score", "hessian"):
        variance = float(torchfim.fisher_variance(model, X, estimator=name, structure="trace"))
        assert result["estimators"][name]["trace_se"] == pytest.approx(variance**0.5, rel=1e-5)

    # The empirical row uses the true labels and nothing random.
    emp = float(torchfim.fisher(model, X, estimator="empirical", structure="trace",
                                targets=result["targets"]))
    assert result["estimators"]["empirical"]["trace"] == pytest.approx(emp, rel=1e-5)


def test_demo_is_reproducible_and_leaves_global_state_alone(small_demo):
    result, _ = small_demo
    threads = torch.get_num_threads()
    rng = torch.random.get_rng_state()
    again = run_demo(out=None, progress=False, **SMALL)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng)
    for name in ESTIMATORS:
        assert torch.equal(again["diags"][name], result["diags"][name])


def test_demo_with_more_labels_warns_of_nothing_and_draws_them_for_score_and_hessian_only(small_demo):
    """``torchfim demo --n-samples 2`` printed "n_samples=2 is ignored by estimator='exact'" and the same of
    'empirical': the demo passed its labels per input to the estimators that draw none (a review). Now it warns of
    nothing; exact and empirical are those of one label, and the score's s.e. is the one-label one over √2."""
    one, _ = small_demo
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        two = run_demo(out=None, progress=False, n_samples=2, **SMALL)
    assert [str(w.message) for w in caught] == []
    for name in ("exact", "empirical"):
        assert torch.equal(two["diags"][name], one["diags"][name])
    for name in ("score", "hessian"):
        ratio = two["estimators"][name]["trace_se"] / one["estimators"][name]["trace_se"]
        assert ratio == pytest.approx(2 ** -0.5, rel=1e-6)


def test_demo_rejects_bad_settings():
    with pytest.raises(ValueError, match="seconds"):
        run_demo(seconds=0, out=None, progress=False)
    with pytest.raises(ValueError, match="n_samples"):
        run_demo(n_samples=0, out=None, progress=False)


def test_demo_with_labels_that_do_not_fit_names_its_own_option(monkeypatch, capsys):
    """``torchfim demo --n-samples 100000`` was refused, after training, with the library's advice to draw fewer
    labels per call or pass smaller mini-batches, which the demo has no option for; it is now refused before
    training, naming --n-samples (n_samples to a caller of run_demo) and how many fit."""
    from torchfim import _memory

    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    fit = 2**30 // (2 * 8 * 1797 * 10)
    assert cli.main(["demo", "--n-samples", "100000", "--no-progress", *SMALL_ARGS]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "\n" not in err and captured.out == ""  # one line, nothing trained or printed first
    assert "--n-samples 100000: the demo draws that many labels for each of its 1797 digits" in err
    assert err.endswith(f"pass a smaller --n-samples (at most {fit:,} fit)")
    assert "mini-batch" not in err and "n_samples" not in err
    with pytest.raises(torchfim.TorchfimError, match=rf"^n_samples=100000: .* pass a smaller n_samples \(at most {fit:,}"):
        run_demo(n_samples=100_000, out=None, progress=False, **SMALL)


def test_format_table_aligns_columns():
    rows = {
        "exact": dict(trace=12.5, trace_se=math.nan, diag_mean=1e-3, diag_median=2e-4, diag_max=0.5, time=0.1),
        "hessian": dict(trace=1234567.0, trace_se=2.5, diag_mean=1.0, diag_median=1.0, diag_max=3.0, time=12.0),
    }
    lines = format_table(rows).splitlines()
    assert len(lines) == 4
    # every right-aligned column ends at the same place on every line
    assert len({len(line) for line in lines}) == 1
    assert list(table_rows(lines)) == ["exact", "hessian"]


# --------------------------------------------------------------------------- the command line
def run_cli(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("TORCHFIM_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "torchfim", *args],
        check=False, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env,
    )


def test_python_m_torchfim_demo_prints_the_table(small_demo):
    proc = run_cli("demo", *SMALL_ARGS, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    rows = table_rows(lines)
    assert list(rows) == list(ESTIMATORS), proc.stdout
    assert "Traceback" not in proc.stderr
    # Same settings, same numbers as the in-process run (all but the timing column).
    _, in_process = small_demo
    expected = table_rows(in_process)
    for name in ESTIMATORS:
        assert rows[name][:4] == expected[name][:4]


@pytest.mark.parametrize(
    "argv, needle",
    [
        ([], "choose a command"),
        (["bogus"], "invalid choice"),
        (["demo", "--seconds", "-1"], "--seconds"),
        (["demo", "--seconds", "abc"], "--seconds"),
        (["demo", "--seed", "x"], "--seed"),
        (["demo", "--hidden", "a,b"], "--hidden"),
        (["demo", "--bogus"], "unrecognized arguments"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(capsys, argv, needle):
    assert cli.main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert err.startswith("torchfim") and needle in err


def test_runtime_user_errors_are_one_line(monkeypatch, capsys):
    def broken(args):
        raise torchfim.TorchfimError("bad input;\nuse structure='diag'")

    import torchfim.demo as demo_module

    monkeypatch.setattr(demo_module, "main", broken)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "torchfim demo: error: bad input; use structure='diag'"


def test_explosion_is_under_reproduce_and_keeps_its_old_name(capsys):
    """``torchfim explosion`` is an alias of ``torchfim reproduce explosion``: the same options."""
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    alias = sub.choices["explosion"]
    reproduce = next(a for a in sub.choices["reproduce"]._actions if isinstance(a, argparse._SubParsersAction))
    canonical = reproduce.choices["explosion"]

    def options(p):
        return sorted(opt for a in p._actions for opt in a.option_strings)

    assert options(alias) == options(canonical) and "--resume" in options(alias)
    assert set(reproduce.choices) == {"soen-sun", "explosion"}
    # both names run the same command: the same one-line refusal of a bad --seeds
    for argv in (["explosion", "--seeds", "1"], ["reproduce", "explosion", "--seeds", "1"]):
        assert cli.main([*argv, "--out", "unused", "--no-progress"]) == 2
        assert "argument --seeds: expected a whole number ≥ 2" in capsys.readouterr().err


def test_cli_error_from_a_subprocess_has_no_traceback():
    proc = run_cli("demo", "--seconds", "nope", timeout=120)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------- data sets
def test_load_digits():
    X, y = load_digits()
    assert X.shape == (1797, 64) and X.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    X64, _ = load_digits(dtype=torch.float64)
    assert X64.dtype == torch.float64


def test_load_mnist1d_is_local_seeded_and_restores_global_rng(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything written to the working directory would show here
    random.seed(123)
    np.random.seed(123)
    before = (random.random(), np.random.rand())
    random.seed(123)
    np.random.seed(123)

    data = load_mnist1d(num_samples=200, seed=7)
    x_train, y_train, x_test, y_test = data
    assert x_train.shape == (160, 40) and x_test.shape == (40, 40)
    assert y_train.shape == (160,) and y_test.shape == (40,)
    assert x_train.dtype == torch.float32 and y_train.dtype == torch.int64
    assert set(y_train.tolist()) | set(y_test.tolist()) <= set(range(10))
    assert (random.random(), np.random.rand()) == before  # global RNGs untouched
    assert list(tmp_path.iterdir()) == []  # nothing cached on disk

    again = load_mnist1d(num_samples=200, seed=7)
    assert torch.equal(again.x_train, x_train) and torch.equal(again.y_test, y_test)


def test_loaders_name_the_extra_when_a_package_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    with pytest.raises(ImportError, match=re.escape("pip install 'torchfim[cli]'")):
        load_digits()
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(ImportError, match=re.escape("pip install 'torchfim[cli]'")):
        load_mnist1d(num_samples=20)


# ------------------------------------------------------------------------- scripts and README
def test_ci_runs_exactly_the_test_script():
    text = (ROOT / ".ci" / "run").read_text()
    commands = [
        line.strip() for line in text.splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert commands == ["exec bash scripts/test"]


@pytest.mark.parametrize("name", [".ci/run", "scripts/demo", "scripts/test"])
def test_scripts_are_executable_bash(name):
    path = ROOT / name
    assert path.stat().st_mode & stat.S_IXUSR, f"{name} is not executable"
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_scripts_use_the_venv_helper():
    subprocess.run(["bash", "-n", str(ROOT / "scripts" / "_venv.sh")], check=True)
    assert ".venv/bin/torchfim\" demo \"$@\"" in (ROOT / "scripts" / "demo").read_text().replace(
        "$TORCHFIM_VENV", ".venv")
    test = (ROOT / "scripts" / "test").read_text()
    assert '-m pytest -q -n "$workers" --dist loadfile "$@"' in test  # both of CI's cores, a file per worker
    assert 'workers="${TORCHFIM_TEST_WORKERS:-2}"' in test
    helper = (ROOT / "scripts" / "_venv.sh").read_text()
    assert "-c constraints.txt -e '.[dev]'" in helper


def test_readme_quick_start_names_both_scripts():
    readme = (ROOT / "README.md").read_text()
    assert "scripts/demo" in readme
    assert "scripts/test" in readme
    assert "torch==2.13.0" in readme


@pytest.mark.parametrize("prefix", ["torchfim report: ", "torchfim: ", ""])
def test_a_warning_names_the_command_once(prefix: str) -> None:
    """The report's own warnings read 'torchfim report: warning: torchfim report: …' (a review)."""
    from torchfim.cli import _warnings_in_words

    with _warnings_in_words("torchfim report"):
        said = warnings.formatwarning(f"{prefix}the finished steps are not kept", RuntimeWarning, "x.py", 1)
    assert said == "torchfim report: warning: the finished steps are not kept\n"
