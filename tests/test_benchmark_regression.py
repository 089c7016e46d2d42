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


def test_quotient_is_the_median_over_rounds_of_the_two_ratios(regression, monkeypatch, tmp_path) -> None:
    """Rounds give now/before ratios 1.2, 1.0 and 1.05 (in either tree order): the median is 1.05, met;
    a workload 30 % slower in every round is missed."""
    ratios = {("now", "a"): iter([2.4, 2.0, 2.1]), ("before", "a"): iter([2.0, 2.0, 2.0]),
              ("now", "b"): itertools.repeat(1.3), ("before", "b"): itertools.repeat(1.0)}
    monkeypatch.setattr(regression, "export", lambda commit, into: Path("before-tree"))
    monkeypatch.setattr(regression, "run_one", lambda tree, name: {
        "floor": 1.0, "call": next(ratios[("before" if tree == Path("before-tree") else "now", name)])})
    results = regression.compare("abc", 3, ["a", "b"])
    assert results["a"]["quotient"] == pytest.approx(1.05) and results["b"]["quotient"] == pytest.approx(1.3)
    table = regression.markdown(results, "abc", 3)
    assert "| `a` | 2.40, 2.00, 2.10 | 2.00, 2.00, 2.00 | 1.05 | met |" in table
    assert "| `b` |" in table and "1.30 | **missed** |" in table


def test_export_and_one_worker_time_a_tree(regression, tmp_path) -> None:
    """``git archive`` puts the commit's package in a folder, and a worker imports torchfim from there and
    times the floor and the call (a worker importing another torchfim stops)."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    tree = regression.export("HEAD", tmp_path)
    assert (tree / "torchfim" / "__init__.py").exists()
    times = regression.run_one(tree, "diag-score-mlp")
    assert times["floor"] > 0 and times["call"] > times["floor"] * 0.5
