"""``fisher(..., return_stderr=True)`` sums the standard error's closed form in the estimate's own pass: no mini-batch
is held for a second pass (a loader's were copied and all kept: memory grew with the data set, 157 MB more for 200
mini-batches of 256×784). Oracles: :func:`torchfim.fisher_variance` over the same inputs in a pass of its own (the
two-pass result, to 1e-12 relative in float64), and the estimate of the same call without ``return_stderr`` (the
same labels drawn in the same order: equal to the bit)."""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import torchfim
import torchfim.engine.backend as engine_backend
import torchfim.engine.row_groups as row_groups
import torchfim.variance as variance_module

STRUCTURES = ("diag", "trace", "full", "blocks")


class _Tagger(nn.Module):
    """Token ids ``(B, T)`` → logits ``(B, T, C)``: an output with positions, with a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 5), nn.Linear(5, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def _problem(name: str) -> tuple[nn.Module, Tensor, str, object]:
    """Model (float64), inputs, family and mask of each case."""
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), \
            torch.randn(11, 4, dtype=torch.float64), "categorical", None
    if name == "gaussian":
        return nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)).double(), \
            torch.randn(11, 4, dtype=torch.float64), "gaussian", None
    ids = torch.randint(0, 7, (11, 3))
    return _Tagger().double(), ids, "categorical", (lambda b: b != 0)


def _forms(x: Tensor) -> dict[str, Callable[[], object]]:
    """The inputs as a list of uneven mini-batches, a DataLoader and a generator that refills one buffer."""

    def refilled() -> Iterator[Tensor]:
        buffer = torch.empty_like(x[:4])
        for start in range(0, len(x), 4):
            part = buffer[: len(x[start : start + 4])]
            part.copy_(x[start : start + 4])
            yield part

    return {"list": lambda: [x[:4], x[4:8], x[8:]],
            "loader": lambda: (b[0] for b in DataLoader(TensorDataset(x), batch_size=4)),
            "refilled": refilled}


def _close(got: object, want: object) -> None:
    """Entry by entry to 1e-12 of the largest entry (a dict of blocks: of all blocks, a linear layer's Î2 block
    being 0)."""
    pairs = [(got[k], want[k]) for k in want] if isinstance(want, dict) else [(got, want)]
    scale = max(float(w.abs().max()) for _, w in pairs)
    assert scale > 0
    for g, w in pairs:
        assert g.dtype == w.dtype == torch.float64
        assert float((g - w).abs().max()) <= 1e-12 * scale


def _equal(got: object, want: object) -> bool:
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return torch.equal(got, want)


def _call(model: nn.Module, inputs: object, fam: str, mask: object, estimator: str, structure: str,
          stderr: bool) -> object:
    return torchfim.fisher(model, inputs, family=fam, estimator=estimator, structure=structure, n_samples=2,
                           mask=mask, generator=torch.Generator().manual_seed(3), return_stderr=stderr)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("estimator", ["score", "hessian"])
@pytest.mark.parametrize("name", ["mlp", "gaussian", "tagger"])
def test_the_standard_error_in_one_pass_is_the_two_pass_closed_form(name: str, estimator: str,
                                                                    structure: str) -> None:
    model, x, fam, mask = _problem(name)
    want = torchfim.fisher_variance(model, [x[:4], x[4:8], x[8:]], family=fam, estimator=estimator,
                                    structure=structure, n_samples=2, mask=mask)
    for form, make in _forms(x).items():
        estimate, stderr = _call(model, make(), fam, mask, estimator, structure, True)
        squared = {k: v.square() for k, v in stderr.items()} if isinstance(stderr, dict) else stderr.square()
        _close(squared, want)
        alone = _call(model, make(), fam, mask, estimator, structure, False)
        assert _equal(estimate, alone), form  # the same labels, in the same order


@pytest.mark.parametrize("estimator", ["score", "hessian"])
@pytest.mark.parametrize("name", ["mlp", "tagger"])
def test_mini_batches_the_closed_form_cuts_are_cut_for_it_alone(name: str, estimator: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the variance's closed form takes a mini-batch in row groups (small budgets; for the score's, one
    pull-back of all output numbers that fits 2 inputs), the estimate's mini-batch is still one (its labels are
    those of the call without a standard error), and the groups' variance is the variance's own pass's."""
    model, x, fam, mask = _problem(name)
    alone = {s: _call(model, [x[:4], x[4:]], fam, mask, estimator, s, False) for s in ("diag", "trace")}
    monkeypatch.setattr(row_groups, "WHOLE_GROUP_ELEMENTS", 60)
    monkeypatch.setattr(row_groups, "ROW_GROUP_ELEMENTS", 60)
    monkeypatch.setattr(engine_backend, "whole_output_rows", lambda *args, **kwargs: 2)
    cut, groups = [], variance_module.closed_form_groups
    monkeypatch.setattr(variance_module, "closed_form_groups", lambda *a: cut.append(groups(*a)) or cut[-1])
    for structure in ("diag", "trace"):
        want = torchfim.fisher_variance(model, [x[:4], x[4:]], family=fam, estimator=estimator,
                                        structure=structure, n_samples=2, mask=mask)
        estimate, stderr = _call(model, [x[:4], x[4:]], fam, mask, estimator, structure, True)
        _close(stderr.square(), want)
        assert _equal(estimate, alone[structure])
    assert any(groups is not None and len(groups) > 1 for groups in cut), cut


def test_the_global_generator_draws_the_same_labels_with_a_standard_error() -> None:
    model, x, fam, _ = _problem("mlp")
    torch.manual_seed(5)
    estimate, _ = torchfim.fisher(model, [x[:4], x[4:]], estimator="score", n_samples=3, return_stderr=True)
    torch.manual_seed(5)
    assert torch.equal(estimate, torchfim.fisher(model, [x[:4], x[4:]], estimator="score", n_samples=3))


@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_a_loaders_mini_batches_are_not_held_for_the_standard_error(estimator: str, structure: str) -> None:
    """Live mini-batches (distinct storages of tensors of their shape), counted as the loader yields each: one,
    the one read now (the copies held for a second pass made it 1, 2, …, 12)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    counts = []

    def live() -> int:
        gc.collect()
        return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                    if issubclass(type(t), Tensor) and t.shape == (7, 13)})

    def loader() -> Iterator[Tensor]:
        for _ in range(12):
            counts.append(live())
            yield torch.randn(7, 13, dtype=torch.float64)

    _, stderr = torchfim.fisher(model, loader(), estimator=estimator, structure=structure, return_stderr=True,
                                generator=torch.Generator().manual_seed(0))
    assert len(counts) == 12 and max(counts) <= 1, counts
    assert float(stderr.abs().max()) > 0
