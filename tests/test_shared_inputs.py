"""Modules called on inputs that every sample shares (position ids ``(1, T)``), and calls whose leading
dim equals the batch size only by chance: the per-module backend against the functional reference.

A lookup of ids ``(1, T)`` broadcast over the batch keeps its own rule: the backend records it with its
ids spread to ``(B, T)`` (:mod:`torchfim.engine.shared_inputs`). Where the model reads the spread output
across samples, or spreading changes the model's output, the lookup goes to the generic rule of the
module above instead, silently: nothing is wrong with such a model. The coverage check compares
per-sample gradients sample by sample, so a call that only looks batched cannot pass it.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import TokenModel
from engine_checks import assert_same_fisher
from torch import Tensor, nn

import torchfim
from torchfim.engine import ModelView, batches
from torchfim.engine.modules.embedding import EmbeddingRule
from torchfim.engine.per_module import PerModuleBackend


class _Positions(nn.Module):
    """Token and position embeddings, the positions read as ``how`` says, then a per-token head."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.embed, self.position, self.head = nn.Embedding(5, 3), nn.Embedding(6, 3), nn.Linear(3, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        ids = torch.arange(tokens.shape[1])
        if self.how == "first_row":  # (1, T, d)[0]: spread, row 0 would feed every sample
            pos = self.position(ids[None])[0]
        elif self.how == "summed":  # (1, T, d).sum(0): spread, the sum would count B copies
            pos = self.position(ids[None]).sum(0)
        else:  # "flat": ids (T,), whose leading dim may equal the batch size
            pos = self.position(ids)
        return self.head(torch.tanh(self.embed(tokens) + pos))


def _backend(model: nn.Module, x: Tensor) -> PerModuleBackend:
    view = ModelView(model)
    backend = PerModuleBackend(view)
    backend.record(next(batches(x, None, view.device, view.dtype)))
    return backend


def _checked(model: nn.Module) -> PerModuleBackend:
    """The per-module backend after recording 4 inputs of 3 tokens, its Fisher checked against the
    functional backend's, with RuntimeWarnings as errors (nothing moved with a warning)."""
    x = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        backend = _backend(model, x)
        _assert_matches_functional(model, x)
    return backend


def _assert_matches_functional(model: nn.Module, x: Tensor) -> None:
    for structure in ("diag", "blocks"):
        got = torchfim.fisher(model, x, structure=structure)
        want = torchfim.fisher(model, x, structure=structure, backend="functional")
        assert_same_fisher(got, want)


def test_a_lookup_shared_by_the_batch_keeps_its_rule() -> None:
    torch.manual_seed(0)
    model = TokenModel(3).double()
    backend = _checked(model)
    paths = {m: p for p, m in backend.view.model.named_modules()}
    assert {paths[m] for m in backend.shared} == {"position"}
    assert backend.moved == {}
    assert type(backend.rules[backend.view.model.position]) is EmbeddingRule


@pytest.mark.parametrize("how", ["first_row", "summed"])
def test_a_spread_the_model_does_not_take_as_a_broadcast_goes_to_the_module_above(how: str) -> None:
    """``first_row``: the model's output is the same spread or not, but each sample reads row 0 of the
    spread lookup, which the sample-by-sample coverage check finds; ``summed``: the output changes."""
    torch.manual_seed(0)
    model = _Positions(how).double()
    backend = _checked(model)
    assert backend.shared == frozenset()
    assert set(backend.moved) == {"position.weight"}


