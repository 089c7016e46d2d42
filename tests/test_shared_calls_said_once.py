"""A call shared between processes (``across_processes=True``) draws its progress bar, and warns of its result, on
the first process alone: the others' bars, over shares of the same inputs, drew over it in one terminal, and each
process said the same warning of the same combined result once more (a user trial saw W of each)."""

from __future__ import annotations

import pytest
import torch
from processes import one_process_group
from torch import nn

import torchfim

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


@pytest.mark.parametrize("rank", [0, 1])
def test_only_the_first_process_draws_a_shared_calls_bar(rank: int, monkeypatch, capsys) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with one_process_group():
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)  # as process `rank` would see it
        import torchfim.engine.session as session

        drawn = []
        original = session.run

        def recording(view, backend, mini_batches, family, mask, progress, *args, **kwargs):
            drawn.append(progress)
            return original(view, backend, mini_batches, family, mask, progress, *args, **kwargs)

        monkeypatch.setattr(session, "run", recording)
        torchfim.fisher(model, x, across_processes=True, progress=True)
    assert drawn == [rank == 0]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_shared_results_warning_is_said_by_the_first_process_alone(rank: int, monkeypatch) -> None:
    """samples_needed(structure='diag') names the entry that sets k from the combined result, the same on every
    process: the first says it, the others do not (a user trial saw it once per process)."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 5)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as alone:
        warnings.simplefilter("always")
        torchfim.samples_needed(model, x, structure="diag", estimator="hessian")
    assert any("is set by entry" in str(w.message) for w in alone)  # the case warns
    with one_process_group():
        monkeypatch.setattr(torch.distributed, "get_rank", lambda *a, **k: rank)
        with warnings.catch_warnings(record=True) as shared:
            warnings.simplefilter("always")
            torchfim.samples_needed(model, x, structure="diag", estimator="hessian", across_processes=True)
    assert any("is set by entry" in str(w.message) for w in shared) == (rank == 0)
