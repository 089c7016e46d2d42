"""Layers called on the batch folded into their rows keep their rules, reading the rows as positions.

A model that flattens ``(B, T, d)`` to ``(B·T, d)`` before a Linear or a LayerNorm (``h.reshape(-1, d)``)
calls them on rows that come ``T`` per sample, in sample order. Their rules read such a call as ``T``
positions per sample (:attr:`torchfim.engine.modules.Call.fold`); the coverage check compares the
per-sample gradients with autograd's sample by sample, so rows in another order (a sequence-first batch
flattened) are found on the first batch and recorded as they come: their parameters then go to the
generic rule of a module above, silently, as before. The oracle is the dense float64
``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of :mod:`oracles`.
"""

from __future__ import annotations

import warnings

import clients
import pytest
import torch
from engine_checks import assert_equals_dense, assert_matches_functional, module_rules
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.engine.modules import GenericRule, LinearRule
from torchfim.engine.modules.norm import NormRule


class _Flattening(nn.Module):
    """Linear on ``(B, T, 3)``, then a Linear and a LayerNorm on its output flattened to rows (sample by
    sample, or time step by time step with ``sequence_first``), a mean over time and a Linear head."""

    def __init__(self, sequence_first: bool = False) -> None:
        super().__init__()
        self.sequence_first = sequence_first
        self.inner, self.fc, self.norm, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))
        b, t, d = h.shape
        if self.sequence_first:
            rows = self.norm(torch.tanh(self.fc(h.transpose(0, 1).reshape(t * b, d))))
            h = rows.reshape(t, b, d).transpose(0, 1)
        else:
            h = self.norm(torch.tanh(self.fc(h.reshape(b * t, d)))).reshape(b, t, d)
        return self.head(h.mean(1))


def _model(sequence_first: bool = False) -> nn.Module:
    torch.manual_seed(0)
    return _Flattening(sequence_first).double()


def _fisher_quietly(model: nn.Module, x: torch.Tensor, structure: str) -> torch.Tensor | dict:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is moved with a warning, nothing loops
        return torchfim.fisher(model, x, structure=structure)


@pytest.mark.parametrize("structure", ["diag", "layers"])
@pytest.mark.parametrize("inputs", [5, 1])
def test_layers_on_rows_of_the_batch_keep_their_rules_and_equal_the_dense_oracle(structure: str, inputs: int) -> None:
    model, x = _model(), torch.randn(inputs, 4, 3, dtype=torch.float64)
    backend, rules = module_rules(model, x)
    assert isinstance(rules["fc"], LinearRule) and isinstance(rules["norm"], NormRule) and not backend.moved
    assert_equals_dense(_fisher_quietly(model, x, structure), exact_fisher(model, x, "categorical"), model, structure)


def test_rows_of_a_sequence_first_batch_go_to_the_generic_rule_above_without_a_warning() -> None:
    model, x = _model(sequence_first=True), torch.randn(5, 4, 3, dtype=torch.float64)
    full = exact_fisher(model, x, "categorical")
    assert_equals_dense(_fisher_quietly(model, x, "diag"), full, model, "diag")
    backend, rules = module_rules(model, x)
    assert {"fc.weight", "fc.bias", "norm.weight", "norm.bias"} <= set(backend.moved)
    assert isinstance(rules[""], GenericRule) and "fc" not in rules
    # A later call takes the settled rules from the per-model cache, without the check: still exact.
    assert_equals_dense(_fisher_quietly(model, x, "diag"), full, model, "diag")


@pytest.mark.parametrize("estimator", ["score", "hessian", "empirical"])
def test_folded_rows_give_every_estimator_and_variance_of_the_whole_model_backend(estimator: str) -> None:
    model, x = _model(), torch.randn(6, 4, 3, dtype=torch.float64)
    assert_matches_functional(model, x, estimator, torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(2)))


def test_the_monitors_squared_norms_read_folded_rows() -> None:
    """The per-input squared score norms (the monitor's and the score-only report's terms) from folded rows."""
    from torchfim.score_norms import squared_score_norms

    model, x = _model(), torch.randn(6, 4, 3, dtype=torch.float64)
    got = squared_score_norms(model, x, n_samples=2, generator=torch.Generator().manual_seed(3))
    reference = squared_score_norms(model, x, n_samples=2, generator=torch.Generator().manual_seed(3),
                                    backend="functional")
    assert got.names == reference.names
    assert torch.allclose(got.per_tensor, reference.per_tensor, rtol=1e-10,
                          atol=1e-14 * reference.per_tensor.abs().max())