@pytest.mark.parametrize("batch", [2, 3])
def test_a_leading_dim_equal_to_the_batch_size_by_chance_is_not_taken_for_it(batch: int) -> None:
    """Position ids ``(T,)`` with ``T`` equal to the batch size: their lookup is one for every sample, not
    one per sample. With two samples the coverage check's rows have that length too, and only its
    sample-by-sample comparison tells them apart (the summed one took the lookup's rule: a wrong Fisher);
    the warning says why. With three, the check's two rows show that the lookup does not follow the batch."""
    torch.manual_seed(0)
    model = _Positions("flat").double()
    x = torch.randint(0, 5, (batch, batch), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _assert_matches_functional(model, x)
    said = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    if batch == 2:
        assert len(said) == 1 and "position.weight: their module's output has one row per sample" in said[0]
    else:
        assert said == []
    assert set(_backend(model, x).moved) == {"position.weight"}


class _FlatFeedForward(nn.Module):
    """A block that runs its layers on the hidden states flattened to rows, as OPT's decoder layers do
    (``(B·T, d)``, sample by sample) or time step by time step (``(T·B, d)`` from a sequence-first copy);
    its output ``(B, T, d)`` carries the batch, its layers' outputs do not. It has no parameters of its
    own, so it has no rule and the recorded forward does not see its calls."""

    def __init__(self, sequence_first: bool) -> None:
        super().__init__()
        self.sequence_first = sequence_first
        self.up, self.down = nn.Linear(3, 5), nn.Linear(5, 3)

    def forward(self, h: Tensor) -> Tensor:
        rows = h.transpose(0, 1) if self.sequence_first else h
        flat = self.down(torch.tanh(self.up(rows.reshape(-1, h.shape[-1])))).reshape(rows.shape)
        return h + (flat.transpose(0, 1) if self.sequence_first else flat)


class _FlatModel(nn.Module):
    def __init__(self, sequence_first: bool) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(5, 3), nn.Linear(3, 4)
        self.blocks = nn.ModuleList([_FlatFeedForward(sequence_first)])

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for block in self.blocks:  # a ModuleList is never called: the block is the nearest module above
            h = block(h)
        return self.head(h)


def test_layers_on_rows_not_sample_by_sample_go_to_the_nearest_called_module_above_them() -> None:
    """Before, the layers went to the nearest module above with a rule of its own: the whole model."""
    torch.manual_seed(0)
    model = _FlatModel(sequence_first=True).double()
    backend = _checked(model)
    block = backend.view.model.blocks[0]
    assert {name: module for name, (module, _) in backend.moved.items()} == {
        f"blocks.0.{layer}.{kind}": block for layer in ("up", "down") for kind in ("weight", "bias")}


def test_layers_on_rows_sample_by_sample_keep_their_rules() -> None:
    """The same layers on ``(B·T, d)``: their rules read the rows as positions (tests/test_folded_batch.py)."""
    torch.manual_seed(0)
    backend = _checked(_FlatModel(sequence_first=False).double())
    assert backend.moved == {}


class _PositionsBesideIds(nn.Embedding):
    """A position lookup given the token ids ``(B, T)`` and the position ids ``(1, T)``, which it looks up
    (as BART's decoder positions): a subclass with its own forward, so the generic rule."""

    def forward(self, tokens: Tensor, position_ids: Tensor) -> Tensor:
        return super().forward(position_ids)


class _IdsAndPositions(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.position, self.head = nn.Embedding(5, 3), _PositionsBesideIds(6, 3), nn.Linear(3, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        ids = torch.arange(tokens.shape[1]).unsqueeze(0)
        return self.head(torch.tanh(self.embed(tokens) + self.position(tokens, position_ids=ids)))


def test_a_call_with_one_shared_input_beside_per_sample_ones_is_spread_too() -> None:
    torch.manual_seed(0)
    model = _IdsAndPositions().double()
    backend = _checked(model)
    assert backend.shared == {backend.view.model.position} and backend.moved == {}


class _TableRows(nn.Module):
    """The first ``T`` rows of a table, ``(1, T, d)``, for token ids ``(B, T)``: an output shared by the batch
    computed from per-sample inputs (as BART's decoder positions), under the generic rule."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 3))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.table[: tokens.shape[1]].unsqueeze(0)


class _TokensAndTable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.position, self.head = nn.Embedding(5, 3), _TableRows(), nn.Linear(3, 4)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(tokens) + self.position(tokens)))


def test_an_output_shared_by_the_batch_is_spread_for_the_generic_rule() -> None:
    """Before, the table went to the whole model's generic rule."""
    torch.manual_seed(0)
    model = _TokensAndTable().double()
    backend = _checked(model)
    assert backend.shared == {backend.view.model.position} and backend.moved == {}
