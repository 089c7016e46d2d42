"""``torchfim report``: the default report, user factories, checkpoints, failures that leave nothing,
and ``--out`` folders whose other files are never touched, even when the run is killed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

import torchfim
from torchfim import cli
from torchfim import report as report_mod
from torchfim.datasets import load_digits
from torchfim.errors import TorchfimError
from torchfim.report import figures as report_figures
from torchfim.report import kept_steps
from torchfim.report import settings as report_settings
from torchfim.report.publish import PUBLISHING
from torchfim.report.wording import on_command_line
from torchfim.toy import mlp

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

def inputs():
    return data()[0]

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

def rows():
    return [[0.1, 0.2, 0.3, 0.4, 0.5]] * 10

def flat():
    return torch.randn(40)

def integers():
    return torch.randint(0, 5, (40, 5))
'''


def _stand_in_figures(R):
    names = [n for n in report_mod.FILES if n.endswith(".png")]
    if R["empirical"] is not None:
        names.append(report_mod.EMPIRICAL_FIGURE)
    return {n: PNG_MAGIC for n in names}


@pytest.fixture
def fast_figures(monkeypatch):
    """Stand-in figures (valid PNG headers, no drawing) for tests about everything but figures."""
    monkeypatch.setattr(report_figures, "draw", _stand_in_figures)


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
        check=False, cwd=user_dir, env=env, capture_output=True, text=True, timeout=300,
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


def test_targets_that_are_not_labels_are_said_once_and_without_contradiction(tmp_path, fast_figures):
    """Class 7 for three logits: the empirical Fisher is skipped with the reason, and the data line says so. It said
    "without targets (so no empirical Fisher). Note: the data's targets are not labels ..." (a trial)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(20, 4), torch.full((20,), 7)
    res = torchfim.report.run_report(model, (X, y), out=tmp_path / "r", progress=False, emit=None, max_block=0)
    assert res["results"]["empirical"] is None
    data_line = next(line for line in (res["out"] / "report.md").read_text().splitlines()
                     if line.startswith("- **Data:**"))
    assert "with targets, but the data's targets are not labels of the categorical family" in data_line
    assert "without targets" not in data_line and data_line.count("not labels") == 1


def test_run_report_api_with_one_output_per_input(tmp_path, fast_figures):
    """A binary classifier returning ``(batch,)`` logits, with its targets: refused before as not ``(batch, C)``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1), nn.Flatten(0))
    X, y = torch.randn(20, 4), (torch.rand(20) > 0.5).float()
    R = torchfim.report.run_report(model, (X, y), family="bernoulli", out=tmp_path / "r", progress=False,
                                   emit=None)["results"]
    assert R["empirical"] is not None
    assert R["trace"]["exact"] == pytest.approx(
        float(torchfim.fisher(model, X, family="bernoulli", structure="trace")), rel=1e-6)


class _KeywordModel(nn.Module):
    """Token ids and an attention mask by keyword, outputs in ``.logits``: as a Hugging Face classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> object:
        h = torch.tanh(self.embed(input_ids)) * attention_mask.unsqueeze(-1)
        return type("Output", (), {"logits": self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))})()


