"""The benchmark's ``by-hand`` contenders compute what their targets ask of torchfim, the same numbers
(benchmarks/suite/by_hand.py), and the targets table reports them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfim.train


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)).double()


def _relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    diff = math.sqrt(sum(float((x - y).square().sum()) for x, y in zip(a, b)))
    return diff / math.sqrt(sum(float(y.square().sum()) for y in b))


@pytest.mark.parametrize("alpha", [0.1, 3.0])
def test_the_fd_penalty_step_by_hand_is_torchfims(suite, alpha):
    """The gradient ``penalised_loss`` leaves (finite differences, every=1), labels from the same seed; the
    penalty's share of it is large against the rounding its difference amplifies (relative 1e-6 in float64)."""
    x = torch.randn(12, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(2))
    model = _mlp()
    pen = torchfim.train.FisherPenalty(model, alpha=alpha, grad_method="finite_difference",
                                       generator=torch.Generator().manual_seed(3))
    pen.penalised_loss(x, lambda out: F.cross_entropy(out, y), step=0).backward()
    want = [p.grad.clone() for p in model.parameters()]
    task = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    assert _relative(task, want) > 0.05  # the penalty moves the gradient: a step without it would fail

    model.zero_grad(set_to_none=True)
    names, params = zip(*model.named_parameters())
    suite["by_hand"].fd_penalty_step(model, list(names), list(params), x, y, alpha,
                                     torch.Generator().manual_seed(3))
    assert _relative([p.grad for p in params], want) < 1e-6


def test_the_subset_measurement_by_hand_is_the_monitors(suite):
    """Trace and standard error of consecutive windows (the last wraps around the 20 held inputs), equal to the
    monitor's to rounding; the weights move between measurements."""
    held = torch.randn(20, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    model = _mlp()
    monitor = torchfim.train.FisherTraceMonitor(model, held, subset=8, generator=torch.Generator().manual_seed(5))
    by_hand = suite["by_hand"].SubsetTraceByHand(model, held, 8, torch.Generator().manual_seed(5))
    for step in range(4):
        record = monitor.measure(step)
        trace, stderr = by_hand.measure()
        assert trace == pytest.approx(record.trace, rel=1e-10)
        assert stderr == pytest.approx(record.stderr, rel=1e-10)
        with torch.no_grad():
            model[0].weight.mul_(1.1)


def test_the_by_hand_contenders_time_the_workloads_loops(suite):
    """Each call of a contender's runner takes its workload's steps on a copy of the model."""
    cfg = suite["config"].Config(penalty_steps=3, lr=0.1)
    g = torch.Generator().manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    data = suite["models"].Data([torch.randn(6, 5, generator=g) for _ in range(2)],
                                [torch.randint(0, 3, (6,), generator=g) for _ in range(2)])
    before = [p.detach().clone() for p in model.parameters()]
    for contender in (suite["by_hand"].fd_penalty_by_hand(model, data, cfg),
                      suite["by_hand"].monitor_by_hand(model, data, torch.cat(data.batches), cfg)):
        assert contender.name == "by-hand" and not contender.compare
        contender.make()()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # a copy trained, not the model


def test_targets_carry_the_by_hand_ratios(suite):
    main = {"penalty-step-mlp": {"plain": 1.0, "torchfim-fd": 2.9, "by-hand": 2.5, "arithmetic": 1.8},
            "monitor-every10-mlp": {"plain": 2.0, "torchfim-subset32": 2.24, "by-hand": 2.1}}
    targets = {t["target"]: t for t in suite["targets"].evaluate_targets(main, {})}
    by_hand = {k: t["by_hand"] for k, t in targets.items() if t["by_hand"] is not None}
    monitor = "Tr(F) monitor every 10 steps on a subset of 32 held inputs: < 10 % of training (< 1.1× plain)"
    fd = "penalty step with the finite-difference gradient, every=1: ≤ 2.2× plain SGD step"
    assert by_hand == {fd: 2.5, monitor: pytest.approx(1.05)}
    lines = suite["render"]._targets(main, {"targets": list(targets.values())}, Path("x.md"), None)
    assert f"| {fd} | 2.90× | ≤ 2.2× | **missed** | 1.80× | 2.50× |" in lines
    assert f"| {monitor} | 1.12× | < 1.1× | **missed** |  | 1.05× |" in lines
