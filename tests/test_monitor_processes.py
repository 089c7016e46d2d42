"""``FisherTraceMonitor`` in each of two processes (``torch.distributed``, gloo, CPU) given the same
``csv_path`` and ``tensorboard_dir``: each process writes its own files (the first the paths given, the
second ``trace.rank1.csv`` and ``tb/rank1``), and each file holds exactly its process's records, once.

Oracle: the records each process returns; read back from the CSV files (exact repr floats) and from
TensorBoard's event files (``EventAccumulator``).
"""

from __future__ import annotations

import copy
import datetime
import math
import warnings
from pathlib import Path

import pytest
import torch
from processes import over_loopback, run_processes
from torch import nn

import torchfim.families
from torchfim import TorchfimError
from torchfim.train import FisherTraceMonitor, read_trace_csv
from torchfim.train.monitor import DEFAULT_SEED

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
WORLD, STEPS = 2, 4
HELD = torch.randn(33, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))  # shares of 17 and 16
OPTIONS = {"plain": {}, "subset": {"subset": 10}, "control_variate": {"control_variate": True},
           "both": {"subset": 10, "control_variate": True}}


def _rank(rank: int, root: str) -> None:
    over_loopback()
    # A process left waiting in a collective fails after a minute rather than gloo's default half hour
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=60))
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
                "paths": (str(monitor.csv_path), str(monitor.tensorboard_dir)),
                "shared": _shared_measurements(model, root), "refusals": _refusals(model),
                "unlike": _unlike_monitors(model.module), "small": _small_held(model.module)}, f"{root}/records.{rank}")
    torch.distributed.destroy_process_group()


def _shared_measurements(model: nn.Module, root: str) -> dict:
    """For each option set: the records of ``across_processes=True`` monitors (the same held inputs on both
    processes) and the parameters at each measured step."""
    out = {}
    for name, options in OPTIONS.items():
        monitor = FisherTraceMonitor(model, HELD, every=1, across_processes=True, csv_path=f"{root}/{name}.csv",
                                     **options)
        params, g = [], torch.Generator().manual_seed(20)  # the same batches in both processes
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(STEPS):
            params.append([p.detach().clone() for p in model.module.parameters()])
            monitor.step(step)
            x, y = torch.randn(8, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (8,), generator=g)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        out[name] = {"records": [r.as_dict() for r in monitor.history], "params": params,
                     "csv": None if monitor.csv_path is None else str(monitor.csv_path)}
    return out


def _refusals(model: nn.Module) -> list[str]:
    """The errors of monitors whose processes hold other inputs or other weights, or seed their generators alike,
    and of shared measurements that fail in process 1 alone: a NaN weight there (before, process 0 waited for it
    in a collective until gloo's timeout), or every weight frozen there after the monitor was made, which stops it
    while the engine is built, before the first measurement's checks (before, process 0 waited in their
    collective)."""
    said = []
    rank = torch.distributed.get_rank()
    broken = copy.deepcopy(model.module)  # the module inside DDP: a copy of DDP itself would hold a second reducer
    if rank:
        with torch.no_grad():
            next(broken.parameters()).view(-1)[0] = float("nan")
    for model_, held, generator in ((model, HELD + rank, None), (model, HELD, torch.Generator().manual_seed(1)),
                                    (broken, HELD, None)):
        try:
            FisherTraceMonitor(model_, held, across_processes=True, generator=generator).measure(0)
        except TorchfimError as err:
            said.append(str(err))
    nudged = copy.deepcopy(model.module)  # a copy trained apart: one weight moved by 1e-3 in process 1
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-3 * rank
    try:
        FisherTraceMonitor(nudged, HELD, across_processes=True).measure(0)
    except TorchfimError as err:
        said.append(str(err))
    frozen = copy.deepcopy(model.module)
    monitor = FisherTraceMonitor(frozen, HELD, across_processes=True)
    frozen.requires_grad_(not rank)
    try:
        monitor.measure(0)
    except TorchfimError as err:
        said.append(str(err))
    return said


#: Held inputs, subset and n_samples of monitors whose smallest window is one input: finite where every window of
#: one input is its process's whole share and k ≥ 2 (True), else NaN.
WHOLE_SHARES = {"shares 2 and 1, windows of 2": (3, 3, 2, True), "shares of 1, windows of 1": (2, 2, 2, True),
                "one label": (3, 3, 1, False), "a window of 1 of 2": (3, 2, 2, False), "no subset": (2, None, 2, False)}


