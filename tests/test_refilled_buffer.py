"""A loader that refills one buffer before each ``yield`` (a streaming or prefetching pattern): every call reads each
mini-batch as it came, not the buffer as it ends. When the standard error, ``samples_needed``, ``compare_estimators``
and the bounds read their inputs again after a first pass, they held the last mini-batch N times (standard errors
1.95× the variance, ``samples_needed`` 541 for 572: a review); they now read each mini-batch once, in one pass
(``torchfim.one_pass``), and a monitor keeps a copy of its held inputs as they came. Oracle: the same calls on the
inputs as one tensor."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import torchfim
from torchfim.train import FisherTraceMonitor


def _problem() -> tuple[nn.Module, Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    x[4:] *= 5  # the two mini-batches differ
    return model, x


def _refilled(x: Tensor) -> Iterator[Tensor]:
    buffer = torch.empty(4, 3, dtype=torch.float64)
    for start in (0, 4):
        buffer.copy_(x[start : start + 4])
        yield buffer


def test_the_standard_error_and_the_planning_read_each_mini_batch_as_it_came() -> None:
    model, x = _problem()
    variance = torchfim.fisher_variance(model, x, structure="trace")
    _, stderr = torchfim.fisher(model, _refilled(x), structure="trace", estimator="score", return_stderr=True,
                                generator=torch.Generator().manual_seed(0))
    assert float(stderr) ** 2 == pytest.approx(float(variance), rel=1e-12)
    assert torchfim.samples_needed(model, _refilled(x), rel_error=0.01) == torchfim.samples_needed(model, x,
                                                                                                   rel_error=0.01)
    bound = torchfim.variance_bound(model, _refilled(x), structure="trace")
    assert float(bound) == pytest.approx(float(torchfim.variance_bound(model, x, structure="trace")), rel=1e-12)
    got, want = torchfim.compare_estimators(model, _refilled(x)), torchfim.compare_estimators(model, x)
    assert [r.score_variance for r in got.rows] == pytest.approx([r.score_variance for r in want.rows], rel=1e-12)


def test_a_monitor_holds_each_mini_batch_as_it_came() -> None:
    model, x = _problem()
    got = FisherTraceMonitor(model, _refilled(x), generator=torch.Generator().manual_seed(0)).measure(0)
    want = FisherTraceMonitor(model, [x[:4], x[4:]], generator=torch.Generator().manual_seed(0)).measure(0)
    assert got.trace == pytest.approx(want.trace, rel=1e-12) and got.stderr == pytest.approx(want.stderr, rel=1e-12)