def test_run_report_api_with_a_dict_of_keyword_inputs_and_labels(tmp_path):
    """What a tokenizer returns, with ``labels``: the report's numbers are the library's on that dict (before:
    refused, "the factory returned a dict")."""
    torch.manual_seed(0)
    model = _KeywordModel()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 7, (20, 5), generator=g)
    mask = (torch.arange(5) < torch.randint(2, 6, (20, 1), generator=g)).long()
    y = torch.randint(0, 3, (20,), generator=g)
    batch = {"input_ids": ids, "attention_mask": mask}
    res = torchfim.report.run_report(model, {**batch, "labels": y}, out=tmp_path / "r", progress=False, emit=None)
    R = res["results"]
    assert R["data"]["input_shape"] == {"input_ids": [5], "attention_mask": [5]} and R["data"]["n_inputs"] == 20
    assert R["trace"]["exact"] == pytest.approx(float(torchfim.fisher(model, batch, structure="trace")), rel=1e-6)
    empirical = torchfim.fisher(model, batch, estimator="empirical", targets=y)
    assert R["empirical"]["trace"] == pytest.approx(float(empirical.sum()), rel=1e-6)
    assert "input_ids (5,), attention_mask (5,)" in (res["out"] / "report.md").read_text()


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
    # the command line's words and every family (before: "use family='categorical'", 4 of the 7 listed)
    "family mismatch, the fix": (["--model", "umod:make", "--data", "umod:data", "--family", "bernoulli"],
                                 (("use --family categorical for 3 exclusive classes, or, for 3 independent binary "
                                   "labels per input, return the outputs as (batch, 3, 1)"),
                                  ("(or pass the --family that matches the outputs, one of bernoulli, categorical, "
                                   "gamma, gaussian, heteroscedastic_gaussian, matrix_fisher, poisson;"))),
    # before: "inputs of shape [] (... mat1 and mat2 shapes cannot be multiplied ...)"
    "list of lists": (["--model", "umod:make", "--data", "umod:rows"],
                      "the factory returned a list of lists of numbers (10 items); return a tensor"),
    "1-D tensor": (["--model", "umod:make", "--data", "umod:flat"],
                   "40 inputs, each one number (a 1-D tensor of 40 values"),
    "1-D tensor, the fix": (["--model", "umod:make", "--data", "umod:flat"], "pass x.unsqueeze(1)"),
    # before: torch's dtype error alone
    "integer inputs": (["--model", "umod:make", "--data", "umod:integers"],
                       "failed on integer inputs ((8, 5) torch.int64) with torch.float32 parameters; pass x.float()"),
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
    assert all(part in err for part in ((expected,) if isinstance(expected, str) else expected)), err
    assert "Traceback" not in captured.err
    assert not (user_dir / "rep").exists()
    assert not _leftovers(user_dir)


def test_a_failure_while_writing_leaves_the_earlier_report(user_dir, capsys, monkeypatch, fast_figures):
    import torchfim._io as io_mod

    assert cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                     "--max-block", "0", "--no-progress", "--out", "rep"]) == 0
    before = {p.name: p.read_bytes() for p in (user_dir / "rep").iterdir()}
    calls = []
    real = io_mod._write_temporary

    def failing(path, write, binary):
        if Path(path).parent.name != kept_steps.FOLDER:  # a report file (the steps are kept as they finish)
            calls.append(path)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
        return real(path, write, binary)

    monkeypatch.setattr(io_mod, "_write_temporary", failing)
    status = cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                       "--max-block", "0", "--seed", "1", "--no-progress", "--out", "rep"])
    assert status == 2 and "No space left" in capsys.readouterr().err
    assert len(calls) == 3
    # no temporary file left; the finished steps stay kept for the next run
    assert {p.name: p.read_bytes() for p in (user_dir / "rep").iterdir() if p.name != kept_steps.FOLDER} == before
    assert (user_dir / "rep" / kept_steps.FOLDER).is_dir()
    # and a fresh --out gets no file of the report, only its kept steps
    calls.clear()
    assert cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                     "--max-block", "0", "--no-progress", "--out", "fresh/sub"]) == 2
    assert [p.name for p in (user_dir / "fresh" / "sub").iterdir()] == [kept_steps.FOLDER]
    assert not _leftovers(user_dir) and not _leftovers(user_dir / "fresh" / "sub" / kept_steps.FOLDER)


def test_a_model_whose_closed_forms_would_not_fit_is_refused_before_computing(monkeypatch):
    """10,000 classes: the closed forms pull back the 10,000 output numbers of an input together. With 256
    MiB or 1 GiB free, ``score_only=False`` (``--mode full``) refuses before its first measurement (the
    library is never called), naming the size and the score-only mode; with the memory it needs, the same
    check lets it through to the library."""
    from torchfim import _memory

    model = nn.Linear(4, 10_000)
    X = torch.randn(8, 4)
    called = []

    def first_measurement(*args, **kwargs):
        called.append(True)
        raise RuntimeError("the report's first measurement")

    monkeypatch.setattr(torchfim, "fisher", first_measurement)
    # One input: the 10⁴ × 10⁴ unit vectors and 10⁴ pull-backs of the layer's 10⁴ outputs, 2·10⁸ numbers
    # (1.49 GiB in float32 with a working copy), as the library counts them. With 1 GiB free, the unit
    # vectors alone (0.745 GiB) would pass, and the library would refuse only after the exact parts.
    for free, shown in ((2**28, "0\\.2"), (2**30, "1\\.0")):
        monkeypatch.setattr(_memory, "available_bytes", lambda device, free=free: free)
        with pytest.raises(TorchfimError, match=rf"beyond the full report's reach.*all 10,000 output numbers of "
                                                rf"an input together, about 1\.49 GiB per input with {shown} GiB.*"
                                                r"pass score_only=True \(or score_only=None"):
            report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, score_only=False)
    assert not called
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 8 * 2**30)
    with pytest.raises(RuntimeError, match="first measurement"):  # full whatever it takes: no test of time
        report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, score_only=False)
    assert called


