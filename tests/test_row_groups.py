"""Large mini-batches recorded in groups of rows (``Backend.row_groups``) where nothing is drawn.

The exact Fisher pulls C − 1 vectors back per input, the closed-form variances, bounds and
covariances all C; when one vector's pull-back records more than ``row_groups.ROW_GROUP_ELEMENTS``
numbers, the loop records the batch in groups of rows, each a mini-batch of its own. The result
must not change: every case of the shared list is checked against the brute-force oracles with the
budget forced down to groups of one row (and of two rows for the exact Fisher).
"""

from __future__ import annotations

import pytest
import test_combined as combined_oracles  # imported as modules: their test functions are not collected twice
import test_engine_oracles as engine_oracles
import torch
from cases import BY_NAME
from test_combined import IDS as COMBINED_IDS
from test_combined import PAIRS as COMBINED_PAIRS
from test_engine_oracles import IDS, PAIRS, _close, _kwargs, _oracle, _view

import torchfim
from torchfim import covariance, variance
from torchfim.engine import backend, functional, loop, per_module, row_groups
from torchfim.engine.batch import make_batch
from torchfim.engine.session import engine_pass


@pytest.fixture
def recorded_sizes(monkeypatch) -> list[int]:
    """The batch sizes the per-module backend records (not the two-row probe of ``row_groups.per_sample``,
    which records through ``_record``)."""
    sizes: list[int] = []
    original = per_module.PerModuleBackend.record

    def record(self, batch):
        sizes.append(batch.size)
        return original(self, batch)

    monkeypatch.setattr(per_module.PerModuleBackend, "record", record)
    return sizes


def _row_budget(monkeypatch, rows: int) -> None:
    """A row-group budget of ``rows`` samples: every sample counts one number per pulled-back vector, and
    one output number (so 1·(1 + 1) = 2 numbers in a pull-back of all of them)."""
    monkeypatch.setattr(row_groups, "per_sample", lambda batch, model, record: (1.0, 1))
    monkeypatch.setattr(row_groups, "ROW_GROUP_ELEMENTS", rows)
    monkeypatch.setattr(row_groups, "WHOLE_GROUP_ELEMENTS", 2 * rows)


@pytest.mark.parametrize("rows", [1, 3], ids=["groups-of-1", "groups-of-2"])
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_exact_fisher_in_row_groups_equals_the_oracle(case, family, rows, monkeypatch, recorded_sizes) -> None:
    res = _oracle(case, family)
    n = len(res["x"])
    # A budget of ``rows`` samples: ⌈4/1⌉ = 4 groups of one row, or ⌈4/3⌉ = 2 groups of two rows.
    _row_budget(monkeypatch, rows)
    for structure in ("full", "diag", "trace", "blocks"):
        recorded_sizes.clear()
        got = torchfim.fisher(res["model"], res["x"], family=family, structure=structure, backend="modules",
                              **_kwargs(case, res))
        _close(got, _view(res["exact"], structure, res["model"]), 1e-10)
        size = 1 if rows == 1 else 2
        assert recorded_sizes.count(size) >= n // size and n not in recorded_sizes, recorded_sizes


@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_variances_and_bounds_in_row_groups_equal_the_oracle(case, family, monkeypatch, recorded_sizes) -> None:
    """``test_engine_oracles.test_variances`` (score and Hessian variances, the bound) in groups of one row."""
    _row_budget(monkeypatch, 1)
    engine_oracles.test_variances(case, family, "modules")
    assert set(recorded_sizes) == {1}, recorded_sizes


@pytest.mark.parametrize("case_name,family", COMBINED_PAIRS, ids=COMBINED_IDS)
def test_covariance_and_combined_variance_in_row_groups_equal_the_oracle(
    case_name, family, monkeypatch, recorded_sizes
) -> None:
    """The covariance and combined-variance oracle tests of ``test_combined`` in groups of one row."""
    _row_budget(monkeypatch, 1)
    combined_oracles.test_covariance_matches_oracle(case_name, family, "modules")
    combined_oracles.test_combined_variance_matches_oracle_and_beats_both(case_name, family)
    assert set(recorded_sizes) == {1}, recorded_sizes


@pytest.fixture
def one_row_steps(monkeypatch) -> None:
    """Inside a recorded mini-batch, every loop over its rows takes them one at a time."""
    for module in (backend, functional, per_module, variance, covariance):
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", 1)


@pytest.mark.parametrize("backend_name", ["modules", "functional"])
def test_masked_positions_in_steps_of_one_row_equal_the_oracle(backend_name, one_row_steps) -> None:
    """A position mask covers the whole mini-batch, each step of rows reads its own rows of it (before: "the
    Positions mask covers 4 inputs but the outputs have 1", from ``fisher_variance(structure="diag")`` of a
    language model on 64 sequences)."""
    engine_oracles.test_exact_every_structure(BY_NAME["tokens"], "categorical", backend_name)
    engine_oracles.test_variances(BY_NAME["tokens"], "categorical", backend_name)
    combined_oracles.test_covariance_matches_oracle("tokens", "categorical", backend_name)
    if backend_name == "modules":
        combined_oracles.test_combined_variance_matches_oracle_and_beats_both("tokens", "categorical")