def _small_held(module: nn.Module) -> dict[str, str]:
    """What each process says of held sets too small to share: one input (process 1 gets none), and three (process
    1 gets one, a NaN standard error on every record). A processes trial: process 1 alone refused the first, and
    process 0 waited for it at its first measurement; it alone warned of the second, advising a subset."""
    said = {}
    try:
        FisherTraceMonitor(copy.deepcopy(module), HELD[:1], across_processes=True)
        said["one"] = "built"
    except TorchfimError as err:
        said["one"] = str(err)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        record = FisherTraceMonitor(copy.deepcopy(module), HELD[:3], across_processes=True).measure(0)
    said["three"] = " ".join(str(w.message) for w in caught if "standard error" in str(w.message))
    said["three stderr"] = record.stderr
    # From a review: a window of one input that is its process's whole share has its label noise as error bar (k ≥ 2),
    # as one process's has, and the record's variance Σ_r (N_r/N)² V_r is then finite; it was warned of as NaN.
    said["label noise"] = {}
    for name, (n, subset, k, _) in WHOLE_SHARES.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            monitor = FisherTraceMonitor(copy.deepcopy(module), HELD[:n], across_processes=True, subset=subset,
                                         n_samples=k)
        said["label noise"][name] = ([monitor.measure(step).stderr for step in range(2)],
                                     [str(w.message) for w in caught if "standard error" in str(w.message)])
    # A monitor refused on process 1 alone when built (an option chosen by rank): process 0 waited for it at its
    # first measurement until the group's timeout; now both stop when built, process 0 naming it.
    rank = torch.distributed.get_rank()
    try:
        FisherTraceMonitor(copy.deepcopy(module), HELD, across_processes=True, every=(1, 0)[rank]).measure(0)
        said["refused on one"] = "measured"
    except TorchfimError as err:
        said["refused on one"] = str(err)
    return said


#: Monitors built otherwise on process 1 than on process 0: each is refused on both, before any record.
UNLIKE = {"family": {"family": "gaussian"}, "n_samples": {"n_samples": 2}, "subset": {"subset": 12},
          "control_variate": {"control_variate": True}, "every": {"every": 2}, "class_dim": {"class_dim": -1},
          "frozen layer": {}}


def _unlike_monitors(module: nn.Module) -> dict[str, str]:
    """The error of each :data:`UNLIKE` monitor's first measurement (before, a family, ``n_samples`` or
    ``control_variate`` chosen by rank was mixed into the record without a word), and the record of monitors that
    differ only where it does not matter (the same settings spelled otherwise)."""
    rank, said = torch.distributed.get_rank(), {}
    for name, options in UNLIKE.items():
        model = copy.deepcopy(module)
        if name == "frozen layer" and rank:
            model[0].requires_grad_(False)
        try:
            FisherTraceMonitor(model, HELD, across_processes=True, **(options if rank else {})).measure(0)
            said[name] = "measured"
        except TorchfimError as err:
            said[name] = str(err)
    spelled = torchfim.families.get_family("categorical") if rank else "categorical"
    said["alike"] = FisherTraceMonitor(copy.deepcopy(module), HELD, across_processes=True,
                                       family=spelled).measure(0).trace
    return said


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("monitor-processes")
    run_processes(_rank, (str(root),), WORLD)
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


def _combined(records: list[list], shares: list[int]) -> list[tuple]:
    """The stratified combination of the processes' records: ``Σ w_r T_r`` and ``√(Σ w_r² V_r)``."""
    total, out = sum(shares), []
    for per_process in zip(*records):
        weights = [n / total for n in shares]
        trace = sum(w * r.trace for w, r in zip(weights, per_process))
        variance = sum(w * w * r.stderr**2 for w, r in zip(weights, per_process))
        ratio = None
        if per_process[0].variance_ratio is not None:  # V over the fresh labels' Σ w_r² P_r, P_r = V_r / ratio_r
            ratio = variance / sum(w * w * r.stderr**2 / r.variance_ratio for w, r in zip(weights, per_process))
        out.append((per_process[0].step, trace, math.sqrt(variance), sum(r.n_inputs for r in per_process), ratio))
    return out


