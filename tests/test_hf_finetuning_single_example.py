"""A tokenizer's single example, ``{"input_ids": (T,), "attention_mask": (T,)}``, handed to torchfim as a mini-batch.

Without its batch dimension transformers' own forward fails inside: GPT-2 and Llama with an IndexError ("too many
indices for tensor of dimension 2"), BERT with a ValueError ("not enough values to unpack"). torchfim names a 1-D
input's missing batch dimension where torch raises a RuntimeError, but let these two through as bare tracebacks from
transformers, from ``fisher``, the monitor, the penalty and ``penalised_loss`` alike. Each now says that the first
dimension is the batch, with the fix for a dict mini-batch; the same example with its batch dimension computes.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
from hf_models import padded_batch, tiny_bert, tiny_gpt2, tiny_llama

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor

transformers = clients.need("transformers")

CALLS = {
    "fisher": lambda model, batch: torchfim.fisher(model, [batch], structure="trace"),
    "monitor": lambda model, batch: FisherTraceMonitor(model, [batch], every=1).step(0),
    "penalty": lambda model, batch: FisherPenalty(model)(batch, step=0),
    "penalised_loss": lambda model, batch: FisherPenalty(model).penalised_loss(batch, lambda o: o.logits.sum(), step=0),
}


@pytest.mark.parametrize("call", list(CALLS))
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama, tiny_bert])
def test_a_single_example_without_its_batch_dim_is_named(build, call: str) -> None:
    model = build()
    batch = padded_batch([5], seed=0, positions=False)
    single = {k: v[0] for k, v in batch.items()}
    with pytest.raises(torchfim.TorchfimError, match=r"1-D inputs .*first dimension is the batch.*v\.unsqueeze\(0\)"):
        CALLS[call](model, single)
    CALLS[call](model, {k: v[0].unsqueeze(0) for k, v in batch.items()})  # the fix it names computes
