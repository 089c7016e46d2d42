"""``FisherTraceMonitor`` in each of two processes (``torch.distributed``, gloo, CPU) given the same
``csv_path`` and ``tensorboard_dir``: each process writes its own files (the first the paths given, the
second ``trace.rank1.csv`` and ``tb/rank1``), and each file holds exactly its process's records, once.

Oracle: the records each process returns; read back from the CSV files (exact repr floats) and from
TensorBoard's event files (``EventAccumulator``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from torchfim.train import FisherTraceMonitor, read_trace_csv

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
WORLD, STEPS = 2, 4


def _rank(rank: int, root: str) -> None:
    if sys.platform != "win32":  # the ranks talk over loopback: no network interface or resolvable host needed
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double())
    held = torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(rank))  # its own share
    monitor = FisherTraceMonitor(model, held, every=1, csv_path=f"{root}/trace.csv", tensorboard_dir=f"{root}/tb")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(10 + rank)
    for step in range(STEPS):
        x, y = torch.randn(8, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        monitor.step(step)
    monitor.close()
    torch.save({"records": [(r.step, r.trace, r.stderr) for r in monitor.history],
                "paths": (str(monitor.csv_path), str(monitor.tensorboard_dir))}, f"{root}/records.{rank}")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("monitor-processes")
    context = mp.start_processes(_rank, args=(str(root),), nprocs=WORLD, join=False, start_method="spawn")
    for _ in range(240):  # a collective that never matches would hang: give up after 2 minutes
        if context.join(timeout=0.5):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail("the two processes did not finish within 2 minutes")
    return root


def test_each_process_writes_its_own_csv_file(ran: Path) -> None:
    saved = [torch.load(ran / f"records.{rank}") for rank in range(WORLD)]
    assert [s["paths"][0] for s in saved] == [str(ran / "trace.csv"), str(ran / "trace.rank1.csv")]
    for s in saved:
        assert [(r.step, r.trace, r.stderr) for r in read_trace_csv(s["paths"][0])] == s["records"]
        assert [r[0] for r in s["records"]] == list(range(STEPS))
    assert saved[0]["records"] != saved[1]["records"]  # their own held inputs


def test_each_process_logs_its_own_tensorboard_run(ran: Path) -> None:
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    saved = [torch.load(ran / f"records.{rank}") for rank in range(WORLD)]
    assert [s["paths"][1] for s in saved] == [str(ran / "tb"), str(ran / "tb" / "rank1")]
    for s in saved:
        events = accumulator.EventAccumulator(s["paths"][1])
        events.Reload()
        logged = [(e.step, e.value) for e in events.Scalars("fisher/trace")]
        assert [(step, pytest.approx(trace, rel=1e-6)) for step, trace, _ in s["records"]] == logged
