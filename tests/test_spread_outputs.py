"""A parameter shared by every sample goes to the nearest module whose outputs carry the batch but for some
that every sample shares, which the engine then records spread over the batch.

T5's first attention layer computes a position bias ``(1, H, T, T)`` from a table of relative positions and
returns it beside its batched output; every layer adds it to its scores. The table's lookup carries no
batch, so its parameter moves to a generic rule above: before, the whole stack's (every layer run again);
now the first attention's, with its bias output expanded to ``(B, H, T, T)`` so that each sample's rows
carry that sample's sensitivity (:mod:`torchfim.engine.shared_inputs`). The oracle is the dense float64
``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of :mod:`oracles`.
"""

from __future__ import annotations

import math
import warnings

import clients
import pytest
import torch
from engine_checks import assert_equals_dense, assert_quietly_equals_dense, module_rules
from oracles import exact_fisher
from torch import nn

import torchfim

T, D = 4, 3


class _BiasAttention(nn.Module):
    """One-head attention with scores ``q kᵀ/√d + bias``; with ``table``, the bias is looked up from relative
    positions ``(1, 1, T, T)``, else taken from the layer before, and returned either way."""

    def __init__(self, table: bool, summed: bool = False) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D) for _ in range(4))
        self.table = nn.Embedding(2 * T - 1, 1) if table else None
        self.summed = summed  # read the bias over the size of its first dim: spread, it would be B times smaller

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if bias is None:
            relative = torch.arange(T)[None, :] - torch.arange(T)[:, None] + T - 1
            bias = self.table(relative).permute(2, 0, 1).unsqueeze(0)
        elif self.summed:
            bias = bias / bias.shape[0]
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(D) + bias[:, 0]
        return self.o(torch.softmax(scores, -1) @ self.v(x)), bias


class _Stack(nn.Module):
    def __init__(self, summed: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_BiasAttention(True), _BiasAttention(False, summed)])
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        for layer in self.layers:
            out, bias = layer(x, bias)
            x = x + torch.tanh(out)
        return self.head(x.mean(1))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_shared_position_table_goes_to_the_layer_that_returns_its_bias_and_equals_the_dense_oracle(structure: str) -> None:
    torch.manual_seed(0)
    model, x = _Stack().double(), torch.randn(5, T, D, dtype=torch.float64)
    full = exact_fisher(model, x, "categorical")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the table moves, with a warning
        got = torchfim.fisher(model, x, structure=structure)
    assert_equals_dense(got, full, model, structure)
    backend, _ = module_rules(model, x)
    paths = {m: p for p, m in backend.view.model.named_modules()}
    assert {n: paths[m] for n, (m, _) in backend.moved.items()} == {"layers.0.table.weight": "layers.0"}
    assert {paths[m] for m in backend.shared} == {"layers.0"}


def test_a_bias_that_the_model_reads_otherwise_once_spread_is_not_spread_and_its_table_goes_above() -> None:
    """The second layer divides the bias by the size of its first dim: spread, the model's output would change
    (with no sample reading another's rows, so the per-sample check alone would pass), so the layer is not
    recorded spread and the table goes to the whole model's generic rule, exact as before."""
    torch.manual_seed(0)
    model, x = _Stack(summed=True).double(), torch.randn(5, T, D, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torchfim.fisher(model, x, structure="layers")
    assert_equals_dense(got, exact_fisher(model, x, "categorical"), model, "layers")
    backend, _ = module_rules(model, x)
    assert [m for m, _ in backend.moved.values()] == [backend.view.model] and not backend.shared


def test_t5_gives_its_relative_position_tables_to_the_first_attention_layers() -> None:
    """T5's encoder and decoder each look up one table in their first attention layer: those layers take
    them (not the whole stacks), and the Fisher is the whole-model backend's (float32: T5's own model)."""
    transformers = clients.need("transformers")
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=50, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                                   num_labels=3, decoder_start_token_id=0, eos_token_id=1)
    model = transformers.T5ForSequenceClassification(config).eval()
    ids = torch.randint(3, 50, (3, 6), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 1
    x = {"input_ids": ids}
    logits = lambda out: out.logits  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = torchfim.fisher(model, x, structure="diag", output=logits)
        backend, _ = module_rules(model, x, logits)
    paths = {m: p for p, m in backend.view.model.named_modules()}
    assert sorted(paths[m] for m, _ in backend.moved.values()) == [
        "transformer.decoder.block.0.layer.0.SelfAttention", "transformer.encoder.block.0.layer.0.SelfAttention"]
    want = clients.categorical_diag_by_autograd(model, x)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


H = 2


class _FoldedBias(nn.Module):
    """Scores ``x (w ⊙ x)ᵀ``; with ``table``, a bias table repeated over the batch and folded, ``(B·H, T, T)``,
    is returned beside them, as WavLM's first attention returns its position bias; else the bias given, gated
    by each sample's input, is added to the scores. The next layer so reads the batch folded in rows. (The first
    layer does not use its bias itself: outputs computed one from another go to a rule above.)"""

    def __init__(self, table: bool) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, D))
        self.table = nn.Parameter(0.3 * torch.randn(H, T, T)) if table else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        scores = (x @ (self.w * x).transpose(1, 2)).unsqueeze(1)
        if bias is None:
            bias = self.table.unsqueeze(0).repeat(x.shape[0], 1, 1, 1).view(-1, T, T)
        else:
            scores = scores + bias.view(x.shape[0], H, T, T) * torch.sigmoid(x.mean(-1))[:, None, :, None]
        return torch.softmax(scores, -1).mean(1) @ x, bias


class _FoldedStack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([_FoldedBias(True), _FoldedBias(False)])
        self.head = nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None
        for layer in self.layers:
            out, bias = layer(x, bias=bias)
            x = x + out
        return self.head(x.mean(1))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_bias_folded_over_the_batch_keeps_each_layer_on_its_own_rule_and_equals_the_dense_oracle(structure: str) -> None:
    """Each layer's generic rule reads its folded bias output, and the next one its folded bias input, by sample
    (before, the first layer's outputs did not carry the batch, and both layers' parameters went to the whole
    model's rule)."""
    torch.manual_seed(0)
    model, x = _FoldedStack().double(), torch.randn(5, T, D, dtype=torch.float64)
    backend, rules = assert_quietly_equals_dense(model, x, structure)
    assert not backend.moved and isinstance(rules["layers.0"], torchfim.engine.modules.GenericRule)
