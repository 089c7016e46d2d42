"""Smoke and agreement test of the benchmark harness (benchmarks/run.py and its package
benchmarks/suite) at tiny sizes.

The end-to-end run needs the peers (``pip install -c constraints.txt -e '.[bench]'``) and is
skipped without them; the agreement logic, the registry and the markdown rendering are tested
regardless.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One ``run.py --quick`` in a fresh process; skipped when a peer or scikit-learn is missing."""
    for module in ("sklearn", "backpack", "nngeometry", "curvlinops"):
        pytest.importorskip(module, reason=f"{module} not installed: pip install -c constraints.txt -e '.[bench]'")
    out = tmp_path_factory.mktemp("bench") / "quick.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--no-progress", "--no-sweep", "--json", str(out)],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    main = json.loads(out.read_text())
    details = json.loads(out.with_name("quick.details.json").read_text())
    return main, details


def test_quick_run_writes_the_mapping(suite, quick_run):
    main, details = quick_run
    expected = set(suite["workloads"].WORKLOADS) - set(details["skipped"])
    assert set(main) == expected
    assert set(details["skipped"]) <= {"penalty-step-mlp"}  # only when torchfim.train is missing
    for workload, timings in main.items():
        assert timings, workload
        assert set(timings) <= set(suite["workloads"].CONTENDERS), workload
        for contender, seconds in timings.items():
            assert isinstance(seconds, float) and seconds > 0, (workload, contender)
        assert set(details["ratios"][workload]) == set(timings)
        assert details["ratios"][workload][details["ratio_reference"][workload]] == pytest.approx(1.0)
    # every peer that can compute a workload is there, and nothing failed
    for workload in ("diag-score-mlp", "diag-score-cnn", "diag-exact-mlp", "diag-exact-cnn", "trace-exact-mlp"):
        assert {"floor", "torchfim", "backpack", "nngeometry"} <= set(main[workload]), workload
        assert "curvlinops" in details["left_out"][workload]
    assert {"torchfim", "backpack", "nngeometry", "curvlinops"} <= set(main["full-exact-mlps"])
    assert not any(details["errors"].values()), details["errors"]
    assert [t["target"] for t in details["targets"]]


def test_quick_run_results_agree(quick_run):
    _, details = quick_run
    assert not any(details["flagged"].values()), details["flagged"]
    for workload, errors in details["agreement"].items():
        for contender, err in errors.items():
            assert err < 1e-4, (workload, contender, err)
    for workload, check in details["checks"].items():
        assert check["passed"], (workload, check)
    # the stochastic score estimator is compared entry by entry on torchfim's own labels
    for workload in ("diag-score-mlp", "diag-score-cnn"):
        assert any("labels aligned" in note for note in details["notes"][workload]), details["notes"][workload]


def test_markdown_renders_from_the_run(suite, quick_run, tmp_path):
    main, details = quick_run
    text = suite["render"].render_markdown(main, details, tmp_path / "performance.md", {})
    for heading in ("## Results", "## Targets", "## Agreement", "## Rerun"):
        assert heading in text
    for workload in main:
        assert f"`{workload}`" in text


def test_agreement_flags_the_odd_one_out(suite):
    agreement, rel_error = suite["agreement"].agreement, suite["agreement"].rel_error
    x = torch.linspace(1, 2, 50)
    # a peer off by 1 %: flagged; one off by 1e-7: agrees
    pivot, errors, flagged = agreement({"torchfim": x, "backpack": x * (1 + 1e-7), "nngeometry": x * 1.01}, 1e-4)
    assert pivot == "torchfim" and set(flagged) == {"nngeometry"} and errors["backpack"] < 1e-6
    # torchfim alone against two peers that agree: torchfim is the one flagged
    pivot, _, flagged = agreement({"torchfim": x * 1.01, "backpack": x, "nngeometry": x}, 1e-4)
    assert pivot in {"backpack", "nngeometry"} and set(flagged) == {"torchfim"}
    # non-finite or mis-shaped results never agree
    assert rel_error(torch.tensor([float("nan")]), torch.tensor([1.0])) == float("inf")
    assert rel_error(torch.ones(3), torch.ones(4)) == float("inf")


def test_sweep_point_reports_time_and_memory(suite):
    spec = {"axis": "width", "width": 8, "classes": 10, "batch": 16, "n": 32, "data": "random", "threads": 1}
    threads = torch.get_num_threads()
    try:
        point = suite["sweep"].sweep_point(spec)  # in-process here; run.py gives each point its own process
    finally:
        torch.set_num_threads(threads)
    assert point["P"] == 64 * 8 + 8 + 8 * 8 + 8 + 8 * 10 + 10
    assert point["seconds"] > 0 and point["peak_mib"] >= 0
    assert point["memory_method"] in ("VmHWM after reset", "ru_maxrss")


def test_the_registry_is_the_command_lines_list_of_workloads():
    """``--workloads`` accepts exactly the registry's names: an unknown one is refused, naming them all."""
    proc = subprocess.run([sys.executable, str(SCRIPT), "--workloads", "floor,no-such-workload", "--no-progress"],
                          check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no-such-workload" in proc.stderr and "diag-exact-cnn, full-exact-mlps" in proc.stderr


def test_every_timed_call_keeps_its_turn_and_a_rerender_recomputes_the_ratios(suite, quick_run, tmp_path):
    main, details = quick_run
    for workload, samples in details["samples"].items():
        assert {c: len(s) for c, s in details["turns"][workload].items()} == {c: len(s) for c, s in samples.items()}
    stale = {**details, "ratios": {w: {c: 99.0 for c in main[w]} for w in main}}
    (tmp_path / "run.json").write_text(json.dumps(main))
    (tmp_path / "run.details.json").write_text(json.dumps(stale))
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--render", str(tmp_path / "run.json"), "--markdown", str(tmp_path / "p.md")],
        check=False, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = (tmp_path / "p.md").read_text()
    assert "(99.00×)" not in text
    fd = suite["pairing"].paired_ratio(details, "penalty-step-mlp", "torchfim-fd", "plain")
    assert f"({fd:.2f}×)" in text
