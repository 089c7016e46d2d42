"""A module under the generic rule called on a tensor that every sample shares, whose first dim only happens to equal
the batch's size: the generic rule read that dim as the batch and cut the tensor by row, each sample's forward reading
another row (a review: Funnel's class-token mask ``(T, S)`` on a batch of ``T`` sequences gave an exact Fisher 1e-3
off, silently; DeBERTa-v2's relative position embeddings ``(2k, d)`` on a batch of ``2k`` failed inside the module).

The coverage check (on 2 inputs) keeps the shapes of the inputs that held no batch; one that comes with the same shape
on a batch of another size is shared. The oracle is the definition ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from ``torch.func``
Jacobians of the whole model, in float64.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from oracles import exact_fisher
from torch import Tensor, nn

import torchfim


class _Offset(nn.Module):
    """``(x + table.mean(0)) @ w``: a module of the user's (the generic rule) with a table ``(T, 4)`` shared by the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        return (x + table.mean(0)) @ self.w


class _WithTable(nn.Module):
    def __init__(self, rows: int) -> None:
        super().__init__()
        self.inner = _Offset()
        self.register_buffer("table", torch.randn(rows, 4))

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(torch.tanh(x), self.table * 2)


@pytest.mark.parametrize("first", [3, 5], ids=["as_many_rows_first", "another_batch_first"])
def test_a_shared_input_with_as_many_rows_as_the_batch_is_not_cut_by_sample(first: int) -> None:
    torch.manual_seed(0)
    model = _WithTable(rows=3).double()
    batches = {n: torch.randn(n, 4, dtype=torch.float64) for n in (first, 3)}
    for n, x in batches.items():  # the check runs on the first call; the batch of 3 comes first or after it
        got = torchfim.fisher(model, x, structure="full")
        assert clients.rel_err(got, exact_fisher(model, x, "categorical")) < 1e-10, n


transformers = clients.need("transformers")


def _funnel() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.FunnelConfig(vocab_size=30, d_model=16, n_head=2, d_head=8, d_inner=32, block_sizes=[1, 1],
                                       num_labels=3, pad_token_id=1)
    return transformers.FunnelForSequenceClassification(config).double().eval()


def _deberta_v2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.DebertaV2Config(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                          intermediate_size=32, max_position_embeddings=20, num_labels=3, pad_token_id=1,
                                          relative_attention=True, max_relative_positions=2, pos_att_type=["c2p", "p2c"])
    return transformers.DebertaV2ForSequenceClassification(config).double().eval()


@pytest.mark.parametrize(("make", "size"), [(_funnel, 3), (_deberta_v2, 4)], ids=["funnel", "deberta_v2"])
def test_hugging_face_models_sharing_a_tensor_with_as_many_rows_as_the_batch(make, size: int) -> None:
    """Funnel's second block gets its class-token mask pooled to ``(3, 6)`` for sequences of 6; DeBERTa-v2's attention
    its relative position embeddings ``(4, 16)`` for 2 relative positions. Both in a module under the generic rule."""
    model = make()
    lengths = torch.tensor([6, 3, 4, 5][:size]).unsqueeze(1)
    mask = (torch.arange(6) < lengths).long()
    ids = torch.randint(3, 30, (size, 6), generator=torch.Generator().manual_seed(1)).masked_fill(mask == 0, 1)
    batch = {"input_ids": ids, "attention_mask": mask, "token_type_ids": ((torch.arange(6) >= 3) & (mask == 1)).long()}
    jac, logits = clients.jacobians(model, kwargs=batch, output="logits")
    want = clients.categorical_diag(jac, logits, 3)
    got = torchfim.fisher(model, batch, structure="diag")
    assert clients.rel_err(got, want) < 1e-8  # Funnel computes in float32 inside: its two backends differ by 1e-9