def test_large_models_get_a_smaller_subset_then_no_hessian_variances(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))  # P = 43
    X, y = torch.randn(64, 4), torch.randint(0, 3, (64,))
    monkeypatch.setattr(report_settings, "HESSIAN_BUDGET", 43 * 20)  # room for 20 inputs
    R = report_mod.compute_report(model, report_mod.Data(X, y, "test"), progress=False)
    assert R["data"]["variance_inputs"] == 20 and "reduced from 64 to 20" in R["data"]["variance_inputs_note"]
    monkeypatch.setattr(report_settings, "HESSIAN_BUDGET", 43 * 4)  # below the minimum subset: skip Î2
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


@pytest.mark.parametrize("hessian,targets", [(True, True), (False, False)])
def test_the_progress_bar_ends_at_its_total(monkeypatch, hessian, targets):
    """Every step the report takes is counted in the bar's total, with and without Î2 and targets."""
    from torchfim.report import measure

    seen: list[tuple[int, int]] = []
    init, done, close = measure.Steps.__init__, measure.Steps.done, measure.Steps.close

    def counting_init(self, total, progress, kept=None):
        init(self, total, progress, kept)
        self.total, self.count = total, 0

    def counting_done(self):
        self.count += 1
        done(self)

    def recording_close(self):
        seen.append((self.count, self.total))
        close(self)

    monkeypatch.setattr(measure.Steps, "__init__", counting_init)
    monkeypatch.setattr(measure.Steps, "done", counting_done)
    monkeypatch.setattr(measure.Steps, "close", recording_close)
    if not hessian:
        monkeypatch.setattr(report_settings, "HESSIAN_BUDGET", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    R = report_mod.compute_report(model, report_mod.Data(X, y if targets else None, "test"), progress=False)
    assert (R["trace"]["subset"]["var_hessian"] is not None) == hessian
    assert len(seen) == 1 and seen[0][0] == seen[0][1] > 0, seen


# ----------------------------------------------- --out holds other files (issue 11): never touched
SMALL = ["--model", "umod:make", "--variance-inputs", "8", "--max-block", "0", "--no-progress"]
USER_FILES = {"notes.txt": b"keep me\n", "thesis.tex": b"\\documentclass{article}\n", "runs/a.json": b"{}\n"}
# The files of a full report of data with targets: every name of REPORT_FILES but the score-only figure.
REPORT_NAMES = set(report_settings.FILES) | {report_settings.EMPIRICAL_FIGURE}
assert REPORT_NAMES == set(report_settings.REPORT_FILES) - {report_settings.SCORE_ONLY_FIGURE}


def _add_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _user_files_intact(folder: Path) -> bool:
    return all((folder / name).read_bytes() == data for name, data in USER_FILES.items())


def _report_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name in REPORT_NAMES}


def test_user_files_beside_an_earlier_report_are_kept(user_dir, fast_figures):
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    _add_user_files(user_dir / "rep")
    earlier = _report_bytes(user_dir / "rep")
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]) == 0
    assert _user_files_intact(user_dir / "rep")
    now = _report_bytes(user_dir / "rep")
    assert set(now) == set(earlier) == REPORT_NAMES
    assert json.loads(now["report.json"])["seed"] == 1 and now["report.md"] != earlier["report.md"]
    assert {p.name for p in (user_dir / "rep").iterdir()} == REPORT_NAMES | {"notes.txt", "thesis.tex", "runs"}


