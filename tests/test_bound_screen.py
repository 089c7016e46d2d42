"""The Î1 trace bound's kurtosis terms, solved exactly only where they could be the smaller of the two bounds.

``variance_bound(structure="trace")`` keeps, per input, the smaller of the spectral and kurtosis terms; the kurtosis
term's ``‖G‖₂`` costs a C×C eigen-solve per input (73 s of 109 at 1000 classes). A lower bound on it from power steps
settles the inputs whose kurtosis term already exceeds the spectral one (:mod:`torchfim.gram_spectral_norm`).
Oracle: :func:`~torchfim.trace_summary.score_trace_variances`' bound, which solves every input (its kurtosis sums are
reported); the two must be the same number, in a regime where the spectral terms win everywhere and in one where the
kurtosis terms win on some inputs.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfim
import torchfim.gram_spectral_norm as gram_norm
from torchfim.trace_summary import score_trace_variances


@pytest.mark.parametrize(("logit_scale", "solved"), [(1.0, (0, 0)), (20.0, (1, 31))])
def test_the_screened_bound_is_the_solved_one(monkeypatch: pytest.MonkeyPatch, logit_scale: float,
                                              solved: tuple[int, int]) -> None:
    """Tanh MLP, 100 classes, 32 inputs: logits of scale 1 (spectral smaller everywhere: no solve) and 20 (confident
    outputs, where the kurtosis term wins on 29 of the 32 inputs: those are solved)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 100)).double()
    with torch.no_grad():
        model[2].weight.mul_(logit_scale)
    x = torch.randn(32, 8, dtype=torch.float64)
    rows: list[int] = []
    solve = gram_norm.robust_eigvalsh
    monkeypatch.setattr(gram_norm, "robust_eigvalsh", lambda a: rows.append(a.shape[0]) or solve(a))
    screened = torchfim.variance_bound(model, x, structure="trace")
    assert solved[0] <= sum(rows) <= solved[1]
    assert torch.equal(screened, score_trace_variances(model, x).bound)


def test_the_power_steps_bound_the_largest_eigenvalue_from_below() -> None:
    g = torch.Generator().manual_seed(1)
    factors = torch.randn(64, 30, 5, generator=g, dtype=torch.float64) * torch.logspace(-3, 3, 64, dtype=torch.float64)[
        :, None, None]
    grams = torch.cat([factors @ factors.transpose(1, 2), torch.zeros(1, 30, 30, dtype=torch.float64)])
    lower, top = gram_norm._rayleigh_lower(grams), torch.linalg.eigvalsh(grams)[:, -1]
    assert bool((lower <= top * (1 + 1e-12)).all()) and float(lower[-1]) == 0.0
    assert float((lower[:-1] / top[:-1]).min()) > 0.3  # a useful bound, not 0
