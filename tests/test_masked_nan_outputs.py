"""Outputs that are NaN at masked positions: left out of the Fisher, but named, since where the model computes them from
its parameters (transformers' eager attention on a left-padded batch, where a query's keys are all padding) their NaN
derivatives reach every parameter and the Fisher comes out NaN; the warning gives the cause and the fix."""

from __future__ import annotations

import warnings

import clients
import pytest
import torch
from torch import nn

import torchfim

NAMED = r"outputs are NaN at 2 of the 2 masked positions.*attn_implementation='sdpa', or pad on the right"


class _FilledWithNan(nn.Module):
    """Token logits whose padded positions the forward sets to NaN after the parameters: no NaN derivative."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 4), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, fill: torch.Tensor | None = None) -> torch.Tensor:
        o = self.head(torch.tanh(self.embed(ids)))
        return o if fill is None else o.masked_fill(fill.unsqueeze(-1), float("nan"))


def test_nan_outputs_at_masked_positions_are_named_and_left_out() -> None:
    """NaN logits put at the two padded positions after the parameters: a warning, and the Fisher of the observed
    positions, equal to that of the same model without the NaN."""
    torch.manual_seed(0)
    model = _FilledWithNan().double()
    ids = torch.randint(0, 7, (3, 4))
    mask = torch.ones(3, 4, dtype=torch.bool)
    mask[0, :2] = False
    with pytest.warns(RuntimeWarning, match=NAMED):
        got = torchfim.fisher(model, {"ids": ids, "fill": ~mask}, structure="diag", mask=mask)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = torchfim.fisher(model, {"ids": ids}, structure="diag", mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_eager_attention_on_a_left_padded_batch_is_named_with_its_fix() -> None:
    """A Llama with eager attention on a left-padded batch gives NaN logits at the padding; the Fisher is refused as
    non-finite, after a warning that names the cause and the fix, which gives a finite Fisher without a warning."""
    transformers = clients.need("transformers")
    ids = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    batch = {"input_ids": ids, "attention_mask": mask}

    def llama(attention: str) -> nn.Module:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                                          attn_implementation=attention)
        return transformers.LlamaForCausalLM(config).eval().double()

    with pytest.warns(RuntimeWarning, match=NAMED), pytest.raises(torchfim.TorchfimError, match="non-finite"):
        torchfim.fisher(llama("eager"), batch, structure="trace", mask="attention_mask")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert torch.isfinite(torchfim.fisher(llama("sdpa"), batch, structure="trace", mask="attention_mask"))
