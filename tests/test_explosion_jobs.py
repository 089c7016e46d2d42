"""`--jobs` of `torchfim reproduce explosion`: at most one process per CPU and per run still to do, however large
the number asked for (the pool is replaced by one that runs each run here and records its size), and timings.json
records how many ran at once beside the number asked for."""

from __future__ import annotations

import concurrent.futures
import json
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from torchfim.experiments import explosion as E
from torchfim.experiments.explosion import study

TINY = E.TINY


@pytest.fixture
def sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the process pools the study starts; their runs are done in this process."""
    started: list[int] = []

    class Pool:
        def __init__(self, max_workers: int, mp_context: object = None) -> None:
            started.append(max_workers)

        def submit(self, fn, *args):
            future: concurrent.futures.Future = concurrent.futures.Future()
            future.set_result(fn(*args))
            return future

        def shutdown(self, wait: bool = True, cancel_futures: bool = False) -> None:
            pass

    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", Pool)
    return started


def test_more_jobs_than_runs_start_one_process_per_run(sizes, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(study, "_cpus", lambda: 64, raising=False)
    expected = E.run(tmp_path, TINY, master_seed=3, jobs=10**6, progress=False)
    assert sizes and max(sizes) <= E.count_runs(TINY) < 64  # before: a pool of 10⁶ processes
    sizes.clear()
    for path in sorted((tmp_path / "runs").glob("*.json"))[:2]:
        path.unlink()
    assert E.run(tmp_path, TINY, master_seed=3, resume=True, jobs=10**6, progress=False) == expected
    assert sizes == [2]
    last = json.loads((tmp_path / "timings.json").read_text())["invocations"][-1]
    assert (last["jobs"], last["processes"]) == (10**6, 2)  # the processes used, beside the number asked for


def test_more_jobs_than_cpus_start_one_process_per_cpu(sizes, monkeypatch, tmp_path: Path):
    monkeypatch.setattr(study, "_cpus", lambda: 2, raising=False)
    assert E.run(tmp_path, TINY, master_seed=3, jobs=8, progress=False, max_runs=3) is None
    assert sizes == [2]
    last = json.loads((tmp_path / "timings.json").read_text())["invocations"][-1]
    assert (last["jobs"], last["processes"]) == (8, 2)


def test_one_job_records_one_process(tmp_path: Path):
    assert E.run(tmp_path, TINY, master_seed=3, jobs=1, progress=False, max_runs=1) is None
    assert json.loads((tmp_path / "timings.json").read_text())["invocations"][-1]["processes"] == 1
