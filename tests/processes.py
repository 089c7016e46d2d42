"""Shared set-up of the tests that run several ``torch.distributed`` processes (gloo, CPU, spawned)."""

from __future__ import annotations

import contextlib
import gc
import os
import sys
from collections.abc import Callable, Iterator

import pytest
import torch
import torch.multiprocessing as mp


def over_loopback() -> None:
    """Let gloo talk over loopback: no network interface or resolvable host needed (call in each process)."""
    if sys.platform != "win32":
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")


def _then_collected(rank: int, rank_function: Callable[..., None], args: tuple) -> None:
    """``rank_function(rank, *args)``, then a garbage collection while the interpreter is whole: what a cycle keeps
    holding a process group (a ``DistributedDataParallel``'s reducer) goes now, not during interpreter teardown,
    where gloo's threads can abort the process ("terminate called without an active exception": seen in one full
    run in six on this machine, in a child process at exit; the cause is likely, not proven)."""
    rank_function(rank, *args)
    gc.collect()


def run_processes(rank_function: Callable[..., None], args: tuple, world: int, minutes: float = 2.0) -> None:
    """``rank_function(rank, *args)`` in ``world`` spawned processes; a collective that never matches would hang,
    so the test fails when they have not finished within ``minutes``."""
    context = mp.start_processes(_then_collected, args=(rank_function, args), nprocs=world, join=False,
                                 start_method="spawn")
    for _ in range(int(minutes * 120)):
        if context.join(timeout=0.5):
            return
    for process in context.processes:
        process.kill()
    pytest.fail(f"the {world} processes did not finish within {minutes:g} minutes")


@contextlib.contextmanager
def one_process_group() -> Iterator[None]:
    """A one-process gloo group in this process, on an in-memory store (no network), destroyed at the end."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()