def test_a_copied_report_is_replaced_and_its_stale_figure_removed(user_dir, fast_figures):
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    (user_dir / "mine").mkdir()
    for p in (user_dir / "rep").iterdir():  # a copied report, in a folder of the user's files
        (user_dir / "mine" / p.name).write_bytes(p.read_bytes())
    _add_user_files(user_dir / "mine")
    # data without targets: no empirical figure in the new report, so the copied one goes
    assert cli.main(["report", *SMALL, "--data", "umod:inputs", "--out", "mine"]) == 0
    assert _user_files_intact(user_dir / "mine")
    assert set(_report_bytes(user_dir / "mine")) == set(report_mod.FILES)
    assert json.loads((user_dir / "mine" / "report.json").read_text())["empirical"] is None


def test_a_folder_of_other_files_gets_the_report_beside_them(user_dir, fast_figures):
    (user_dir / "mine").mkdir()
    _add_user_files(user_dir / "mine")
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "mine"]) == 0
    assert _user_files_intact(user_dir / "mine") and set(_report_bytes(user_dir / "mine")) == REPORT_NAMES


@pytest.mark.parametrize("foreign", ["model.pt", "report.json", "overview.png"])
def test_files_with_a_reports_names_are_refused_before_computing(user_dir, capsys, monkeypatch, foreign):
    from torchfim.report import run as run_mod

    def never(*args, **kwargs):
        raise AssertionError("the report was computed although --out was refused")

    monkeypatch.setattr(run_mod, "compute_report", never)
    (user_dir / "mine").mkdir()
    _add_user_files(user_dir / "mine")
    (user_dir / "mine" / foreign).write_bytes(b"the user's own file")
    status = cli.main(["report", *SMALL, "--data", "umod:data", "--out", "mine"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and err.startswith("torchfim report: error: --out mine holds " + foreign)
    assert (user_dir / "mine" / foreign).read_bytes() == b"the user's own file"
    assert _user_files_intact(user_dir / "mine")
    assert {p.name for p in (user_dir / "mine").iterdir()} == {foreign, "notes.txt", "thesis.tex", "runs"}


def test_out_dot_writes_into_the_working_directory(user_dir, fast_figures):
    _add_user_files(user_dir)
    module = (user_dir / "umod.py").read_bytes()
    for seed in ("0", "1"):  # a report, then a new one over it
        assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", seed, "--out", "."]) == 0
        assert json.loads((user_dir / "report.json").read_text())["seed"] == int(seed)
    assert _user_files_intact(user_dir) and (user_dir / "umod.py").read_bytes() == module
    assert set(_report_bytes(user_dir)) == REPORT_NAMES and not _leftovers(user_dir)


def test_at_every_point_a_kill_could_hit_the_folder_is_complete(user_dir, monkeypatch, fast_figures):
    """A kill only ever sees the file system as it is between two renames: check each such state."""
    import torchfim._io as io_mod

    rep = user_dir / "rep"
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    _add_user_files(rep)
    earlier = _report_bytes(rep)
    states: list[dict[str, bytes]] = []
    real_replace = io_mod.os.replace

    def replace(src, dst):
        if Path(dst).resolve().parent == rep and Path(dst).name != PUBLISHING:  # between two of the report's files
            assert rep.is_dir() and _user_files_intact(rep)
            states.append(_report_bytes(rep))
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]) == 0
    monkeypatch.undo()
    final = _report_bytes(rep)
    states.append(final)
    assert len(states) == len(REPORT_NAMES) + 1 and states[0] == earlier
    for state in states:
        assert set(state) == REPORT_NAMES  # no report file is ever missing ...
        for name, data in state.items():  # ... or anything but the earlier or the new one, complete
            assert data in (earlier[name], final[name]), name
    assert all(state["report.json"] == earlier["report.json"] for state in states[:-1])  # written last
    assert _user_files_intact(rep)


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import torchfim.report.figures as figures
from torchfim import cli

figures.draw = lambda R: {{n: {png!r} for n in {names!r}}}
rep, real, count = Path("rep").resolve(), os.replace, [0]

def replace(src, dst):
    if Path(dst).resolve().parent == rep and Path(dst).name != {publishing!r}:
        count[0] += 1
        if count[0] == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

