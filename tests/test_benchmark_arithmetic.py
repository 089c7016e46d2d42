"""The benchmark's ``arithmetic`` contenders run exactly the passes of the cost model, and the targets
table reports them beside the targets they bound (benchmarks/suite/arithmetic.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn


class _Counter:
    """Forward calls of a model (with its last weight at each) and backward passes through its last layer.

    The hooks are copied with the model, so a contender's private copy reports here too.
    """

    def __init__(self, model: nn.Module) -> None:
        self.forwards, self.backwards, self.weights = 0, 0, []
        # functions, not bound methods: deepcopy keeps a function and would copy the counter of a method
        model.register_forward_hook(lambda module, *_: self._forward(module))
        model[-1].register_full_backward_hook(lambda *_: self._backward())

    def _forward(self, module: nn.Module) -> None:
        self.forwards += 1
        self.weights.append(module[-1].weight.detach().clone())

    def _backward(self) -> None:
        self.backwards += 1


def _mlp(classes: int) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, classes))


def _data(suite, batches: int, classes: int):
    g = torch.Generator().manual_seed(1)
    return suite["models"].Data([torch.randn(6, 5, generator=g) for _ in range(batches)],
                                [torch.randint(0, classes, (6,), generator=g) for _ in range(batches)])


@pytest.mark.parametrize("classes", [2, 4, 10])
def test_exact_reference_is_one_forward_and_c_minus_1_backwards_per_batch(suite, classes):
    model, data = _mlp(classes), _data(suite, 3, classes)
    contender = suite["arithmetic"].backward_passes(model, data)
    assert contender.name == "arithmetic" and not contender.compare
    run = contender.make()  # probes the number of outputs with one forward
    counter = _Counter(model)
    run()
    assert (counter.forwards, counter.backwards) == (3, 3 * (classes - 1))
    assert all(p.grad is None for p in model.parameters())  # gradients returned, nothing accumulated


@pytest.mark.parametrize("every,forwards,backwards", [(1, 20, 20), (10, 11, 12), (5, 12, 14)])
def test_penalty_reference_runs_the_finite_difference_passes(suite, every, forwards, backwards):
    cfg = suite["config"].Config(penalty_steps=10, lr=0.1)
    base, data = _mlp(3), _data(suite, 4, 3)
    contender = suite["workloads.penalty"]._passes_contender(every, base, data, cfg)
    assert contender.name == ("arithmetic" if every == 1 else f"arithmetic-every{every}")
    assert contender.per_call == 10 and not contender.compare
    counter = _Counter(base)
    run = contender.make()  # a copy of base, hooks included
    before = [p.detach().clone() for p in base.parameters()]
    run()
    assert (counter.forwards, counter.backwards) == (forwards, backwards)
    assert not torch.equal(counter.weights[0], counter.weights[-1])  # the copy took SGD steps
    assert all(torch.equal(a, p) for a, p in zip(before, base.parameters()))  # the base did not


def test_targets_carry_the_passes_of_their_workload(suite):
    main = {
        "diag-exact-cnn": {"floor": 1.0, "torchfim": 5.0, "arithmetic": 4.5},
        "diag-exact-transformer": {"floor": 2.0, "torchfim": 15.0, "arithmetic": 13.0},
        "diag-exact-resnet": {"floor": 1.0, "torchfim": 6.5, "arithmetic": 8.0},
        "penalty-step-mlp": {"plain": 1.0, "torchfim-fd": 2.5, "torchfim-fd-every10": 1.3, "arithmetic": 1.9,
                             "arithmetic-every10": 1.1},
    }
    targets = {t["target"]: t for t in suite["targets"].evaluate_targets(main, {})}
    passes = {k: t["passes"] for k, t in targets.items() if t["passes"] is not None}
    assert passes == {
        "diag/exact, CNN: torchfim ≤ 4× floor": 4.5,
        "diag/exact, transformer: torchfim ≤ 7× floor": 6.5,
        "diag/exact, resnet: torchfim ≤ 6× floor": 8.0,
        "penalty step with the finite-difference gradient, every=1: ≤ 2.2× plain SGD step": 1.9,
        "penalty step with the finite-difference gradient, every=10: ≤ 1.2× plain SGD step": pytest.approx(1.1),
    }
    assert targets["diag/exact, resnet: torchfim ≤ 6× floor"]["status"] == "missed"
    lines = suite["render"]._targets(main, {"targets": list(targets.values())}, Path("x.md"), None)
    assert "| diag/exact, resnet: torchfim ≤ 6× floor | 6.50× | ≤ 6× | **missed** | 8.00× |  |" in lines
    assert "| diag/exact, MLP-A: torchfim ≤ 4× floor | — | ≤ 4× | n/a |  |  |" in lines
