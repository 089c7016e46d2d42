"""``torchfim report`` and ``run_report`` on the user's models and data: factories in a subprocess, a tensor
without targets, targets that are not labels, one output per input, a dict of keyword inputs with labels, a
wrapped model, large models (a smaller subset, then no Hessian variances), and the progress bar's total.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import report_fixtures
import torch
from report_fixtures import ROOT, _files
from torch import nn

import torchfim
from torchfim import report as report_mod
from torchfim.report import settings as report_settings

fast_figures = report_fixtures.fast_figures  # a fixture the tests take
user_dir = report_fixtures.user_dir  # a fixture the tests take


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
