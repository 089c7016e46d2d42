"""A shared weight's per-sample squared norms from its uses' factors (``torchfim/engine/factored.py``).

A table tied to the output layer, looked up at ``T`` positions and applied at ``T`` positions, gets
``‖Σ_k u_k v_kᵀ‖² = Σ_{k,k'} (u_k·u_k')(v_k·v_k')`` from Gram matrices (one-hot rows for the lookups)
instead of a per-sample gradient of the table's size. Checked against the same quantities with the
factored path switched off (the dense per-sample gradients, themselves checked against the float64
oracle in test_score_norms.py), and its mean against the score estimator's blocks with the same labels.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import torchfim
from torchfim.engine import per_module
from torchfim.score_norms import squared_score_norms
from torchfim.train import FisherTraceMonitor


class _TiedLM(nn.Module):
    """Embedding (vocabulary 40, width 16; ``padding_idx`` optional) → tanh mix → output layer tied to it
    (``transposed_mix``: the mix is a Linear applied to ``(B, T, d)``); outputs ``(B, T, 40)``."""

    def __init__(self, padding_idx: int | None) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 16, padding_idx=padding_idx)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, 40)
        self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.fixture
def factored_calls(monkeypatch) -> list[dict]:
    """What the factored path returned, call by call."""
    seen: list[dict] = []
    real = per_module.shared_squared_norms

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        return out

    monkeypatch.setattr(per_module, "shared_squared_norms", spy)
    return seen


def _dense_only(monkeypatch) -> None:
    monkeypatch.setattr(per_module, "shared_squared_norms", lambda *args, **kwargs: {})


def _model_and_tokens(padding_idx: int | None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randint(0, 40, (6, 3), generator=torch.Generator().manual_seed(1))
    tokens[1, 2] = tokens[1, 0]  # a token twice in one sample
    tokens[3, 1] = 0
    return _TiedLM(padding_idx).double().eval(), tokens


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_tied_table_norms_from_factors_equal_the_dense_gradients(padding_idx, factored_calls, monkeypatch) -> None:
    model, tokens = _model_and_tokens(padding_idx)
    got = squared_score_norms(model, tokens, n_samples=3, generator=torch.Generator().manual_seed(2))
    assert any("embed.weight" in got.names and call for call in factored_calls)  # the tied table factored
    _dense_only(monkeypatch)
    want = squared_score_norms(model, tokens, n_samples=3, generator=torch.Generator().manual_seed(2))
    assert got.names == want.names
    assert torch.allclose(got.per_tensor, want.per_tensor, rtol=1e-10, atol=1e-14)


def test_tied_table_norms_average_to_the_score_blocks_with_the_same_labels() -> None:
    model, tokens = _model_and_tokens(None)
    got = squared_score_norms(model, tokens, n_samples=4, generator=torch.Generator().manual_seed(5))
    blocks = torchfim.fisher(model, tokens, estimator="score", structure="blocks", n_samples=4,
                             generator=torch.Generator().manual_seed(5))
    for name, block in blocks.items():
        assert math.isclose(got.trace(name)[0], float(torch.diagonal(block).sum()), rel_tol=1e-12)


def test_the_monitor_takes_the_tied_tables_norms_from_factors(factored_calls, monkeypatch) -> None:
    """``FisherTraceMonitor`` (``sample_squares``): the same record with the factored path and without."""
    model, tokens = _model_and_tokens(0)
    got = FisherTraceMonitor(model, tokens, n_samples=2, generator=torch.Generator().manual_seed(3)).measure(0)
    assert any(factored_calls)
    _dense_only(monkeypatch)
    want = FisherTraceMonitor(model, tokens, n_samples=2, generator=torch.Generator().manual_seed(3)).measure(0)
    assert math.isclose(got.trace, want.trace, rel_tol=1e-10) and math.isclose(got.stderr, want.stderr, rel_tol=1e-10)
