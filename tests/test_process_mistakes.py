"""Mistakes of a user trial under ``torch.distributed`` (two gloo processes on the CPU), each refused with its fix
named on every process, where before it gave a wrong number, hung or named another problem.

Oracle: the message each process raises (or "taken" where the call returned). The two processes call alike
except where a case says otherwise (``rank`` picks what differs).
"""

from __future__ import annotations

import datetime
import functools
import time
from pathlib import Path

import pytest
import torch
from processes import over_loopback, run_processes
from torch import nn

import torchfim
from torchfim import TorchfimError
from torchfim.train import FisherTraceMonitor

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
WORLD = 2
X = torch.randn(24, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def _model(activation: type[nn.Module] = nn.Tanh) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), activation(), nn.Linear(5, 3)).double()


class _Tempered(nn.Module):
    """The model's logits over a temperature: a plain float attribute, which no weight check reads."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.net, self.temperature = _model(), temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) / self.temperature


class _ModeScaled(nn.Module):
    """Logits doubled in training mode: a forward that reads ``self.training`` (no Dropout, which is refused)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = _model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * (2.0 if self.training else 1.0)


def _hooked(rank: int) -> nn.Module:
    """A forward hook scaling the logits, registered on process 0 alone."""
    model = _model()
    if rank == 0:
        model[2].register_forward_hook(lambda module, inputs, out: out * 3.0)
    return model


def _said(call: object) -> str:
    try:
        call()
        return "taken"
    except TorchfimError as err:
        return str(err)


def _other_forwards(rank: int) -> dict[str, str]:
    """Same weights and inputs, other forwards: before, each was the mean of two models' Fishers, without a word."""

    def fisher(model: nn.Module) -> object:
        return lambda: torchfim.fisher(model, X, structure="trace", across_processes=True)

    return {
        "activation": _said(fisher(_model(nn.Tanh if rank == 0 else nn.ReLU))),
        "temperature": _said(fisher(_Tempered(1.0 + rank))),
        "hook": _said(fisher(_hooked(rank))),
        "training mode": _said(fisher(_ModeScaled().train(rank == 0))),
        "variance activation": _said(lambda: torchfim.variance_bound(_model(nn.Tanh if rank == 0 else nn.ReLU), X,
                                                                     structure="trace", across_processes=True)),
        "monitor hook": _said(lambda: FisherTraceMonitor(_hooked(rank), X, across_processes=True).measure(0)),
        "monitor temperature": _said(lambda: FisherTraceMonitor(_Tempered(1.0 + rank), X,
                                                                across_processes=True).measure(0)),
        "alike": _said(fisher(_Tempered(2.0))),
        # the outputs' tolerance, relative 1e-4 of their size: 1e-7 apart is rounding, 1e-3 apart another model
        "within rounding": _said(fisher(_Tempered(1.0 + 1e-7 * rank))),
        "beyond rounding": _said(fisher(_Tempered(1.0 + 1e-3 * rank))),
        "monitor alike": _said(lambda: FisherTraceMonitor(_hooked(1), X, across_processes=True).measure(0)),
    }


def _not_pad(batch: torch.Tensor, pad: int) -> torch.Tensor:
    return batch != pad


def _held_values(rank: int) -> dict[str, str]:
    """``output`` and ``mask`` functions of the same code holding values chosen by rank: before, a trial's were
    blended (the mask's first row may be all observed, where the outputs' digest cannot see it)."""
    torch.manual_seed(0)
    embedded = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 3)).double()
    tokens = torch.randint(0, 10, (12, 5), generator=torch.Generator().manual_seed(3))
    scale, pad, device = 1.0 + rank, rank, f"cpu:{rank}"

    def tokens_fisher(mask: object) -> object:
        return lambda: torchfim.fisher(embedded, tokens, mask=mask, structure="trace", across_processes=True)

    return {
        "output closure": _said(lambda: torchfim.fisher(_model(), X, output=lambda o: o * scale, structure="trace",
                                                        across_processes=True)),
        "mask closure": _said(tokens_fisher(lambda b: b != pad)),
        "mask partial": _said(tokens_fisher(functools.partial(_not_pad, pad=pad))),
        "mask default": _said(tokens_fisher(lambda b, p=pad: b != p)),
        "monitor mask closure": _said(lambda: FisherTraceMonitor(embedded, tokens, mask=lambda b: b != pad,
                                                                 across_processes=True).measure(0)),
        "device alike": _said(tokens_fisher(lambda b: (b != 0).to(device))),
        "partial alike": _said(tokens_fisher(functools.partial(_not_pad, pad=0))),
    }


