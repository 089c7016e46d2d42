"""benchmarks/regression.py: the same-run comparison with the code before the engine."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def regression():
    spec = importlib.util.spec_from_file_location("regression", ROOT / "benchmarks" / "regression.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quotient_is_the_median_over_rounds_of_now_over_before(regression, monkeypatch) -> None:
    """Rounds give now ÷ before = 1.2, 1.0 and 1.05: the median is 1.05, met; a workload 30 % slower
    in every round is missed; the table shows each round's ratios to the floor."""
    rounds = {"a": iter([(2.4, 2.0), (2.0, 2.0), (2.1, 2.0)]), "b": itertools.repeat((1.3, 1.0))}

    def one(tree: Path, name: str) -> dict[str, float]:
        now, before = next(rounds[name])
        return {"floor": 0.5, "now": 0.5 * now, "before": 0.5 * before}

    monkeypatch.setattr(regression, "export", lambda commit, into: into)
    monkeypatch.setattr(regression, "run_one", one)
    results = regression.compare("abc", 3, ["a", "b"])
    assert results["a"]["quotient"] == pytest.approx(1.05) and results["b"]["quotient"] == pytest.approx(1.3)
    table = regression.markdown(results, "abc", 3)
    assert "| `a` | 2.40, 2.00, 2.10 | 2.00, 2.00, 2.00 | 1.05 | met |" in table
    assert "| `b` |" in table and "1.30 | **missed** |" in table


def test_export_and_one_worker_time_a_tree(regression, tmp_path) -> None:
    """``git archive`` puts the commit's package in a folder; a worker imports it as ``torchfim_before``
    beside this checkout's torchfim and times the floor and both calls."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tree = regression.export("HEAD", tmp_path)
    assert (tree / "torchfim" / "__init__.py").exists()
    times = regression.run_one(tree, "diag-score-mlp")
    assert set(times) == {"floor", "now", "before"} and min(times.values()) > 0
    assert 0.5 < times["now"] / times["before"] < 2.0  # the same code twice
