"""Shared fixtures of the tests; the model factories come from the one list of cases (cases.py)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

# The tests use tiny models, for which thread start-up costs more than it saves.
torch.set_num_threads(1)

from cases import BY_NAME, cnn_inputs, mlp_inputs, relu_mlp, strided_cnn, tanh_mlp  # noqa: E402, F401 (re-exported)
from oracles import FAMILY_WIDTH  # noqa: E402

FAMILIES = tuple(FAMILY_WIDTH)


# The factories are those of the one list of test cases (cases.py); these two run the first-wave
# oracle tests of test_fisher.py and test_variance_closed_forms.py.
MODELS = {name: (BY_NAME[name].build, BY_NAME[name].inputs) for name in ("tanh_mlp", "strided_cnn")}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=tuple(MODELS))
def model_and_inputs(request: pytest.FixtureRequest, family: str) -> tuple[nn.Module, torch.Tensor]:
    make_model, make_inputs = MODELS[request.param]
    return make_model(FAMILY_WIDTH[family]), make_inputs(6)


class BenchSuite:
    """The modules of the benchmark package (benchmarks/suite) by name, imported as run.py imports them."""

    def __getitem__(self, name: str):
        return importlib.import_module(f"suite.{name}")


@pytest.fixture(scope="module")
def suite():
    """:class:`BenchSuite`, with benchmarks/ on ``sys.path`` for the module's tests."""
    pytest.importorskip("tqdm")
    bench = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, bench)
    try:
        yield BenchSuite()
    finally:
        sys.path.remove(bench)
