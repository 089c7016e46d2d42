"""Models whose recurrent or attention layers take their batch in dim 1 (``batch_first=False``, torch's default
for ``nn.LSTM``, ``nn.MultiheadAttention`` and the transformer layers).

Fed sequence-first inputs, such a model mixes what torchfim reads as samples (dim 0 of every input): refused, and
the refusal names the modules with ``batch_first=False`` as the likely cause. Before, the LSTM's refusal came after
a warning that blamed "a name outside the model" for the rules' misses, and no refusal said what to change. A model
that transposes to sequence-first inside its forward is computed, and equals its ``batch_first=True`` twin and the
brute-force Fisher.

Oracle: ``oracles.exact_fisher`` (``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` by ``torch.func`` Jacobians, float64).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import assert_quietly_equals_dense_over
from oracles import exact_fisher
from torch import Tensor, nn

import torchfim


class _Recurrent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.LSTM(4, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.rnn(x)[0])


class _Attention(nn.Module):
    """Self-attention over positions, then a head on their mean; ``transpose``: batch-first inputs turned
    sequence-first for a ``batch_first=False`` attention inside the forward."""

    def __init__(self, batch_first: bool, transpose: bool) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=batch_first), nn.Linear(4, 3)
        self.transpose = transpose

    def forward(self, x: Tensor) -> Tensor:
        x = x.transpose(0, 1) if self.transpose else x
        h = self.att(x, x, x, need_weights=False)[0]
        return self.head((h.transpose(0, 1) if self.transpose else h).mean(1))


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
    return nn.Sequential(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), nn.Linear(4, 3))


SEQUENCE_FIRST = {
    "lstm": (_Recurrent, "'rnn'"),
    "attention": (lambda: _Attention(batch_first=False, transpose=False), "'att'"),
    "encoder": (_encoder, "'0.layers.0.self_attn'"),
}


@pytest.mark.parametrize("name", list(SEQUENCE_FIRST))
def test_sequence_first_inputs_are_refused_naming_the_batch_first_false_modules(name: str) -> None:
    make, path = SEQUENCE_FIRST[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x = torch.randn(7, 5, 4, dtype=torch.float64)  # (sequence, batch, features)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        with pytest.raises(torchfim.TorchfimError, match="depends on the other samples in its batch") as err:
            torchfim.fisher(model, x, structure="trace")
    assert f"module {path} takes batch_first=False" in str(err.value)
    assert "transpose inside forward" in str(err.value)
    assert not [w for w in said if "do not add up" in str(w.message)]  # no misleading cause before the refusal


def test_a_model_mixing_samples_without_such_modules_is_refused_without_the_hint() -> None:
    class Centred(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.layer(x - x.mean(0))

    with pytest.raises(torchfim.TorchfimError, match="depends on the other samples in its batch") as err:
        torchfim.fisher(Centred().double(), torch.randn(6, 4, dtype=torch.float64), structure="trace")
    assert "batch_first" not in str(err.value)


@pytest.mark.parametrize("structure", ["full", "diag"])
def test_a_sequence_first_attention_transposed_inside_forward_is_computed(structure: str) -> None:
    torch.manual_seed(0)
    inside = _Attention(batch_first=False, transpose=True).double()
    twin = _Attention(batch_first=True, transpose=False).double()
    twin.load_state_dict(inside.state_dict())
    x = torch.randn(6, 5, 4, dtype=torch.float64)  # (batch, sequence, features)
    want = exact_fisher(inside, x, "categorical")
    want = want if structure == "full" else want.diagonal()
    got = torchfim.fisher(inside, x, structure=structure)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert torch.allclose(torchfim.fisher(twin, x, structure=structure), want, rtol=1e-10, atol=1e-12)


class _Weighed(nn.Module):
    """A sequence-first attention whose weights the model uses too: they come ``(B, T, S)``, or ``(B, heads, T, S)``
    unaveraged, whatever ``batch_first`` says."""

    def __init__(self, average: bool) -> None:
        super().__init__()
        self.att, self.head, self.weighs = nn.MultiheadAttention(4, 2), nn.Linear(4, 3), nn.Linear(1, 3)
        self.average = average

    def forward(self, x: Tensor) -> Tensor:
        q = x.transpose(0, 1)
        h, w = self.att(q, q, q, need_weights=True, average_attn_weights=self.average)
        w = w if self.average else w.mean(1)
        return self.head(h.transpose(0, 1)).mean(1) + self.weighs(w[:, :, :1]).mean(1)


@pytest.mark.parametrize("average", [True, False])
def test_the_weights_of_a_sequence_first_attention_hold_the_batch_first(average: bool) -> None:
    """A batch of 2 (as many as heads) then one of 3 (as many as positions): read by ``batch_first=False``, the
    weights lost their batch to the heads or the positions, and the generic rule raised (a review)."""
    torch.manual_seed(0)
    model = _Weighed(average).double().eval()
    xs = [torch.randn(n, 3, 4, dtype=torch.float64) for n in (2, 3)]
    assert_quietly_equals_dense_over(model, xs)
