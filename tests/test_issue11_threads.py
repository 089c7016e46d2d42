"""Issue 11 item 2: torchfim called from several threads.

Before the engine computed on a private copy of the module tree under ``ENGINE_LOCK``, two threads using
forward-mode AD returned 0.0 where the answer was 0.779, and a monitor in a background thread gave
wrong values and made the training step fail (``functional_call`` swapped the user's parameters, hooks
were shared, forward-AD levels are process-global). Every number here is compared with the same call
made single-threaded.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from conftest import mlp_inputs, tanh_mlp
from torch import nn

import torchfim
from torchfim.engine import ENGINE_LOCK
from torchfim.train import FisherTraceMonitor

CALLS = 50  # per thread
JOIN_TIMEOUT = 120.0


def _calls(model: nn.Module, x: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """Deterministic calls that go through forward-mode AD (Î2, its variance, compare_estimators), the
    functional backend and the bounds; each returns a tensor."""

    def compare() -> torch.Tensor:
        rows = torchfim.compare_estimators(model, x).rows
        return torch.tensor([[r.fisher_diag_sum, r.score_variance, r.hessian_variance] for r in rows])

    return [
        lambda: torchfim.fisher(model, x, estimator="hessian", structure="trace", n_samples=2,
                                generator=torch.Generator().manual_seed(3)),
        lambda: torchfim.fisher_variance(model, x, estimator="hessian", structure="diag"),
        lambda: torchfim.fisher(model, x, structure="diag", backend="functional"),
        lambda: torchfim.variance_bound(model, x, estimator="score", structure="trace"),
        compare,
    ]


def _run_threads(workers: list[Callable[[], None]]) -> list[BaseException]:
    """Start ``workers`` together; the exceptions they raised."""
    errors: list[BaseException] = []
    start = threading.Barrier(len(workers))

    def wrap(work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                start.wait()
                work()
            except BaseException as err:  # noqa: BLE001 - reported by the test
                errors.append(err)

        return run

    threads = [threading.Thread(target=wrap(w), daemon=True) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(JOIN_TIMEOUT)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    return errors


def _replay(calls: list[Callable[[], torch.Tensor]], expected: list[torch.Tensor], got: list) -> Callable[[], None]:
    def work() -> None:
        for i in range(CALLS):
            value = calls[i % len(calls)]()
            got.append(bool(torch.allclose(value, expected[i % len(calls)], rtol=1e-12, atol=0.0)))

    return work


def test_two_threads_on_two_models_give_the_single_threaded_numbers() -> None:
    models = [tanh_mlp(3, seed=1), tanh_mlp(3, seed=2)]
    x = mlp_inputs(6, seed=3)
    plans = [_calls(m, x) for m in models]
    expected = [[c() for c in plan] for plan in plans]
    assert all(float(e[0]) != 0.0 for e in expected)  # the symptom was 0.0
    got: list[list[bool]] = [[], []]
    errors = _run_threads([_replay(plans[i], expected[i], got[i]) for i in range(2)])
    assert not errors, errors
    assert got == [[True] * CALLS, [True] * CALLS]


def test_two_threads_on_one_model_give_the_single_threaded_numbers() -> None:
    model = tanh_mlp(3, seed=4)
    xs = [mlp_inputs(6, seed=5), mlp_inputs(5, seed=6)]
    plans = [_calls(model, x) for x in xs]
    expected = [[c() for c in plan] for plan in plans]
    got: list[list[bool]] = [[], []]
    errors = _run_threads([_replay(plans[i], expected[i], got[i]) for i in range(2)])
    assert not errors, errors
    assert got == [[True] * CALLS, [True] * CALLS]


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.clone() for p in model.parameters()]


def test_training_passes_in_one_thread_and_torchfim_in_another() -> None:
    """The user's forward/backward and torchfim's forward-mode AD and ``functional_call`` on one model at
    once: the gradients and the Fisher numbers are the single-threaded ones, and nothing fails."""
    model = tanh_mlp(3, seed=7)
    x, y = mlp_inputs(8, seed=8), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(9))
    plan = _calls(model, x)[:3]
    expected = [c() for c in plan]
    expected_grads = _grads(model, x, y)
    fisher_ok: list[bool] = []
    grads_ok: list[bool] = []

    def train() -> None:
        for _ in range(CALLS):
            grads = _grads(model, x, y)
            grads_ok.append(all(torch.allclose(g, e, rtol=1e-12, atol=0.0) for g, e in zip(grads, expected_grads)))

    errors = _run_threads([train, _replay(plan, expected, fisher_ok)])
    assert not errors, errors
    assert fisher_ok == [True] * CALLS and grads_ok == [True] * CALLS


def _snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def test_values_under_a_lock_shared_with_the_training_step_are_those_of_some_step() -> None:
    """A training loop that holds ``ENGINE_LOCK`` around its step never overlaps a computation, so every
    value a thread computes meanwhile is the exact Fisher of the weights after one of the steps."""
    model = tanh_mlp(3, seed=10)
    x, y = mlp_inputs(8, seed=11), torch.randint(0, 3, (8,), generator=torch.Generator().manual_seed(12))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    states = [_snapshot(model)]
    values: list[torch.Tensor] = []

    def train() -> None:
        for _ in range(CALLS):
            with ENGINE_LOCK:
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()
                states.append(_snapshot(model))

    def measure() -> None:
        for _ in range(CALLS):
            values.append(torchfim.fisher(model, x, structure="trace"))

    errors = _run_threads([train, measure])
    assert not errors, errors
    replica = copy.deepcopy(model)
    references = []
    for state in states:
        with torch.no_grad():
            for p, s in zip(replica.parameters(), state):
                p.copy_(s)
        references.append(torchfim.fisher(replica, x, structure="trace"))
    references_t = torch.stack(references)
    assert len(set(references_t.tolist())) > CALLS // 2  # the steps move the value
    assert all(bool(torch.isclose(v, references_t, rtol=1e-12, atol=0.0).any()) for v in values)


def test_engine_lock_is_reentrant_for_a_loop_that_holds_it() -> None:
    """A training loop that holds ``ENGINE_LOCK`` around its step may call torchfim inside it (same thread)."""
    model, x = tanh_mlp(3, seed=22), mlp_inputs(5, seed=23)
    want = torchfim.fisher(model, x, structure="trace")
    with ENGINE_LOCK:
        got = torchfim.fisher(model, x, structure="trace", return_stderr=True)[0]
        monitor = FisherTraceMonitor(model, x, every=1, generator=torch.Generator().manual_seed(0))
        assert monitor.step(0) is not None
    assert torch.equal(got, want)


# ------------------------------------------------------------------ a monitor in a background thread
def _dropout_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3)).double()


def _train(model: nn.Module, steps: int, step_hook: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    x, y = mlp_inputs(16, seed=13), torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(14))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    torch.manual_seed(15)  # Dropout draws from the global generator
    for step in range(steps):
        if step_hook is not None:
            step_hook(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return _snapshot(model)


def test_background_monitor_keeps_the_final_weights() -> None:
    """Training with a monitor measuring in a background thread ends on the weights it ends on alone."""
    reference = _train(tanh_mlp(3, seed=16), CALLS)
    model = tanh_mlp(3, seed=16)
    monitor = FisherTraceMonitor(model, mlp_inputs(8, seed=17), every=1, generator=torch.Generator().manual_seed(0))
    stop = threading.Event()
    measured: list[int] = []

    def watch() -> None:
        while not stop.is_set():
            try:
                monitor.measure(len(measured))
            except (torchfim.TorchfimError, RuntimeError):
                pass  # a measurement overlapping a step: see the test below
            measured.append(1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    final = _train(model, CALLS)
    stop.set()
    watcher.join(JOIN_TIMEOUT)
    assert measured and all(torch.equal(a, b) for a, b in zip(final, reference))


def _pause_in_engine_forward(model: nn.Module, layer: int, inside: threading.Event,
                             resume: threading.Event) -> list[threading.Thread]:
    """A hook that, the first time torchfim's thread has run ``model[layer]`` (its private copy shares the
    hook), signals ``inside`` and waits for ``resume``: a deterministic interleaving of the two threads.
    Returns the list to put that thread in (kept off the model, which must stay copyable)."""
    owner: list[threading.Thread] = []

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if owner and threading.current_thread() is owner[0] and not inside.is_set():
            inside.set()
            resume.wait(JOIN_TIMEOUT)

    model[layer].register_forward_hook(hook)
    return owner


def test_background_monitor_does_not_switch_off_dropout_of_the_training_thread() -> None:
    steps, paused_at = 6, 3
    reference = _train(_dropout_mlp(18), steps)
    model = _dropout_mlp(18)
    inside, resume = threading.Event(), threading.Event()
    owner = _pause_in_engine_forward(model, 0, inside, resume)
    monitor = FisherTraceMonitor(model, mlp_inputs(8, seed=19), every=1, generator=torch.Generator().manual_seed(0))

    def measure() -> None:
        try:
            monitor.measure(0)
        except (torchfim.TorchfimError, RuntimeError):
            pass  # the step below changes the weights under the measurement: see the next test

    watcher = threading.Thread(target=measure, daemon=True)
    owner.append(watcher)
    watcher.start()

    def step_hook(step: int) -> None:
        if step == paused_at:
            assert inside.wait(JOIN_TIMEOUT)

    def resume_after(step: int) -> None:
        step_hook(step)
        if step == paused_at + 1:
            resume.set()

    final = _train(model, steps, resume_after)
    resume.set()
    watcher.join(JOIN_TIMEOUT)
    assert all(torch.equal(a, b) for a, b in zip(final, reference))


@pytest.mark.parametrize("estimator", ["exact", "hessian"])
def test_weights_changed_during_a_computation_give_the_documented_error(estimator: str) -> None:
    model = tanh_mlp(3, seed=20)
    x = mlp_inputs(6, seed=21)
    inside, resume = threading.Event(), threading.Event()
    owner = _pause_in_engine_forward(model, 2, inside, resume)  # layers 0 and 2 ran with the old weights
    outcome: list[object] = []

    def compute() -> None:
        try:
            outcome.append(torchfim.fisher(model, x, estimator=estimator, structure="trace",
                                           generator=torch.Generator().manual_seed(0)))
        except BaseException as err:  # noqa: BLE001 - inspected below
            outcome.append(err)

    worker = threading.Thread(target=compute, daemon=True)
    owner.append(worker)
    worker.start()
    assert inside.wait(JOIN_TIMEOUT)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # what an optimiser step does, while torchfim is mid-computation
    resume.set()
    worker.join(JOIN_TIMEOUT)
    assert len(outcome) == 1 and isinstance(outcome[0], torchfim.TorchfimError), outcome
    assert "changed during the computation" in str(outcome[0])
