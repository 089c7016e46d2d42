"""Sweeps over parameter directions for second derivatives (``torchfim.engine.directions``).

Chunks are sized by memory from the numbers the forward produces per input; cutting the sweep
differently must not change any result, so the second-order oracle tests run again with chunks of
one direction. A long sweep warns once per call with its estimate, and ``progress=True`` shows a bar.
"""

from __future__ import annotations

import warnings

import pytest
import test_combined as combined_oracles  # imported as modules: their test functions are not collected twice
import test_engine_oracles as engine_oracles
import test_fisher as fisher_oracles
import torch
from cases import BY_NAME
from conftest import FAMILIES, MODELS
from test_combined import IDS as COMBINED_IDS
from test_combined import PAIRS as COMBINED_PAIRS
from test_engine_oracles import IDS, PAIRS
from torch import nn

import torchfim
from torchfim.engine import backend as backend_module
from torchfim.engine import directions
from torchfim.engine.batch import make_batch
from torchfim.engine.session import engine_pass

# The encoder and the GRU are left out: their directions, one pass each (and for the GRU one input at a
# time), would take minutes, and how a sweep is cut does not depend on the model (their default
# chunks are checked in test_engine_oracles). The residual block's 109 directions take 7 s per family: it runs
# with the categorical family alone (the other families' output Hessians are cut the same way on every other case).
SLOW = ("encoder", "gru")
ONE_FAMILY = ("residual_bn",)


def _swept(case, family) -> bool:
    return case.name not in SLOW and (case.name not in ONE_FAMILY or family == "categorical")


SECOND_ORDER = [(c, f) for c, f in PAIRS if _swept(c, f)]
SECOND_ORDER_IDS = [i for (c, f), i in zip(PAIRS, IDS) if _swept(c, f)]


class Residual(nn.Module):
    """Inline torch functions (relu, the sum) that no module hook would see."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) + x


def _chunk_of(model: nn.Module, x: torch.Tensor) -> tuple[int, int, float]:
    """Directions per chunk, the parameter count and the forward numbers per input."""
    with engine_pass(model, "modules") as one:
        batch = make_batch(x, None, one.view.device, one.view.dtype)
        return directions.direction_chunk(one.view, batch), one.view.layout.num_params, \
            directions.forward_numbers(one.view, batch)


@pytest.fixture
def direction_counts(monkeypatch) -> list[int]:
    """Chunks of one direction, and the number of directions every second-order call was given."""
    monkeypatch.setattr(directions, "DIRECTION_ELEMENTS", 1)
    counts: list[int] = []
    for name in ("output_hessian_diagonals", "hessian_columns", "output_hessian_columns"):
        for cls in (backend_module.Backend.__subclasses__()):
            original = getattr(cls, name)

            def spy(self, batch, *args, _original=original):
                counts.append(len(args[-1]))
                return _original(self, batch, *args)

            monkeypatch.setattr(cls, name, spy)
    return counts


def test_forward_numbers_count_every_torch_functions_outputs() -> None:
    mlp = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    assert _chunk_of(mlp, torch.randn(5, 4, dtype=torch.float64))[2] == 3 + 3 + 2
    # The relu and the residual sum are torch functions outside any module's hook: 4 + 4 + 4.
    assert _chunk_of(Residual().double(), torch.randn(3, 4, dtype=torch.float64))[2] == 12


def test_chunks_follow_the_memory_budget(monkeypatch) -> None:
    mlp = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    per_direction = directions.FOOTPRINT * (23 + 5 * 8)  # P = 23 parameters, 8 numbers per input
    monkeypatch.setattr(directions, "DIRECTION_ELEMENTS", 10 * per_direction + 3)
    assert _chunk_of(mlp, x)[:2] == (10, 23)
    monkeypatch.setattr(directions, "DIRECTION_ELEMENTS", per_direction - 1)
    assert _chunk_of(mlp, x)[0] == 1  # never below one direction
    monkeypatch.setattr(directions, "DIRECTION_ELEMENTS", 2**40)
    assert _chunk_of(mlp, x)[0] == directions.MOST_DIRECTIONS


def test_a_conv_nets_chunk_counts_its_activations() -> None:
    """The old sizing (``P`` or ``B·C·64`` numbers per direction) gave 256 directions here; each carries
    the batch's 16·16·16·2 activations per image."""
    net = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 10))
    chunk, params, numbers = _chunk_of(net, torch.randn(64, 3, 16, 16))
    assert numbers >= 3 * 16 * 16 * 16
    assert chunk == directions.DIRECTION_ELEMENTS // (directions.FOOTPRINT * (params + 64 * numbers)) < 256