os.replace = replace
sys.exit(cli.main({argv!r}))
"""


def test_sigkill_while_publishing_leaves_every_file_whole(user_dir, fast_figures):
    rep = user_dir / "rep"
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    _add_user_files(rep)
    earlier = _report_bytes(rep)
    argv = ["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]
    new_png = PNG_MAGIC + b"new"
    script = KILL_SCRIPT.format(names=sorted(n for n in REPORT_NAMES if n.endswith(".png")), png=new_png,
                                kill_at=5, argv=argv, publishing=PUBLISHING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=user_dir, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert rep.is_dir() and _user_files_intact(rep)
    now = _report_bytes(rep)
    assert set(now) == REPORT_NAMES
    # killed before the 5th rename: report.md, model.pt and two figures are new, the rest as they were
    assert now["report.json"] == earlier["report.json"]
    assert now["report.md"] != earlier["report.md"] and now["report.md"].decode().endswith("\n")
    assert sum(data == new_png for data in now.values()) == 2
    assert all(now[n] in (earlier[n], new_png) for n in now if n.endswith(".png"))
    torch.load(rep / "model.pt", weights_only=True)
    # the temporary files of the killed run are removed by the next run, which completes the report
    assert [p.name for p in rep.iterdir() if p.name.endswith(".tmp")]
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]) == 0
    assert not [p.name for p in rep.iterdir() if p.name.endswith(".tmp")] and _user_files_intact(rep)
    assert json.loads((rep / "report.json").read_text())["seed"] == 1



def test_the_hessian_estimators_labels_from_a_subset_are_compared_like_for_like():
    """Î2's labels per input come from a subset, extrapolated by m/n; a CLI trial's 20 of 64 heavy-tailed inputs put
    them below Î1's exact ones while Î1 extrapolated the same way needed fewer still (the ranking flipped). The
    summary gives Î1's k from the same subset (the library's fisher_variance on it, scaled by m/n), and says so
    where the subset puts Î1's variance far from its exact value."""
    from torchfim.report.markdown import _like_for_like, markdown

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    X = torch.randn(40, 4, dtype=torch.float64)
    R = report_mod.compute_report(model, report_mod.Data(X, None, "test"), variance_inputs=10, progress=False)
    T, subset = R["trace"], X[R["data"]["variance_subset_indices"]]
    var_sub = T["subset"]["var_score"]
    assert var_sub == pytest.approx(float(torchfim.fisher_variance(model, subset, structure="trace")), rel=1e-6)
    want = max(1, math.ceil(var_sub * 10 / 40 / (R["rel_error"] * T["exact"]) ** 2))
    assert T["samples_needed_score_from_subset"] == want
    assert T["subset_extrapolation_ratio"] == pytest.approx(var_sub * 10 / 40 / T["var1_score_all_inputs"])
    assert f"Î1's extrapolated the same way is k = {want}, the like-for-like comparison" in markdown(R)
    skewed = {**T, "subset_extrapolation_ratio": 0.18}
    assert "The subset is not representative here: it puts Î1's variance at 0.18×" in _like_for_like(skewed, R["data"])
    assert _like_for_like(T, {**R["data"], "variance_inputs": 40}) == ""  # no subset: nothing extrapolated


def test_figures_of_many_layers_tell_them_apart():
    """A CLI trial's 52-tensor model: the legends named 12 layers without saying that 40 more were drawn, in ten
    colours that repeated; the overview's 52 names overlapped. Each layer now has its own colour, the legend says
    how many it leaves out, and a crowded overview panel numbers the layers as the tables order them."""
    from matplotlib.figure import Figure

    from torchfim.report import figures

    spectra = {f"block{j}.weight": [1.0 / (j + 1), 0.5 / (j + 1)] for j in range(30)}
    ax = Figure().add_subplot(1, 1, 1)
    figures._ax_spectrum(ax, {"spectra": spectra, "max_block": 100})
    colours = {tuple(line.get_color()) if not isinstance(line.get_color(), str) else line.get_color()
               for line in ax.get_lines()}
    assert len(colours) == 30
    texts = [t.get_text() for t in ax.get_legend().get_texts()]
    assert len(texts) == figures.LEGEND_LAYERS + 1 and texts[-1] == "+ 18 more layers, colours in layer order"
    names = list(spectra)
    crowded = Figure().add_subplot(1, 1, 1)
    figures._columns(crowded, names, compact=True, first=1)
    labels = [t.get_text() for t in crowded.get_xticklabels()]
    assert labels[0] == "1" and "block" not in "".join(labels) and "layer number" in crowded.get_xlabel()
    named = Figure().add_subplot(1, 1, 1)
    figures._columns(named, names, compact=False)
    assert [t.get_text() for t in named.get_xticklabels()] == names