class _SharedQueries(nn.Module):
    """A Linear on learned queries ``(4, 3)`` that every sample shares: its rows are no sample's, though with
    2 inputs they come 2 per input."""

    def __init__(self) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.linspace(-1.0, 1.0, 12).reshape(4, 3))
        self.proj, self.inner, self.head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.tanh(self.proj(self.queries))
        return self.head(torch.softmax(torch.tanh(self.inner(x)) @ q.T, -1) @ q)


@pytest.mark.parametrize("sizes", [(1, 2, 4), (2, 1, 4), (4, 2, 1)])
def test_rows_every_sample_shares_are_exact_whichever_batch_size_comes_first(sizes: tuple[int, ...]) -> None:
    """One input's rows are all its own, so a first call on one input checks nothing about the layout: later
    calls fold only the layers the check saw folded on 2 inputs (here none), and the shared rows, which fold
    evenly on 2 or 4 inputs, are never read as positions."""
    torch.manual_seed(0)
    model = _SharedQueries().double()
    for n in sizes:
        x = torch.randn(n, 3, dtype=torch.float64)
        got = torchfim.fisher(model, x, structure="diag")
        assert torch.allclose(got, torch.diagonal(exact_fisher(model, x, "categorical")), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("first", [1, 5])
def test_flattened_rows_stay_exact_after_a_first_call_on_one_input(first: int) -> None:
    model = _model()
    for n in (first, 3):
        x = torch.randn(n, 4, 3, dtype=torch.float64)
        assert_equals_dense(torchfim.fisher(model, x, structure="diag"), exact_fisher(model, x, "categorical"),
                            model, "diag")


class _SequenceFirstEncoder(nn.Module):
    """``nn.TransformerEncoderLayer`` with torch's default ``batch_first=False``: its feed-forward layers and
    norms see ``(T, B, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(torch.tanh(self.embed(x)).transpose(0, 1)).mean(0))


@pytest.mark.parametrize("structure", ["diag", "layers"])
def test_a_sequence_first_encoder_layer_keeps_its_rules_and_equals_the_dense_oracle(structure: str) -> None:
    """Its layers went to the whole model's generic rule before (their outputs carry the batch second)."""
    torch.manual_seed(0)
    model, x = _SequenceFirstEncoder().double().eval(), torch.randn(3, 4, 3, dtype=torch.float64)
    backend, rules = module_rules(model, x)
    assert not backend.moved
    assert isinstance(rules["encoder.linear1"], LinearRule) and isinstance(rules["encoder.norm2"], NormRule)
    assert_equals_dense(_fisher_quietly(model, x, structure), exact_fisher(model, x, "categorical"), model, structure)


@pytest.mark.parametrize("batches", [[(4, 4)], [(3, 4), (4, 4)], [(6, 2)], [(2, 2), (3, 2), (2, 2)]],
                         ids=["first batch", "a later batch", "two positions", "two inputs of two positions"])
def test_a_sequence_first_batch_with_as_many_positions_as_inputs_reads_sequence_first(batches: list) -> None:
    """``(T, B, d)`` with ``T = B`` reads either way. It was read batch first, silently: the Fisher was 34% off on a
    first batch of 4 sequences of 4, 18% on a later one. Now a module found sequence first (by the check, on a batch
    of another size) is read so; and with 2 positions the check takes 3 inputs, not 2 (its 2 read either way, and the
    layers went to the generic rule with a warning that blamed torch.func). A first batch of 2 inputs of 2 positions,
    which no check size reads apart, did that still: its layers are now read sequence first where batch first
    missed."""
    torch.manual_seed(0)
    model = _SequenceFirstEncoder().double().eval()
    for n, positions in batches:
        x = torch.randn(n, positions, 3, dtype=torch.float64)
        assert_equals_dense(_fisher_quietly(model, x, "diag"), exact_fisher(model, x, "categorical"), model, "diag")
    backend, rules = module_rules(model, x)
    assert not backend.moved and isinstance(rules["encoder.linear1"], LinearRule)


class _Windows(nn.Module):
    """A Linear on windows: ``(B, 4·L, d)`` cut into ``(B·4, L, d)``, sample by sample (as Swin's attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.window, self.head = nn.Linear(2, 3), nn.Linear(3, 3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))  # (B, 4·L, 3)
        windows = torch.tanh(self.window(h.reshape(h.shape[0] * 4, -1, 3)))  # (B·4, L, 3)
        return self.head(windows.reshape(h.shape).mean(1))


def test_a_layout_found_right_is_the_only_one_read_on_later_batches() -> None:
    """Windows of 3 rows: with 3 inputs their ``(12, 3, d)`` also looks sequence first, but the check on the
    first batch (2 inputs) found them folded, and only that layout is read afterwards."""
    torch.manual_seed(0)
    model = _Windows().double()
    for n in (2, 3):
        x = torch.randn(n, 12, 2, dtype=torch.float64)
        assert_equals_dense(_fisher_quietly(model, x, "diag"), exact_fisher(model, x, "categorical"), model, "diag")
    backend, rules = module_rules(model, torch.randn(3, 12, 2, dtype=torch.float64))
    assert isinstance(rules["window"], LinearRule) and backend.layout_of == {backend.view.model.window: "folded"}


def test_longformer_self_attention_projections_keep_their_rules_and_match_the_jacobian_oracle() -> None:
    """Longformer's self-attention runs its query, key and value projections on ``(T, B, d)``: they keep the
    Linear rule (the attention went to a generic rule that torch.func could not batch, one sample at a time,
    before), and the diagonal is the one of the Jacobians."""
    transformers = clients.need("transformers")
    torch.manual_seed(0)
    config = transformers.LongformerConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=32, attention_window=[4], num_labels=3)
    model = transformers.LongformerForSequenceClassification(config).double().eval()
    batch = {"input_ids": torch.randint(3, 90, (3, 8), generator=torch.Generator().manual_seed(0))}
    logits = lambda out: out.logits  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # nothing loops, nothing moves with a warning
        got = torchfim.fisher(model, batch, structure="diag", output=logits)
    jac, out = clients.jacobians(model, kwargs=batch, output="logits")
    assert clients.rel_err(got, clients.categorical_diag(jac, out, 3)) < 1e-10
    _, rules = module_rules(model, batch)
    attention = "longformer.encoder.layer.0.attention.self"
    assert attention not in rules and isinstance(rules[f"{attention}.query"], LinearRule)


class _PositionBias(nn.Module):
    """A learned bias of the window's positions, ``(L, L)``, computed from parameters alone (as Swin's
    relative position bias table): shared by every window of every sample."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.linspace(-0.5, 0.5, size * size).reshape(size, size))

    def forward(self) -> torch.Tensor:
        return self.table


