"""``fisher(..., return_stderr=True)`` sums the standard error's closed form in the estimate's own pass: no mini-batch
is held for a second pass (a loader's were copied and all kept: memory grew with the data set, 157 MB more for 200
mini-batches of 256×784). Oracles: :func:`torchfim.fisher_variance` over the same inputs in a pass of its own (the
two-pass result, to 1e-12 relative in float64), and the estimate of the same call without ``return_stderr`` (the
same labels drawn in the same order: equal to the bit)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
import torch
from one_pass_cases import close, equal, forms, problem
from torch import Tensor, nn

import torchfim
import torchfim.engine.backend as engine_backend
import torchfim.engine.row_groups as row_groups
import torchfim.variance as variance_module

STRUCTURES = ("diag", "trace", "full", "blocks")


def _call(model: nn.Module, inputs: object, fam: str, mask: object, estimator: str, structure: str,
          stderr: bool) -> object:
    return torchfim.fisher(model, inputs, family=fam, estimator=estimator, structure=structure, n_samples=2,
                           mask=mask, generator=torch.Generator().manual_seed(3), return_stderr=stderr)


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("estimator", ["score", "hessian"])
@pytest.mark.parametrize("name", ["mlp", "gaussian", "tagger"])
def test_the_standard_error_in_one_pass_is_the_two_pass_closed_form(name: str, estimator: str,
                                                                    structure: str) -> None:
    model, x, fam, mask = problem(name)
    want = torchfim.fisher_variance(model, [x[:4], x[4:8], x[8:]], family=fam, estimator=estimator,
                                    structure=structure, n_samples=2, mask=mask)
    for form, make in forms(x).items():
        estimate, stderr = _call(model, make(), fam, mask, estimator, structure, True)
        squared = {k: v.square() for k, v in stderr.items()} if isinstance(stderr, dict) else stderr.square()
        close(squared, want)
        alone = _call(model, make(), fam, mask, estimator, structure, False)
        assert equal(estimate, alone), form  # the same labels, in the same order


@pytest.mark.parametrize("estimator", ["score", "hessian"])
@pytest.mark.parametrize("name", ["mlp", "tagger"])
def test_mini_batches_the_closed_form_cuts_are_cut_for_it_alone(name: str, estimator: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the variance's closed form takes a mini-batch in row groups (small budgets; for the score's, one
    pull-back of all output numbers that fits 2 inputs), the estimate's mini-batch is still one (its labels are
    those of the call without a standard error), and the groups' variance is the variance's own pass's."""
    model, x, fam, mask = problem(name)
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
        close(stderr.square(), want)
        assert equal(estimate, alone[structure])
    assert any(groups is not None and len(groups) > 1 for groups in cut), cut


def test_the_global_generator_draws_the_same_labels_with_a_standard_error() -> None:
    model, x, fam, _ = problem("mlp")
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