def _legend_of(draw, R: dict) -> tuple[list[str], bool]:
    """The legend's texts of the panel ``draw`` draws from ``R``, and whether the legend stands right of the axes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax, R)
    fig.canvas.draw()
    legend = ax.get_legend()
    beside = legend.get_window_extent().x0 >= ax.get_window_extent().x1
    return [t.get_text() for t in legend.get_texts()], beside


def test_a_legend_counts_the_layers_it_draws_and_stands_beside_a_crowded_panel():
    """A review: "+ N more layers" counted the layers a panel leaves out (a shift that softmax ignores, zero to
    precision; a block whose eigenvalues are all 0), and each one left out before the twelfth took a name's place;
    the legend of 40 spectra lay over them. It now names the first 12 drawn, counts only the others drawn, and with
    more than 6 layers drawn stands right of the axes."""
    from torchfim.report import figures

    blocks = [f"block{j}.weight" for j in range(20)]
    names = ["shift", *blocks, "dead"]
    layers = [{"name": n, "zero_to_precision": n == "shift"} for n in names]
    spectra = {"shift": [1e-3], **{b: [1.0 / (j + 1), 0.5 / (j + 1)] for j, b in enumerate(blocks)}, "dead": [0.0]}
    texts, beside = _legend_of(figures._ax_spectrum, {"spectra": spectra, "max_block": 100, "layers": layers})
    assert texts == [f"{b} (2)" for b in blocks[:12]] + ["+ 8 more layers, colours in layer order"] and beside
    points = {n: {"exact": [0.0 if n == "dead" else 1e-3 * (j + 1)] * 2, "empirical": [2e-3 * (j + 1)] * 2}
              for j, n in enumerate(names)}
    R = {"empirical": {"points": points, "trace_ratio": 1.0, "cosine_diag": 1.0}, "layers": layers}
    texts, beside = _legend_of(figures._ax_empirical, R)
    assert texts == [*blocks[:12], "+ 8 more layers, colours in layer order", "y = x"] and beside
    few = {"spectra": {b: spectra[b] for b in blocks[:6]}, "max_block": 100, "layers": layers}
    texts, beside = _legend_of(figures._ax_spectrum, few)  # the default report's six: in the panel, where it fits
    assert texts == [f"{b} (2)" for b in blocks[:6]] and not beside


class _Shifted(nn.Module):
    """Logits plus one shift shared by every class: softmax ignores it, so its Fisher is 0 (in exact arithmetic)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.shift = nn.Linear(4, 5), nn.Parameter(torch.tensor([0.3]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) + self.shift


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_layer_whose_fisher_is_zero_to_precision_is_said_so_not_reported_as_data(dtype):
    """A CLI trial's BERT key bias (softmax ignores it) came out 3.6e-26 in float32, with 3e9 labels per input, a
    full rank and a condition number reported as data. A layer whose Tr is at most ε²·Tr(F) is flagged, drawn as 0,
    and has no labels needed or spectrum; the others keep theirs."""
    from torchfim.report.markdown import markdown

    torch.manual_seed(0)
    model = _Shifted().to(dtype)
    R = report_mod.compute_report(model, report_mod.Data(torch.randn(32, 4, dtype=dtype), None, "test"),
                                  progress=False)
    by_name = {layer["name"]: layer for layer in R["layers"]}
    shift = by_name["shift"]
    assert shift["zero_to_precision"] and shift["trace_exact"] <= torch.finfo(dtype).eps ** 2 * R["trace"]["exact"]
    assert shift["samples_needed"] == {"score": None, "hessian": None} and shift["spectrum"] is None
    assert not by_name["lin.weight"]["zero_to_precision"] and by_name["lin.weight"]["spectrum"] is not None
    text = markdown(R)
    assert f"Zero to the model's {str(dtype)[6:]} precision" in text and "`shift`" in text
    assert "| `shift` | 1 | zero to precision |" in text
    # nor is it a layer where Î2 "wins" (its variance 0 against Î1's rounding-sized one): not counted, and named
    assert "Per layer, Î2 wins on 2 of 2 (" in text and "; `shift`, whose Fisher is zero to precision, not counted." in text
    from torchfim.report.terminal import summary_table

    row = next(line for line in summary_table(R).splitlines() if line.startswith("shift "))
    assert "hessian" not in row and "score" not in row  # its "lower Var Tr" cell is "–", as its k and λ_max


def test_frozen_parameters_are_said_to_be_left_out():
    """A CLI trial: a model with a frozen layer was reported as "324 trainable parameters", the 192 frozen ones
    never named, so "whole model" read as all of it."""
    from torchfim.report.markdown import markdown

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    R = report_mod.compute_report(model, report_mod.Data(torch.randn(16, 4), None, "test"), progress=False)
    assert R["model"]["n_frozen_parameters"] == 30 and R["model"]["n_parameters"] == 21
    assert "21 trainable parameters in 2 parameter tensors (\"layers\" below) (30 frozen parameters left out" in \
        markdown(R)
    model[0].requires_grad_(True)
    R = report_mod.compute_report(model, report_mod.Data(torch.randn(16, 4), None, "test"), progress=False)
    assert R["model"]["n_frozen_parameters"] == 0 and "frozen parameters left out" not in markdown(R)


@pytest.mark.parametrize("wrap", ["compile", "data_parallel"])
def test_a_wrapped_model_gives_the_report_of_the_model_inside(wrap):
    """torch.compile's and DataParallel's wrappers: the report looked its results up by the wrapper's names
    (``_orig_mod.``/``module.``) and raised a bare KeyError (a user trial); now they are the inner model's."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    X = torch.randn(16, 4, generator=torch.Generator().manual_seed(1))
    wrapped = torch.compile(model) if wrap == "compile" else nn.DataParallel(model)
    got = report_mod.compute_report(wrapped, report_mod.Data(X, None, "test"), progress=False, score_only=False)
    want = report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, score_only=False)
    assert [layer["name"] for layer in got["layers"]] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert got["trace"]["exact"] == want["trace"]["exact"]


def test_a_max_block_whose_block_would_not_fit_is_refused_before_any_work(monkeypatch):
    """It failed after minutes of work, with the Python API's advice (structure='diag', requires_grad_)."""
    from torchfim.report import compute

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    monkeypatch.setattr(compute, "fits_in_memory", lambda n, dtype, device: (n <= 15**2, n * 16 / 2**30, 1.0))
    monkeypatch.setattr(compute, "measure_trace", lambda *a, **k: pytest.fail("measured before the refusal"))
    for words, (said, other) in ((on_command_line, ("--max-block", "max_block=")), (nullcontext, ("max_block", "--"))):
        # the command line's flag or the API's keyword, not both (before: "--max-block 1,000 (max_block=)")
        with pytest.raises(TorchfimError, match=rf"^{said}[ =]1000 lets in layer '0.weight' of 20 parameters.*pass a "
                                                rf"{said} below 20") as refused, words():
            report_mod.compute_report(model, report_mod.Data(torch.randn(8, 4), None, "test"), max_block=1000,
                                      progress=False, score_only=False)
        assert other not in str(refused.value)


def test_data_mistakes_are_named_as_the_library_names_them():
    """One input given 1-D was blamed on --family (its outputs read as (3, 1)); a tuple of columns (inputs, targets,
    weights) on the items' shapes. Mini-batches in a tuple are still read as mini-batches."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(TorchfimError, match=r"outputs of shape \(3,\) for 1-D inputs.*x\.unsqueeze\(0\)"):
        report_mod.compute_report(model, report_mod.as_data(torch.randn(8), "test"), progress=False)
    triple = (torch.randn(16, 8), torch.randint(0, 3, (16,)), torch.ones(16))
    with pytest.raises(TorchfimError, match=r"a tuple of 3 tensors of 16 rows each; return the inputs, or an "
                                            r"\(inputs, targets\) pair"):
        report_mod.as_data(triple, "test")
    batches = tuple(torch.randn(4, 8) for _ in range(3))
    assert report_mod.as_data(batches, "test").n == 12
