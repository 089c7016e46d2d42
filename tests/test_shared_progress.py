"""A call shared between processes (``across_processes=True``) draws its progress bar on the first process alone:
the others' bars, over shares of the same inputs, drew over it in one terminal (a user trial saw W interleaved
bars, each counting its own share)."""

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