def test_row_groups_cover_the_batch_in_order_in_nearly_equal_groups(monkeypatch) -> None:
    case = BY_NAME["tanh_mlp"]
    model, x = case.build(3), case.inputs(7)
    with engine_pass(model, "modules") as one:
        batch = make_batch(x, None, one.view.device, one.view.dtype)
        taps, width = row_groups.per_sample(batch, model, lambda part: one.backend._record(part, clone=False))
        monkeypatch.setattr(row_groups, "ROW_GROUP_ELEMENTS", int(2.5 * taps))
        assert one.backend.row_groups(batch) == [slice(0, 3), slice(3, 6), slice(6, 7)]  # ⌈7 / 2.5⌉ = 3 groups
        monkeypatch.setattr(row_groups, "ROW_GROUP_ELEMENTS", int(7 * taps))
        assert one.backend.row_groups(batch) == [slice(0, 7)]  # within the budget: the batch as it is
        # Pulling back all 3 output numbers of each input together: 3·(3 + taps) numbers per input.
        assert width == 3
        monkeypatch.setattr(row_groups, "WHOLE_GROUP_ELEMENTS", int(3.5 * 3 * (3 + taps)))
        assert one.backend.row_groups(batch, whole=True) == [slice(0, 4), slice(4, 7)]  # ⌈7 / 3.5⌉ = 2 groups
        assert one.backend.row_groups(batch) == [slice(0, 7)]


def test_a_mask_tensor_of_the_wrong_size_is_refused_as_without_groups(monkeypatch) -> None:
    res = _oracle(BY_NAME["tokens"], "categorical")
    wrong = torch.cat([res["mask"], res["mask"][:1]])  # one row too many
    monkeypatch.setattr(row_groups, "ROW_GROUP_ELEMENTS", 1)
    with pytest.raises(torchfim.TorchfimError, match="mask"):
        torchfim.fisher(res["model"], res["x"], backend="modules", mask=wrong)


def test_estimators_that_draw_labels_record_the_batch_whole(monkeypatch, recorded_sizes) -> None:
    """Row groups would change the order of the label draws: the estimators that draw keep the batch whole."""
    case = BY_NAME["tanh_mlp"]
    model, x = case.build(3), case.inputs(6)
    monkeypatch.setattr(row_groups, "ROW_GROUP_ELEMENTS", 1)
    for estimator in ("score", "hessian", "combined"):
        recorded_sizes.clear()
        torchfim.fisher(model, x, estimator=estimator, generator=torch.Generator().manual_seed(0))
        assert 1 not in recorded_sizes and 6 in recorded_sizes, (estimator, recorded_sizes)


@pytest.fixture
def one_input_per_pull_back(monkeypatch) -> list[int]:
    """Every backend answers that one input's whole-output pull-back is all that fits in memory; returns the
    sizes the engine loop records (both backends, through ``loop.recorded``)."""
    sizes: list[int] = []
    record = loop.recorded

    def spy(view, engine, part):
        sizes.append(part.size)
        return record(view, engine, part)

    monkeypatch.setattr(loop, "recorded", spy)
    monkeypatch.setattr(backend.Backend, "rows_for_whole_outputs", lambda self, rec, grams=False: 1)
    return sizes


@pytest.mark.parametrize("backend_name", ["modules", "functional"])
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_closed_forms_cut_to_what_fits_in_memory_equal_the_oracle(case, family, backend_name,
                                                                  one_input_per_pull_back) -> None:
    """Where a mini-batch's whole-output pull-back would not fit, the loop records it again one input at a
    time (before: "pass mini-batches of at most 1 inputs"); the score variances, the Hessian variances
    (never cut: they pull back no whole output) and the bounds still equal the brute-force oracles."""
    n = len(_oracle(case, family)["x"])
    engine_oracles.test_variances(case, family, backend_name)
    assert 1 in one_input_per_pull_back and n in one_input_per_pull_back, one_input_per_pull_back


@pytest.mark.parametrize("case_name,family", COMBINED_PAIRS, ids=COMBINED_IDS)
def test_covariance_and_combined_variance_cut_to_what_fits_equal_the_oracle(case_name, family,
                                                                            one_input_per_pull_back) -> None:
    combined_oracles.test_covariance_matches_oracle(case_name, family, "modules")
    combined_oracles.test_combined_variance_matches_oracle_and_beats_both(case_name, family)
    assert 1 in one_input_per_pull_back, one_input_per_pull_back


@pytest.mark.parametrize("grams", [False, True], ids=["diag", "trace"])
def test_the_cut_is_the_memory_check_s_size_in_nearly_equal_groups(grams, monkeypatch, recorded_sizes) -> None:
    """With the free memory set to 2.5/7 of what 7 inputs' whole-output pull-back needs, the check allows
    ⌊7 · 2.5 / 7⌋ = 2 inputs at a time: 7 inputs are recorded whole, then again as 2 + 2 + 2 + 1, and the
    variance is unchanged."""
    from torchfim import _memory

    case = BY_NAME["tanh_mlp"]
    model, x = case.build(3), case.inputs(7)
    structure = "trace" if grams else "diag"
    want = torchfim.fisher_variance(model, x, structure=structure, backend="modules")
    with engine_pass(model, "modules") as one:
        rec = one.backend.record(make_batch(x, None, one.view.device, one.view.dtype))
        width, vector, itemsize = rec.values.shape[1], one.backend.vector_elements(rec), rec.values.element_size()
    needed = 2 * itemsize * backend.whole_output_entries(width, vector, 7 if grams else 0)  # with a working copy
    monkeypatch.setattr(backend, "WHOLE_OUTPUTS_UNCHECKED", 0)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2.5 / 7 * needed)
    recorded_sizes.clear()
    got = torchfim.fisher_variance(model, x, structure=structure, backend="modules")
    _close(got, want, 1e-12)
    assert recorded_sizes == [7, 2, 2, 2, 1], recorded_sizes