def _other_dtypes(rank: int) -> dict[str, str]:
    """A model in float64 on process 0 and float32 on process 1, the same inputs (float64) on both: each converts
    them to its model's dtype, so before, a trial was told that its inputs differed (the monitor: its weights)."""
    model = _model().to((torch.float64, torch.float32)[rank])
    return {"fisher": _said(lambda: torchfim.fisher(model, X, structure="trace", across_processes=True)),
            "monitor": _said(lambda: FisherTraceMonitor(model, X, across_processes=True).measure(0))}


def _small_windows() -> dict[str, str]:
    """``control_variate=True`` with windows of 3 per process: a subset of 6 over two processes (before, the fix
    named was "pass subset ≥ 4", already met), and 7 held inputs without a subset (3 for process 1)."""
    return {"subset": _said(lambda: FisherTraceMonitor(_model(), X, subset=6, control_variate=True,
                                                       across_processes=True)),
            "held": _said(lambda: FisherTraceMonitor(_model(), X[:7], control_variate=True, across_processes=True))}


def _first_state(rank: int, root: str) -> str:
    """Process 0's monitor state loaded by every process (a DDP checkpoint saved by the first process alone)."""
    monitor = FisherTraceMonitor(_model(), X, across_processes=True)
    monitor.measure(0)
    if rank == 0:
        torch.save(monitor.state_dict(), f"{root}/monitor.pt")
    torch.distributed.barrier()
    again = FisherTraceMonitor(_model(), X, across_processes=True)
    return _said(lambda: again.load_state_dict(torch.load(f"{root}/monitor.pt", weights_only=True)))


def _wrapped_on_one(rank: int) -> dict[str, str]:
    """A DistributedDataParallel wrapper on process 0, its ``.module`` on process 1: before, the generic "needs the
    same call"."""
    wrapped = nn.parallel.DistributedDataParallel(_model())
    model = wrapped if rank == 0 else wrapped.module
    return {"fisher": _said(lambda: torchfim.fisher(model, X, structure="trace", across_processes=True)),
            "monitor": _said(lambda: FisherTraceMonitor(model, X, across_processes=True).measure(0))}


