"""FisherPenalty's ``kind="trace"`` on recurrent models: per-input gradients under one ``vmap``.

torch.func cannot batch the fused RNN kernels over the inputs (vmap has no rule for the in-place fill
of their zero initial states), so before, the trace penalty warned and took each input's gradient one at
a time. Under torch.func the layers now compute step by step. The oracle is the definition,
``α (1/B) Σᵢ ‖∇_θ log p(ŷᵢ|xᵢ)‖²`` with the labels the penalty draws, differentiated twice by autograd
through the layers' own forward.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import torchfim_messages
from oracles import penalty_definition
from torch import nn

from torchfim.families import Categorical
from torchfim.train import FisherPenalty

ALPHA = 0.3


class _Reader(nn.Module):
    def __init__(self, kind: type[nn.Module]) -> None:
        super().__init__()
        self.embed, self.rnn, self.head = nn.Embedding(11, 4), kind(4, 5, num_layers=2, batch_first=True), nn.Linear(5, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0][:, -1])


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", [nn.GRU, nn.LSTM, nn.RNN])
def test_trace_penalty_on_a_recurrent_model_is_batched_and_equals_its_definition(kind, grad_method: str) -> None:
    torch.manual_seed(0)
    model, x = _Reader(kind).double(), torch.randint(0, 11, (5, 6))
    params = list(model.parameters())
    with torch.no_grad():
        y = Categorical().sample(model(x), 1, torch.Generator().manual_seed(5)).reshape(-1)

    def log_p(rows: slice) -> torch.Tensor:
        return torch.log_softmax(model(x[rows]), -1).gather(-1, y[rows, None]).sum()

    value, *want = penalty_definition(log_p, params, len(y), "trace", ALPHA)
    pen = FisherPenalty(model, alpha=ALPHA, kind="trace", grad_method=grad_method, generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        term = pen(x, step=0)
    assert torchfim_messages(caught) == []
    got = torch.autograd.grad(term, params)
    tol = 1e-10 if grad_method == "exact" else 1e-6  # the forward difference: ε·‖H'‖ (float64)
    assert torch.allclose(term, value, rtol=1e-10, atol=0)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=tol, atol=tol * scale)
