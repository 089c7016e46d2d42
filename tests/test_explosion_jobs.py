"""`--jobs` of `torchfim reproduce explosion`: at most one process per CPU and per run still to do, however large
the number asked for (the pool is replaced by one that runs each run here and records its size), and timings.json
records how many ran at once beside the number asked for."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
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
        def __init__(self, max_workers: int, mp_context: object = None, **options: object) -> None:
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


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (read from /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the processes from /proc")
def test_the_pools_processes_end_when_the_study_is_killed(tmp_path: Path):
    """A study with --jobs killed (SIGKILL, or SIGTERM as `timeout` and batch schedulers send: no cleanup runs) left
    its pool's processes behind, waiting for ever on a task queue they hold open themselves (400 MB each, in a
    review); they now end within seconds of their parent."""
    code = (f"from torchfim.experiments import explosion as E; E.run({str(tmp_path)!r}, E.TINY, master_seed=3, jobs=2, "
            "progress=False)")
    root = str(Path(__file__).resolve().parents[1])  # this checkout's torchfim
    study_process = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": root})
    workers: list[int] = []
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and time.monotonic() < deadline and study_process.poll() is None:
            time.sleep(0.2)
            workers = [p for p in _children(study_process.pid) if "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        study_process.send_signal(signal.SIGTERM)
        study_process.wait()
        assert len(workers) == 2
        deadline = time.monotonic() + 15
        while any(_alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not any(_alive(p) for p in workers)
    finally:
        study_process.kill()
        for p in workers:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