def _rank(rank: int, root: str) -> None:
    over_loopback()
    # A process left waiting in a collective fails after a minute rather than gloo's default half hour
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD,
                                         timeout=datetime.timedelta(seconds=60))
    torch.save({"forwards": _other_forwards(rank), "held values": _held_values(rank),
                "dtypes": _other_dtypes(rank), "windows": _small_windows(),
                "first state": _first_state(rank, root), "wrapped": _wrapped_on_one(rank)}, f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


def _called_alone(rank: int, root: str) -> None:
    """Process 0 alone calls ``fisher``, then (in a new group) steps its monitor, while process 1 goes on without
    (as under ``if rank == 0:``): before, gloo's bare ``RuntimeError`` after the group's timeout."""
    over_loopback()
    said = {}
    for case in ("fisher", "monitor"):
        torch.distributed.init_process_group("gloo", init_method=f"file://{root}/{case}", rank=rank,
                                             world_size=WORLD, timeout=datetime.timedelta(seconds=3))
        monitor = FisherTraceMonitor(_model(), X, every=1, across_processes=True) if case == "monitor" else None
        if rank == 0:
            try:
                monitor.step(0) if monitor else torchfim.fisher(_model(), X, structure="trace", across_processes=True)
                said[case] = "taken"
            except TorchfimError as err:
                said[case], said[f"{case} chained"] = str(err), isinstance(err.__cause__, RuntimeError)
        else:
            time.sleep(5)  # past process 0's timeout
        torch.distributed.destroy_process_group()
    torch.save(said, f"{root}/alone{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    root = tmp_path_factory.mktemp("process_mistakes")
    run_processes(_rank, (str(root),), WORLD)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_models_whose_forwards_differ_are_refused(ranks: list[dict]) -> None:
    """A trial's activation, temperature and hook chosen by rank (and a forward that reads its mode) gave a mean of
    two models' Fishers; now every process names the difference, while models alike are taken."""
    for rank in ranks:
        said = rank["forwards"]
        for case in ("activation", "temperature", "hook", "training mode"):
            assert "fisher(across_processes=True) needs the same model on every process" in said[case], case
            assert "the processes' models give other outputs" in said[case], case
        assert "variance_bound(across_processes=True) needs the same model" in said["variance activation"]
        for case in ("monitor hook", "monitor temperature"):
            assert "FisherTraceMonitor(across_processes=True) needs the same model" in said[case], case
            assert "a forward hook" in said[case], case
        assert said["alike"] == said["monitor alike"] == said["within rounding"] == "taken"
        assert "the processes' models give other outputs" in said["beyond rounding"]


def test_functions_holding_values_chosen_by_rank_are_refused(ranks: list[dict]) -> None:
    """A trial's ``lambda o: o * scale``, ``lambda b: b != pad`` and ``partial(notpad, pad=rank)`` with values of
    each process's own were blended; a device name held (each process's own GPU) is no difference."""
    for rank in ranks:
        said = rank["held values"]
        for case in ("output closure", "mask closure", "mask partial", "mask default"):
            assert "fisher(across_processes=True) needs the same call on every process" in said[case], case
            assert "holding a value chosen by rank" in said[case], case
        assert "needs the same monitor on every process" in said["monitor mask closure"]
        assert said["device alike"] == said["partial alike"] == "taken"


def test_a_call_on_one_process_alone_names_the_fix(tmp_path: Path) -> None:
    """A trial's ``if rank == 0: mon.step(step)`` and ``if rank == 0: fisher(..., across_processes=True)`` ended,
    after the group's timeout, in gloo's bare "Timed out waiting ... for send/recv"; now in a TorchfimError that says
    another process did not reach the call, with the fix, gloo's error chained."""
    run_processes(_called_alone, (str(tmp_path),), WORLD)
    said = torch.load(tmp_path / "alone0.pt", weights_only=False)
    for case, call in (("fisher", "fisher"), ("monitor", "FisherTraceMonitor")):
        assert f"{call}(across_processes=True): the collective that shares this call" in said[case], case
        assert "failed, so another process did not reach this call or left the run" in said[case], case
        assert "not under `if rank == 0:`" in said[case] and said[f"{case} chained"], case


def test_models_in_other_dtypes_are_named(ranks: list[dict]) -> None:
    for rank in ranks:
        for case, call in (("fisher", "fisher"), ("monitor", "FisherTraceMonitor")):
            said = rank["dtypes"][case]
            assert f"{call}(across_processes=True) needs the model in one dtype on every process" in said, case
            assert "(process 0's torch.float64, process 1's torch.float32); convert it alike on each" in said, case


def test_a_control_variate_window_too_small_across_processes_names_a_subset_that_helps(ranks: list[dict]) -> None:
    for rank in ranks:
        said = rank["windows"]
        assert "needs at least 4 inputs per measurement (two chains of 2), got 3 per process" in said["subset"]
        assert "(each of the 2 measures ⌈subset/2⌉ of its share); pass subset ≥ 8" in said["subset"]
        assert "got 3 per process; hold at least 8 inputs in a mini-batch" in said["held"]


def test_the_first_processs_monitor_state_loaded_by_another_names_the_fix(ranks: list[dict]) -> None:
    """Before, process 1 was told that the held inputs' checksum differed (each holds its own share)."""
    assert ranks[0]["first state"] == "taken"
    said = ranks[1]["first state"]
    assert "the state was saved by process 0 of 2 (across_processes=True), and this is process 1 of 2" in said
    assert "each process saves and loads its own state_dict()" in said and "checksum" not in said


def test_a_wrapper_on_one_process_and_its_module_on_another_is_named(ranks: list[dict]) -> None:
    for rank in ranks:
        for case, call in (("fisher", "fisher"), ("monitor", "FisherTraceMonitor")):
            said = rank["wrapped"][case]
            assert f"{call}(across_processes=True) needs the same model on every process" in said, case
            assert "some pass a DistributedDataParallel wrapper and others its .module" in said, case