@pytest.mark.parametrize("name", list(OPTIONS))
def test_a_shared_measurement_is_the_combination_of_the_processes_shares(ran: Path, name: str) -> None:
    """Each process measures rows r::2 of the held inputs with its own labels (a monitor of that share alone,
    generator seeded DEFAULT_SEED + r, windows of ⌈10/2⌉); both get the combined record; the first writes it."""
    saved = [torch.load(ran / f"records.{rank}")["shared"][name] for rank in range(WORLD)]
    timeless = [[{k: v for k, v in r.items() if k != "seconds"} for r in s["records"]] for s in saved]
    assert timeless[0] == timeless[1]
    options = dict(OPTIONS[name])
    if "subset" in options:
        options["subset"] = -(-options["subset"] // WORLD)
    records = []
    for rank in range(WORLD):
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        alone = FisherTraceMonitor(model, HELD[rank::WORLD], generator=torch.Generator().manual_seed(DEFAULT_SEED + rank),
                                   **options)
        for step, params in enumerate(saved[0]["params"]):
            with torch.no_grad():
                for p, value in zip(model.parameters(), params, strict=True):
                    p.copy_(value)
            alone.measure(step)
        records.append(alone.history)
    got = [(r["step"], r["trace"], r["stderr"], r["n_inputs"], r.get("variance_ratio")) for r in saved[0]["records"]]
    want = _combined(records, [len(HELD[r::WORLD]) for r in range(WORLD)])
    assert [(s, n) for s, _, _, n, _ in got] == [(s, n) for s, _, _, n, _ in want]
    for (_, trace, stderr, _, ratio), (_, t, e, _, q) in zip(got, want, strict=True):
        assert trace == pytest.approx(t, rel=1e-12) and stderr == pytest.approx(e, rel=1e-12)
        assert ratio == q if q is None else ratio == pytest.approx(q, rel=1e-12)
    # the chains carried over: a ratio of exactly 1 is the fresh labels' alone (β = 0)
    assert "control_variate" not in OPTIONS[name] or all(r != 1.0 for *_, r in got[1:])
    assert saved[0]["csv"] == str(ran / f"{name}.csv") and saved[1]["csv"] is None
    assert [(r.step, r.trace) for r in read_trace_csv(ran / f"{name}.csv")] == [(s, t) for s, t, *_ in got]


def test_shared_measurements_refuse_other_inputs_weights_or_alike_generators_and_stop_together(ran: Path) -> None:
    for rank in range(WORLD):
        other, alike, failed, moved, unbuilt = torch.load(ran / f"records.{rank}")["refusals"]
        assert "the processes' weights differ" in moved
        assert "needs the same held inputs on every process" in other
        assert "label generators are in the same state" in alike
        assert ("non-finite" if rank else "1 other process failed") in failed
        assert ("no parameters with requires_grad=True" if rank else "1 other process failed") in unbuilt


def test_monitors_built_otherwise_are_refused_on_every_process(ran: Path) -> None:
    said = [torch.load(ran / f"records.{rank}")["unlike"] for rank in range(WORLD)]
    for name in UNLIKE:
        for rank in range(WORLD):
            assert "needs the same monitor on every process" in said[rank][name], (name, rank, said[rank][name])
    assert said[0]["alike"] == said[1]["alike"] > 0  # a family given by name on one, as an object on the other


def test_sharing_needs_a_process_group_and_a_bool() -> None:
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(TorchfimError, match="no process group is initialised; call torch.distributed.init_process_group"):
        FisherTraceMonitor(model, HELD, across_processes=True)
    with pytest.raises(TorchfimError, match="across_processes must be True or False"):
        FisherTraceMonitor(model, HELD, across_processes="yes")


def test_held_sets_too_small_to_share_are_named_on_every_process(ran: Path) -> None:
    for rank in range(WORLD):
        small = torch.load(ran / f"records.{rank}")["small"]
        assert "leave process 1 of 2 none to measure; hold at least 2 inputs in a mini-batch" in small["one"]
        if rank == 0:  # the same on every process: the first says it
            assert "measures 1 input per process per measurement" in small["three"], rank
            both = ("hold at least 4 inputs in a mini-batch, or pass subset ≥ 3 with n_samples ≥ 2 for the label noise "
                    "of a process's one input, measured whole")
            assert both in small["three"]  # "shares 2 and 1, windows of 2" is the second
        else:
            assert "measures 1 input per process" not in small["three"], rank
        assert math.isnan(small["three stderr"])
        assert ("every must be" if rank else "1 other process failed to build it (the error is raised there)") \
            in small["refused on one"], rank
        for name, (_, _, _, finite) in WHOLE_SHARES.items():
            stderrs, warned = small["label noise"][name]
            assert all(math.isfinite(e) for e in stderrs) if finite else all(math.isnan(e) for e in stderrs), name
            assert len(warned) == (0 if finite or rank else 1), (name, rank, warned)  # the first warns, if any
            assert name != "a window of 1 of 2" or rank or "or pass subset ≥ 3 with n_samples ≥ 2" in warned[0]