class _WindowMixing(nn.Module):
    """Mixes the rows of each window ``(B·4, L, d)`` by ``softmax(h hᵀ + bias)``, with a raw scale: the generic
    rule of a call on windows, each sample's 4 windows its input."""

    def __init__(self, length: int) -> None:
        super().__init__()
        self.proj, self.bias = nn.Linear(3, 3), _PositionBias(length)
        self.scale = nn.Parameter(torch.tensor([0.7, 1.1, 0.9]))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        h = self.proj(windows)
        weights = torch.softmax(h @ h.transpose(-1, -2) + self.bias(), -1)
        return self.scale * (weights @ h)


class _WindowModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.mixing, self.head = nn.Linear(2, 3), _WindowMixing(3), nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inner(x))  # (B, 12, 3)
        return self.head(self.mixing(h.reshape(h.shape[0] * 4, 3, 3)).reshape(h.shape).mean(1))


def test_a_generic_rule_reads_windows_as_each_samples_input_and_takes_a_shared_table() -> None:
    """The mixing module's raw scale gets its generic rule on the folded windows; the bias table, whose output
    every window shares, goes to it (the nearest module above whose rows can be read per sample) rather than
    to the whole model's; the projection inside keeps the Linear rule."""
    torch.manual_seed(0)
    model, x = _WindowModel().double(), torch.randn(3, 12, 2, dtype=torch.float64)
    assert_equals_dense(_fisher_quietly(model, x, "diag"), exact_fisher(model, x, "categorical"), model, "diag")
    backend, rules = module_rules(model, x)
    mixing = backend.view.model.mixing
    assert isinstance(rules["mixing"], GenericRule) and isinstance(rules["mixing.proj"], LinearRule)
    assert {n: m for n, (m, _) in backend.moved.items()} == {"mixing.bias.table": mixing}
    assert backend.layout_of[mixing] == "folded"


