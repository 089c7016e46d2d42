"""``samples_needed``, ``compare_estimators`` and ``variance_bound(estimator="hessian")`` read their inputs in one
pass: a loader's mini-batches were copied and all held for a pass per part (the variance, the exact Fisher, Î2's
variance; the bounds' one pass each), so memory grew with the data set (12 live mini-batches of 12 read; for 100
mini-batches of 256×784, 57 to 110 MB more than for 25). Their parts are sums of per-input terms, now added as the
pass reaches each mini-batch. Oracles: :func:`torchfim.fisher_variance`, :func:`torchfim.fisher` and
:func:`torchfim.combined.combined_variance` over the same mini-batches, each in a pass of its own (equal to the bit),
and the public calls on a list of the mini-batches against a loader and a generator that refills one buffer."""

from __future__ import annotations

import gc
import math
from collections.abc import Callable, Iterator

import pytest
import torch
from one_pass_cases import close, equal, forms, problem
from torch import Tensor, nn

import torchfim
from torchfim.combined import combined_variance
from torchfim.one_pass import summed_parts

STRUCTURES = ("diag", "trace", "full", "blocks")


@pytest.mark.parametrize("structure", STRUCTURES)
@pytest.mark.parametrize("name", ["mlp", "gaussian", "tagger"])
def test_the_parts_of_one_pass_are_each_functions_own_pass(name: str, structure: str) -> None:
    """Each part, summed in the one pass, equals to the bit the public function's own pass over the same
    mini-batches, from a list, a loader and a refilling generator alike."""
    model, x, fam, mask = problem(name)
    batches = [x[:4], x[4:8], x[8:]]
    how = dict(family=fam, structure=structure, mask=mask)
    want = {"exact": torchfim.fisher(model, batches, **how),
            "score": torchfim.fisher_variance(model, batches, estimator="score", n_samples=2, **how),
            "hessian": torchfim.fisher_variance(model, batches, estimator="hessian", n_samples=2, **how),
            "combined": combined_variance(model, batches, n_samples=2, **how)}
    for form, make in forms(x, loader_itself=True).items():
        got, unavailable = summed_parts(model, make(), fam, structure, ("score", "exact", "hessian"), 2, what="test",
                                        mask=mask)
        assert unavailable is None
        for part in ("score", "exact", "hessian"):
            assert equal(got[part], want[part]), (form, part)
        got, _ = summed_parts(model, make(), fam, structure, ("combined", "exact"), 2, what="test", mask=mask)
        assert equal(got["combined"], want["combined"]) and equal(got["exact"], want["exact"]), form


@pytest.mark.filterwarnings("ignore:torchfim. samples_needed")  # the worst entry named, with structure="diag"
@pytest.mark.parametrize("name", ["mlp", "tagger"])
def test_the_public_calls_on_a_loader_are_those_on_a_list(name: str) -> None:
    """samples_needed, compare_estimators (rows from fisher_variance and fisher by hand) and variance_bound: the
    same numbers from a list, a loader and a refilling generator of the same mini-batches."""
    model, x, fam, mask = problem(name)
    batches = [x[:4], x[4:8], x[8:]]
    diag = torchfim.fisher(model, batches, family=fam, structure="diag", mask=mask)
    variances = {e: torchfim.fisher_variance(model, batches, family=fam, estimator=e, structure="diag", n_samples=3,
                                             mask=mask) for e in ("score", "hessian")}
    for form, make in forms(x, loader_itself=True).items():
        for estimator in ("score", "hessian", "combined"):
            for structure in ("trace", "diag"):
                got = torchfim.samples_needed(model, make(), family=fam, estimator=estimator, structure=structure,
                                              rel_error=0.05, mask=mask)
                assert got == torchfim.samples_needed(model, batches, family=fam, estimator=estimator,
                                                      structure=structure, rel_error=0.05, mask=mask), form
        rows = torchfim.compare_estimators(model, make(), family=fam, n_samples=3, mask=mask).rows
        start = 0
        for row in rows:
            part = slice(start, start + row.size)
            assert (row.fisher_diag_sum, row.score_variance, row.hessian_variance) == (
                float(diag[part].sum()), float(variances["score"][part].sum()),
                float(variances["hessian"][part].sum())), (form, row.name)
            start += row.size
        assert start == diag.numel()
        for structure in STRUCTURES:
            got = torchfim.variance_bound(model, make(), family=fam, estimator="hessian", structure=structure,
                                          mask=mask)
            want = torchfim.hessian_variance_bound_spectral(model, batches, family=fam, structure=structure,
                                                            mask=mask)
            assert equal(got, want), (form, structure)


def _live_counts(call: Callable[[Iterator[Tensor]], object], batches: int = 12) -> list[int]:
    """Live mini-batches (distinct storages of tensors of their shape) as a one-shot generator yields each of
    ``batches``: 1, the one read now, where none is held (copies held for another pass make it 1, 2, …)."""
    torch.manual_seed(0)
    counts = []

    def live() -> int:
        gc.collect()
        return len({t.untyped_storage().data_ptr() for t in gc.get_objects()
                    if issubclass(type(t), Tensor) and t.shape == (7, 13)})

    def generator() -> Iterator[Tensor]:
        for _ in range(batches):
            counts.append(live())
            yield torch.randn(7, 13, dtype=torch.float64)

    call(generator())
    assert len(counts) == batches
    return counts


