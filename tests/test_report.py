"""``torchfim report``: the default report, user factories, checkpoints, and failures that leave nothing."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torchfim
from torchfim import cli
from torchfim import report as report_mod
from torchfim.datasets import load_digits
from torchfim.demo import build_model

ROOT = Path(__file__).resolve().parents[1]

# A tiny default: a 64-8-10 MLP trained 2 epochs (deterministic: the epoch cap ends training),
# variances on 24 of the digits.
TINY = ["--hidden", "8", "--epochs", "2", "--variance-inputs", "24", "--no-progress"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

USER_MODULE = '''
import torch
from torch import nn

def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))

def make_other():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))

def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(40, 5, generator=g), torch.randint(0, 3, (40,), generator=g)

class Pairs(torch.utils.data.Dataset):
    def __len__(self):
        return 30
    def __getitem__(self, i):
        g = torch.Generator().manual_seed(i)
        return torch.randn(5, generator=g), i % 3

def dataset():
    return Pairs()

def empty():
    return torch.zeros(0, 5)

def broken():
    raise RuntimeError("no data today")

def not_a_model():
    return 42
'''


@pytest.fixture
def fast_figures(monkeypatch):
    """Stand-in figures (valid PNG headers, no drawing) for tests about everything but figures."""
    from torchfim import report_render

    def figures(R):
        names = [n for n in report_mod.FILES if n.endswith(".png")]
        if R["empirical"] is not None:
            names.append(report_mod.EMPIRICAL_FIGURE)
        return {n: PNG_MAGIC for n in names}

    monkeypatch.setattr(report_render, "figures", figures)


def _files(out: Path) -> set[str]:
    return {p.name for p in out.iterdir()}


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.is_dir()]


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
    model = build_model(hidden=hidden)
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


def test_report_md_describes_every_figure_with_numbers(default_report):
    out, R, _ = default_report
    md = (out / "report.md").read_text()
    for name in R["files"]:
        if name.endswith(".png"):
            assert f"]({name})" in md, name
    for section in ("Tr(F) per layer", "Î1 vs Î2", "relative error", "Eigenvalues", "Empirical vs true"):
        assert section in md
    from torchfim.report_render import fmt

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


# -------------------------------------------------------------------------------- user factories
@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    (tmp_path / "umod.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("umod", None)
    yield tmp_path
    sys.modules.pop("umod", None)


def test_user_model_and_dataset_from_factories_in_a_subprocess(user_dir):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "torchfim", "report", "--model", "umod:make", "--data", "umod:dataset",
         "--variance-inputs", "16", "--no-progress", "--out", "rep"],
        cwd=user_dir, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    out = user_dir / "rep"
    assert _files(out) == set(report_mod.FILES) | {report_mod.EMPIRICAL_FIGURE}
    R = json.loads((out / "report.json").read_text())
    assert R["data"]["n_inputs"] == 30 and R["data"]["has_targets"]
    assert R["data"]["variance_inputs"] == 16
    import umod

    model = umod.make()
    X = torch.stack([umod.Pairs()[i][0] for i in range(30)])
    assert R["trace"]["exact"] == pytest.approx(float(torchfim.fisher(model, X, structure="trace")), rel=1e-6)
    assert R["command"].startswith("torchfim report --model umod:make --data umod:dataset")


def test_run_report_api_with_a_tensor_and_no_targets(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    X = torch.randn(20, 4)
    res = torchfim.report.run_report(model, X, family="gaussian", out=tmp_path / "r", progress=False,
                                     emit=None, max_block=10)
    out = res["out"]
    assert _files(out) == set(report_mod.FILES)  # no empirical figure without targets
    R = res["results"]
    assert R["empirical"] is None and R["family"] == "gaussian"
    assert R["trace"]["exact"] == pytest.approx(
        float(torchfim.fisher(model, X, family="gaussian", structure="trace")), rel=1e-6)
    # layers over max_block are listed as skipped, not computed
    assert [layer["spectrum"] is None for layer in R["layers"]] == [True, False, False, False]
    assert "skipped" in (out / "report.md").read_text()


# ------------------------------------------------------------------- bad input: one line, nothing left
def _bad_checkpoint(tmp: Path) -> str:
    torch.save(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).state_dict(), tmp / "other.pt")
    return "other.pt"


BAD = {
    "unimportable module": (["--model", "nosuchmodule:make", "--data", "umod:data"], "cannot import module"),
    "missing factory": (["--model", "umod:nope", "--data", "umod:data"], "has no attribute"),
    "not MODULE:FACTORY": (["--model", "umod", "--data", "umod:data"], "MODULE:FACTORY"),
    "factory raises": (["--model", "umod:make", "--data", "umod:broken"], "no data today"),
    "not a module": (["--model", "umod:not_a_model", "--data", "umod:data"], "not a torch.nn.Module"),
    "checkpoint mismatch": (["--model", "umod:make", "--data", "umod:data", "--checkpoint", _bad_checkpoint],
                            "does not match the model"),
    "missing checkpoint": (["--model", "umod:make", "--data", "umod:data", "--checkpoint", "none.pt"],
                           "no such file"),
    "family mismatch": (["--model", "umod:make", "--data", "umod:data", "--family", "bernoulli"],
                        "do not fit --family bernoulli"),
    "empty data": (["--model", "umod:make", "--data", "umod:empty"], "empty"),
    "model without data": (["--model", "umod:make"], "--data"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_no_report(case, user_dir, capsys):
    args, expected = BAD[case]
    args = [a(user_dir) if callable(a) else a for a in args]
    status = cli.main(["report", *args, "--no-progress", "--out", "rep"])
    captured = capsys.readouterr()
    assert status == 2
    err = captured.err.strip()
    assert err.startswith("torchfim report: error:") and "\n" not in err, err
    assert expected in err
    assert "Traceback" not in captured.err
    assert not (user_dir / "rep").exists()
    assert not _leftovers(user_dir)


def test_checkpoint_of_a_whole_module_is_accepted(user_dir, capsys, fast_figures):
    import umod

    model = umod.make()
    with torch.no_grad():
        model[0].weight.mul_(2)
    torch.save(model, user_dir / "whole.pt")
    status = cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--checkpoint", "whole.pt",
                       "--variance-inputs", "8", "--max-block", "0", "--no-progress", "--out", "rep"])
    assert status == 0, capsys.readouterr().err
    R = json.loads((user_dir / "rep" / "report.json").read_text())
    X, _ = umod.data()
    assert R["trace"]["exact"] == pytest.approx(float(torchfim.fisher(model, X, structure="trace")), rel=1e-6)


def test_a_failure_while_writing_leaves_the_earlier_report(user_dir, capsys, monkeypatch, fast_figures):
    import torchfim._io as io_mod

    assert cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                     "--max-block", "0", "--no-progress", "--out", "rep"]) == 0
    before = {p.name: p.read_bytes() for p in (user_dir / "rep").iterdir()}
    calls = []
    real = io_mod.write_bytes

    def failing(path, data):
        calls.append(path)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(io_mod, "write_bytes", failing)
    status = cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                       "--max-block", "0", "--seed", "1", "--no-progress", "--out", "rep"])
    assert status == 2 and "No space left" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (user_dir / "rep").iterdir()} == before
    assert not _leftovers(user_dir)
    # and a fresh --out gets nothing at all
    calls.clear()
    assert cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                     "--max-block", "0", "--no-progress", "--out", "fresh"]) == 2
    assert not (user_dir / "fresh").exists() and not _leftovers(user_dir)


def test_out_that_is_not_a_report_is_refused(user_dir, capsys):
    (user_dir / "mine").mkdir()
    (user_dir / "mine" / "notes.txt").write_text("keep me")
    status = cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--out", "mine"])
    assert status == 2 and "not a torchfim report" in capsys.readouterr().err
    assert _files(user_dir / "mine") == {"notes.txt"}


def test_large_models_get_a_smaller_subset_then_no_hessian_variances(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # P = 43
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    monkeypatch.setattr(report_mod, "HESSIAN_BUDGET", 43 * 20)  # room for 20 inputs
    R = report_mod.compute_report(model, report_mod.Data(X, y, "test"), progress=False)
    assert R["data"]["variance_inputs"] == 20 and "reduced from 64 to 20" in R["data"]["variance_inputs_note"]
    monkeypatch.setattr(report_mod, "HESSIAN_BUDGET", 43 * 4)  # below the minimum subset: skip Î2
    res = report_mod.run_report(model, (X, y), out=tmp_path / "r", progress=False, emit=None)
    R = res["results"]
    assert R["data"]["hessian_variances"] is False and R["data"]["variance_inputs"] == 64
    assert R["trace"]["subset"]["var_hessian"] is None and R["trace"]["subset"]["var_score"] > 0
    assert all(layer["samples_needed"]["hessian"] is None for layer in R["layers"])
    md = (tmp_path / "r" / "report.md").read_text()
    assert "variances were skipped" in md
    # an explicit --variance-inputs is obeyed whatever the size
    R = report_mod.compute_report(model, report_mod.Data(X, None, "test"), variance_inputs=10, progress=False)
    assert R["data"]["variance_inputs"] == 10 and R["trace"]["subset"]["var_hessian"] is not None
