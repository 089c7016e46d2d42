"""``FisherTraceMonitor.step`` in loops that call it out of order: once per micro-batch under gradient accumulation
(the same step several times), or with a counter that starts over (the batch index within an epoch).

Oracle: the records and the CSV rows, one per measured step where the parameters stood still, one per call where
they moved; the warnings, each once. Before, every repeated call measured again (k measurements and k rows for one
step) and a counter that went back made a zigzag curve, both silently.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn
from torch_versions import FUSED_ADAM_ON_CPU

from torchfim.train import FisherTraceMonitor, read_trace_csv


def _monitor(tmp_path, every: int = 2) -> FisherTraceMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    held = torch.randn(20, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return FisherTraceMonitor(model, held, every=every, csv_path=tmp_path / "trace.csv")


def _warnings(run) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        run()
    return [str(w.message) for w in seen if "FisherTraceMonitor" in str(w.message)]


def _backward(monitor: FisherTraceMonitor) -> None:
    x = torch.randn(8, 4, dtype=torch.float64)
    nn.functional.cross_entropy(monitor.model(x), torch.randint(0, 3, (8,))).backward()


def test_a_step_called_once_per_micro_batch_is_measured_once(tmp_path) -> None:
    monitor, returned = _monitor(tmp_path), []
    optimiser = torch.optim.SGD(monitor.model.parameters(), lr=0.1)

    def loop() -> None:
        for step in range(5):
            for _ in range(3):  # three micro-batches per optimiser step, each measured after its backward
                _backward(monitor)
                returned.append(monitor.step(step))
            optimiser.step()
            optimiser.zero_grad()

    said = _warnings(loop)
    assert [r.step for r in monitor.history] == [0, 2, 4]
    assert [r.step for r in read_trace_csv(tmp_path / "trace.csv")] == [0, 2, 4]
    for step in (0, 2, 4):  # the later calls at a measured step return its record itself
        assert all(r is monitor.history[step // 2] for r in returned[3 * step: 3 * step + 3])
    assert len(said) == 1 and "called again at its last measured step" in said[0] and "micro-batch" in said[0]


def test_a_step_that_goes_back_is_named_once_and_still_measured(tmp_path) -> None:
    monitor = _monitor(tmp_path, every=1)

    def two_epochs() -> None:
        for _ in range(2):
            for i in range(3):  # the batch index: starts over each epoch
                monitor.step(i)

    said = _warnings(two_epochs)
    assert [r.step for r in monitor.history] == [0, 1, 2, 0, 1, 2]
    assert len(said) == 1 and "at step 0 after step 2" in said[0] and "epoch * len(loader) + i" in said[0]


@pytest.mark.parametrize("fused", [False, pytest.param(True, marks=pytest.mark.skipif(
    not FUSED_ADAM_ON_CPU, reason="this torch fuses Adam on accelerators only"))], ids=["adam", "fused-adam"])
def test_a_counter_that_does_not_advance_while_training_is_measured_each_time(tmp_path, fused: bool) -> None:
    """Full-batch training passing the batch index (always 0): the parameters move between the calls (a fused
    optimiser's step leaves their version counters as they were; the optimiser step count does not), so each call
    measures, and the stalled counter is named once."""
    monitor = _monitor(tmp_path)
    optimiser = torch.optim.Adam(monitor.model.parameters(), lr=0.1, fused=fused)

    def full_batch() -> None:
        for _ in range(4):
            _backward(monitor)
            optimiser.step()
            optimiser.zero_grad()
            monitor.step(0)

    said = _warnings(full_batch)
    traces = [r.trace for r in monitor.history]
    assert [r.step for r in monitor.history] == [0, 0, 0, 0] and len(set(traces)) == 4
    assert len(said) == 1 and "after the parameters moved" in said[0]


def test_measure_at_the_same_step_measures_again(tmp_path) -> None:
    monitor = _monitor(tmp_path)
    first = monitor.measure(4)
    assert not _warnings(lambda: monitor.measure(4))
    assert len(monitor.history) == 2 and monitor.history[0] is first and monitor.history[1] is not first


def test_parameters_replaced_or_moved_by_another_models_optimiser(tmp_path) -> None:
    """Parameters replaced by other tensors (``load_state_dict(..., assign=True)``) are measured again; an optimiser
    of another model stepping between two calls is not this model's step (no second measurement)."""
    monitor = _monitor(tmp_path)
    first = monitor.step(0)
    other = nn.Linear(3, 3)
    other_optimiser = torch.optim.Adam(other.parameters(), lr=0.1, fused=FUSED_ADAM_ON_CPU)
    other(torch.randn(2, 3)).sum().backward()
    other_optimiser.step()
    assert _warnings(lambda: monitor.step(0)) and monitor.history == [first]
    state = {k: v + 0.5 for k, v in monitor.model.state_dict().items()}
    monitor.model.load_state_dict(state, assign=True)
    said = _warnings(lambda: monitor.step(0))
    again = monitor.history[-1]
    assert again is not first and len(monitor.history) == 2 and again.trace != first.trace
    assert len(said) == 1 and "after the parameters moved" in said[0]


def _resumed(tmp_path, saved: dict, moved: bool = False) -> FisherTraceMonitor:
    """A new process's monitor, on a new model loaded from ``saved`` (moved by an optimiser step where ``moved``),
    with the monitor's saved state."""
    monitor = _monitor(tmp_path)
    monitor.model.load_state_dict(saved["model"])
    if moved:
        _backward(monitor)
        torch.optim.SGD(monitor.model.parameters(), lr=0.1).step()
    monitor.load_state_dict(saved["monitor"])
    return monitor


def test_a_resumed_loop_going_on_at_the_restored_last_step_is_not_measured_again(tmp_path) -> None:
    """A loop that saves right after measuring a step and resumes at that step: the restored record is returned (one
    row per step, no warning), a later step is measured; a model moved since its checkpoint is measured again. Before,
    a restored monitor measured the restored step again, writing a second row under it, and said the parameters had
    moved."""
    monitor = _monitor(tmp_path)
    optimiser = torch.optim.SGD(monitor.model.parameters(), lr=0.1)
    for step in range(5):
        monitor.step(step)
        if step == 4:  # through torch.save, as a checkpoint file takes it
            buffer = io.BytesIO()
            torch.save({"model": monitor.model.state_dict(), "monitor": monitor.state_dict()}, buffer)
        _backward(monitor)
        optimiser.step()
        optimiser.zero_grad()
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)

    resumed = _resumed(tmp_path, saved)
    returned = []
    said = _warnings(lambda: returned.append(resumed.step(4)))
    assert returned == [resumed.history[-1]] and [r.step for r in resumed.history] == [0, 2, 4] and not said
    assert [r.step for r in read_trace_csv(tmp_path / "trace.csv")] == [0, 2, 4]
    _backward(resumed)
    torch.optim.SGD(resumed.model.parameters(), lr=0.1).step()
    assert resumed.step(6).step == 6 and [r.step for r in read_trace_csv(tmp_path / "trace.csv")] == [0, 2, 4, 6]

    moved = _resumed(tmp_path, saved, moved=True)
    assert "after the parameters moved" in " ".join(_warnings(lambda: moved.step(4)))
    assert [r.step for r in moved.history] == [0, 2, 4, 4]
    old = {k: v for k, v in saved["monitor"].items() if k != "order"}  # a state saved before the fingerprint was kept
    _monitor(tmp_path).load_state_dict(old)


def test_a_change_of_the_trainable_parameters_is_named_once(tmp_path) -> None:
    """Unfreezing or freezing layers mid-run changes what Tr(F) sums over: the curve steps without the Fisher having
    moved (on this model, the sampled trace without the first layer is a third below the whole one). Named once, at the first
    change; not where the set stays (a review of fine-tuning loops found the penalty naming it and the monitor not)."""
    monitor = _monitor(tmp_path, every=1)
    quiet = _warnings(lambda: [monitor.step(s) for s in range(2)])
    monitor.model[0].requires_grad_(False)
    named = _warnings(lambda: [monitor.step(s) for s in range(2, 4)])
    monitor.model[0].requires_grad_(True)
    again = _warnings(lambda: monitor.step(4))
    assert quiet == [] and again == []
    assert len(named) == 1 and "at step 2 over other trainable parameters than at step 1" in named[0]
    assert "2 no longer trained, such as '0.weight'" in named[0]
    assert monitor.history[2].trace < 0.8 * monitor.history[1].trace