@pytest.mark.parametrize("case,family", SECOND_ORDER, ids=SECOND_ORDER_IDS)
def test_hessian_variances_in_chunks_of_one_direction_equal_the_oracle(case, family, direction_counts) -> None:
    """``test_engine_oracles.test_variances`` with every direction on its own (both backends share the sweep)."""
    engine_oracles.test_variances(case, family, "modules")
    assert set(direction_counts) <= {1}, direction_counts


@pytest.mark.parametrize("case_name,family", COMBINED_PAIRS, ids=COMBINED_IDS)
def test_covariance_in_chunks_of_one_direction_equals_the_oracle(case_name, family, direction_counts) -> None:
    combined_oracles.test_covariance_matches_oracle(case_name, family, "modules")
    assert direction_counts and set(direction_counts) == {1}, direction_counts


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("model_name", tuple(MODELS))
def test_hessian_estimator_in_chunks_of_one_direction_matches_its_formula(model_name, family, direction_counts) -> None:
    """Î2 in every structure: the full and blocks structures take Hessian columns one at a time."""
    fisher_oracles.test_hessian_matches_formula_given_its_labels(model_name, family)
    assert direction_counts and set(direction_counts) == {1}, direction_counts


def test_a_long_sweep_warns_once_per_call_with_its_estimate(monkeypatch) -> None:
    case = BY_NAME["strided_cnn"]
    model, x = case.build(3), case.inputs(6)
    monkeypatch.setattr(directions, "DIRECTION_ELEMENTS", 1)
    monkeypatch.setattr(directions, "LONG_SWEEP_S", 0.0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torchfim.fisher_variance(model, [x[:3], x[3:]], estimator="hessian", structure="diag")
    sweeps = [str(w.message) for w in seen if "forward-mode pass" in str(w.message)]
    assert len(sweeps) == 1, sweeps  # two mini-batches, one warning
    assert "one forward-mode pass each over 3 inputs" in sweeps[0]
    assert "the score estimator and its variances need first derivatives" in sweeps[0]
    monkeypatch.setattr(directions, "LONG_SWEEP_S", 1e9)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torchfim.fisher_variance(model, x, estimator="hessian", structure="diag")
    assert not [w for w in seen if "forward-mode pass" in str(w.message)]


def test_progress_shows_a_bar_over_the_directions(capfd) -> None:
    case = BY_NAME["strided_cnn"]
    torchfim.fisher_variance(case.build(3), case.inputs(4), estimator="hessian", structure="diag", progress=True)
    assert "output-Hessian diagonals" in capfd.readouterr().err


def test_no_bar_over_an_empty_sweep(capfd) -> None:
    """A model whose dense layers give their Hessian diagonals without a sweep has no directions left: no bar of
    "0param" beside the one over the inputs."""
    case = BY_NAME["tanh_mlp"]
    torchfim.fisher(case.build(3), case.inputs(4), estimator="hessian", structure="diag", progress=True)
    err = capfd.readouterr().err
    assert "fisher[hessian]" in err and "output-Hessian diagonals" not in err


@pytest.mark.parametrize("call", ["compare_estimators", "samples_needed"])
def test_the_planning_calls_take_progress_as_their_warning_advises(call: str, capfd) -> None:
    """A long sweep's warning advises progress=True, which compare_estimators and samples_needed did not take (a
    trial: 'about 1,700 hours', and no way to watch them): they pass it on, and the result is the same."""
    case = BY_NAME["strided_cnn"]
    model, x = case.build(3), case.inputs(4)
    kwargs = {"estimator": "hessian", "structure": "diag"} if call == "samples_needed" else {}
    quiet = getattr(torchfim, call)(model, x, **kwargs)
    capfd.readouterr()
    shown = getattr(torchfim, call)(model, x, progress=True, **kwargs)
    assert "output-Hessian diagonals" in capfd.readouterr().err
    assert shown == quiet


@pytest.mark.parametrize("call", [torchfim.fisher, torchfim.fisher_variance])
def test_hessian_diagonals_record_a_batch_once_for_its_outputs_and_once_for_its_dense_layers(call, monkeypatch) -> None:
    """The unit-wise Hessian diagonals ask the batch's factorable layers several questions (which
    parameters they leave out, then their terms); the per-module backend records them once."""
    from torchfim.engine.per_module import PerModuleBackend

    counts: dict[int, int] = {}
    record = PerModuleBackend.record

    def counted(self, batch):
        counts[id(batch)] = counts.get(id(batch), 0) + 1
        return record(self, batch)

    monkeypatch.setattr(PerModuleBackend, "record", counted)
    case = BY_NAME["tanh_mlp"]
    call(case.build(3), case.inputs(8), estimator="hessian", structure="diag")
    assert list(counts.values()) == [2]
