"""The full report's time estimate counts the Hessian estimator's sweep (:mod:`torchfim.report.cost`).

The estimate behind ``--mode auto`` counted the pull-backs and the output Gram matrices, and left out the Î2
variances' sweep over the output-Hessian diagonals (one forward-over-forward pass per curved parameter entry and
input of the subset), taking it as bounded by ``HESSIAN_BUDGET``: that bounds its passes, not its time. On a tiny
2-layer BERT classifier (5,891 parameters, 16 inputs) the estimate was 0.33 s and the report 24 s, 21 of them the
sweep; now it is 29 s. The oracle is the sweep the report runs: its passes counted, its time slowed on purpose.
"""

from __future__ import annotations

import re
import time

import torch
from torch import nn

import torchfim.report as report_mod
from torchfim.engine.functional import FunctionalBackend
from torchfim.families import Categorical
from torchfim.report import cost
from torchfim.report import settings as report_settings


def _conv_model() -> tuple[nn.Module, report_mod.Data]:
    """A tanh CNN: its convolution's entries have no factorisation by unit, so the sweep passes along each."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    X = torch.randn(16, 1, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, report_mod.Data(X, None, "test")


def test_the_sweep_estimated_is_the_sweep_the_report_runs(monkeypatch):
    """``entries × m`` of the estimate equals the directions × inputs the report's Î2 step passes along."""
    model, data = _conv_model()
    swept, diagonals = [], FunctionalBackend.output_hessian_diagonals

    def spy(self, batch, columns):
        swept.append(len(columns) * batch.size)
        return diagonals(self, batch, columns)

    monkeypatch.setattr(FunctionalBackend, "output_hessian_diagonals", spy)
    sweep = cost.time_hessian_sweep(model, data, Categorical(), None, -1)
    swept.clear()
    R = report_mod.compute_report(model, data, progress=False, variance_inputs=12, max_block=0, score_only=False)
    assert R["data"]["variance_inputs"] == 12 and sweep.entries == 2 * 9 + 2 > 0
    assert sum(swept) == sweep.entries * 12


def test_a_report_whose_hessian_sweep_takes_too_long_is_given_score_only(monkeypatch):
    """Each direction of the sweep slowed to 0.1 s per mini-batch: the 20 entries take 2 s on the 16 inputs, over
    a budget of 1 s that the rest of the report keeps. The automatic mode chose the full report (its estimate: a few
    ms); it now gives the score-only report and says why, and Î2's time in it."""
    model, data = _conv_model()
    diagonals = FunctionalBackend.output_hessian_diagonals

    def slowed(self, batch, columns):
        time.sleep(0.1 * len(columns))
        return diagonals(self, batch, columns)

    monkeypatch.setattr(FunctionalBackend, "output_hessian_diagonals", slowed)
    monkeypatch.setattr(report_settings, "FULL_REPORT_SECONDS", 1.0)
    sweep = cost.time_hessian_sweep(model, data, Categorical(), None, -1)
    assert sweep.entries == 20 and 16 * sweep.seconds >= 2.0
    R = report_mod.compute_report(model, data, progress=False, variance_inputs=16, max_block=0)
    assert R["mode"] == "score_only", R["mode"]
    assert "the Hessian estimator's variances take one forward-over-forward pass per parameter entry" in R["mode_reason"]
    assert re.search(r"\(20 × 16, about \d+ s: a smaller variance_inputs shortens it\)", R["mode_reason"])
    # without Î2's variances (the model too large for them) the sweep is not counted: the full report
    monkeypatch.setattr(report_settings, "HESSIAN_BUDGET", 0)
    R = report_mod.compute_report(model, data, progress=False, max_block=0)
    assert R["mode"] == "full" and R["data"]["hessian_variances"] is False