def test_a_generic_rule_on_windows_keeps_its_projections_outputs(monkeypatch) -> None:
    """The projection's output, folded like the windows and free of the rule's parameters, is a constant of the
    products: no Linear runs again under torch.func (it did twice per call before)."""
    from torch._C._functorch import is_functorch_wrapped_tensor

    runs: list[int] = []
    linear = torch.nn.functional.linear

    def counting(x: torch.Tensor, *args: object) -> torch.Tensor:
        if is_functorch_wrapped_tensor(x):
            runs.append(1)
        return linear(x, *args)

    torch.manual_seed(0)
    model, x = _WindowModel().double(), torch.randn(3, 12, 2, dtype=torch.float64)
    full = exact_fisher(model, x, "categorical")
    monkeypatch.setattr(torch.nn.modules.linear.F, "linear", counting)
    got = torchfim.fisher(model, x, structure="diag")
    assert runs == []
    assert torch.allclose(got, torch.diagonal(full), rtol=1e-10, atol=1e-14)


def test_a_generic_rule_on_windows_that_torch_func_cannot_batch_loops_over_samples_exactly(monkeypatch) -> None:
    """Where torch.func fails on a call with regrouped rows, the rule takes each sample's rows one at a time."""

    def failing(*_args: object) -> None:
        raise RuntimeError("no batching rule")

    monkeypatch.setattr(GenericRule, "_vmapped", failing)
    torch.manual_seed(0)
    model, x = _WindowModel().double(), torch.randn(3, 12, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure="diag")
    assert any("one sample at a time" in str(w.message) for w in caught)
    assert torch.allclose(got, torch.diagonal(exact_fisher(model, x, "categorical")), rtol=1e-10, atol=1e-14)
    backend, _ = module_rules(model, x)
    assert backend.layout_of[backend.view.model.mixing] == "folded"


class _SequenceFirstExtraKeys(nn.Module):
    """``nn.MultiheadAttention(batch_first=False)`` with ``add_bias_kv`` or ``add_zero_attn``, which has no rule of its
    own: the generic rule reads its calls sequence first."""

    def __init__(self, **options: bool) -> None:
        super().__init__()
        self.attention, self.head = nn.MultiheadAttention(4, 2, **options), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.transpose(0, 1)
        return self.head(self.attention(q, q, q, need_weights=False)[0].transpose(0, 1).mean(1))


class _RowsOfAModuleSaidSequenceFirst(nn.Module):
    """A module of one's own that says ``batch_first = False``, called on the batch's rows flattened ``(B·T, d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.w, self.head = nn.Parameter(torch.randn(4, 4) * 0.5), nn.Linear(4, 3)
        self.rows = _SaysSequenceFirst(self.w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rows(x.reshape(-1, 4)).reshape(x.shape).mean(1))


class _SaysSequenceFirst(nn.Module):
    batch_first = False

    def __init__(self, w: nn.Parameter) -> None:
        super().__init__()
        self.w = w

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.tanh(rows @ self.w) * rows.sum(-1, keepdim=True)


@pytest.mark.parametrize("build", [lambda: _SequenceFirstExtraKeys(add_bias_kv=True),
                                   lambda: _SequenceFirstExtraKeys(add_zero_attn=True), _RowsOfAModuleSaidSequenceFirst],
                         ids=["add_bias_kv", "add_zero_attn", "folded-rows"])
def test_a_generic_rule_read_regrouped_keeps_the_batch_first_with_as_many_positions_as_inputs(build) -> None:
    """The generic rule read a regrouped call's first input, kept batch first, by the module's ``batch_first=False``:
    on a batch of as many inputs as positions it took the positions for the samples, 1-40% off, silently (a
    review); batches of another size were right."""
    torch.manual_seed(0)
    model = build().double().eval()
    for n in (2, 3):
        x = torch.randn(n, 3, 4, dtype=torch.float64)
        assert_equals_dense(torchfim.fisher(model, x, structure="full"), exact_fisher(model, x, "categorical"),
                            model, "full")