CALLS = {
    "samples_needed score trace": lambda m, g: torchfim.samples_needed(m, g, structure="trace"),
    "samples_needed hessian diag": lambda m, g: torchfim.samples_needed(m, g, estimator="hessian", structure="diag"),
    "samples_needed combined trace": lambda m, g: torchfim.samples_needed(m, g, estimator="combined",
                                                                          structure="trace"),
    "compare_estimators": lambda m, g: torchfim.compare_estimators(m, g),
    "variance_bound hessian diag": lambda m, g: torchfim.variance_bound(m, g, estimator="hessian", structure="diag"),
    "variance_bound score diag": lambda m, g: torchfim.variance_bound(m, g, structure="diag"),
    "variance_bound score trace": lambda m, g: torchfim.variance_bound(m, g, structure="trace"),
    "fisher_variance score diag": lambda m, g: torchfim.fisher_variance(m, g, structure="diag"),
    "fisher_variance hessian trace": lambda m, g: torchfim.fisher_variance(m, g, estimator="hessian",
                                                                           structure="trace"),
}


@pytest.mark.parametrize("call", CALLS)
def test_a_generators_mini_batches_are_not_held(call: str) -> None:
    model = nn.Sequential(nn.Linear(13, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    counts = _live_counts(lambda g: CALLS[call](model, g))
    assert max(counts) <= 1, counts


class _NoForwardRule(nn.Module):
    """Says what torch says of an operation without a forward-mode rule where torch.func's transforms run it (the
    Hessian estimator's second derivatives), and computes otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        if torch._C._are_functorch_transforms_active():
            raise NotImplementedError("Trying to use forward AD with _grouped_mm that does not support it")
        return torch.tanh(self.lin(x))


def test_a_comparison_without_the_hessian_estimator_reads_a_generator_once() -> None:
    """Î2's variance fails on the first mini-batch: the comparison goes on with Î1 alone over every mini-batch
    (the score variances those of fisher_variance over them all), and samples_needed(estimator='hessian') still
    raises the error."""
    torch.manual_seed(0)
    model, x = _NoForwardRule().double(), torch.randn(9, 4, dtype=torch.float64)
    cmp = torchfim.compare_estimators(model, (x[i : i + 3] for i in range(0, 9, 3)))
    assert cmp.hessian_unavailable is not None and "forward-mode" in cmp.hessian_unavailable
    score = torchfim.fisher_variance(model, [x[:3], x[3:6], x[6:]], structure="diag")
    diag = torchfim.fisher(model, [x[:3], x[3:6], x[6:]], structure="diag")
    assert [r.score_variance for r in cmp.rows] == [float(score[:12].sum()), float(score[12:].sum())]
    assert [r.fisher_diag_sum for r in cmp.rows] == [float(diag[:12].sum()), float(diag[12:].sum())]
    assert all(math.isnan(r.hessian_variance) and r.better == "score" for r in cmp.rows)
    with pytest.raises(torchfim.TorchfimError, match="forward-mode"):
        torchfim.samples_needed(model, (x[i : i + 3] for i in range(0, 9, 3)), estimator="hessian")


@pytest.mark.parametrize("structure", ["diag", "trace"])
@pytest.mark.parametrize("name", ["mlp", "tagger"])
def test_mini_batches_cut_into_row_groups_give_each_functions_parts(name: str, structure: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """With small budgets the pass records mini-batches in the closed forms' row groups (for the score's, one
    pull-back of all output numbers that fits 2 inputs), which the exact Fisher's and Î2's variance's own passes cut
    otherwise (in groups of their own budget): their sums over them are the same to rounding, Î1's variance's to the
    bit."""
    import torchfim.engine.backend as engine_backend
    import torchfim.engine.loop as loop
    import torchfim.engine.row_groups as row_groups

    model, x, fam, mask = problem(name)
    recorded, sizes = loop.recorded, []
    monkeypatch.setattr(loop, "recorded", lambda view, backend, part: sizes.append(part.size) or
                        recorded(view, backend, part))
    monkeypatch.setattr(row_groups, "WHOLE_GROUP_ELEMENTS", 60)
    monkeypatch.setattr(row_groups, "ROW_GROUP_ELEMENTS", 60)
    monkeypatch.setattr(engine_backend, "whole_output_rows", lambda *args, **kwargs: 2)
    batches = [x[:6], x[6:]]
    got, _ = summed_parts(model, iter(batches), fam, structure, ("score", "exact", "hessian"), 1, what="test",
                          mask=mask)
    assert sum(sizes) == 11 and max(sizes) <= 2, sizes  # recorded in groups of at most 2 rows
    close(got["exact"], torchfim.fisher(model, batches, family=fam, structure=structure, mask=mask))
    want = {e: torchfim.fisher_variance(model, batches, family=fam, estimator=e, structure=structure, mask=mask)
            for e in ("score", "hessian")}
    assert equal(got["score"], want["score"])
    close(got["hessian"], want["hessian"])
