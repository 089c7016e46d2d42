"""The penalty on a model with the caller's backward hooks: on a parameter (``weight.register_hook``, a clamp
here; a gradient logger such as wandb's ``watch`` is one too) and on a module (``register_full_backward_hook``,
a rescaling here).

The penalty is a function of the model's forward, so its value and gradient are those of the same model
without hooks, as the monitor's and ``fisher``'s are; the hooks act on the gradient of the loss the caller
back-propagates, once per backward: the parameter hook on the total gradient, the module hook on the task
loss's. Before, they also ran inside the penalty's own differentiations (6 to 67 times a step), which changed
its value by 23-32 % and the gradient of parameters without hooks by 43-71 %; the finite difference of
``kind="trace"`` alone escaped, so the two gradient methods disagreed.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchfim.train import FisherPenalty

X = torch.randn(16, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
Y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(3))
CLAMP = 1e-3


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _hooked(model: nn.Module, calls: list[str]) -> nn.Module:
    model = copy.deepcopy(model)
    model[0].weight.register_hook(lambda g: (calls.append("parameter"), g.clamp(-CLAMP, CLAMP))[1])
    model[2].register_full_backward_hook(lambda m, gi, go: (calls.append("module"), (0.5 * gi[0],))[1])
    return model


def _gradients(model: nn.Module, case: tuple, task: bool, steps: int = 1) -> tuple[list[float], list[torch.Tensor]]:
    """The penalty's values and the caller's gradient (task loss or not) at the last of ``steps`` steps."""
    kind, method, shared, every = case
    pen = FisherPenalty(model, alpha=0.7, kind=kind, grad_method=method, every=every,
                        generator=torch.Generator().manual_seed(1))
    values = []
    for step in range(steps):
        def task_loss(out):
            return F.cross_entropy(out, Y) if task else 0.0 * out.sum()
        loss = pen.penalised_loss(X, task_loss, step=step) if shared else task_loss(model(X)) + pen(X, step=step)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        values.append(float(pen.last_value))
    return values, list(grads)


CASES = [(*c, 1) for c in itertools.product(("batch_gradient", "trace"), ("exact", "finite_difference"),
                                            (False, True))] + [("batch_gradient", "exact", True, 3)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_the_penalty_is_that_of_the_model_without_its_hooks(case: tuple) -> None:
    plain, calls = _model(), []
    hooked = _hooked(plain, calls)
    steps = 2 if case[3] > 1 else 1  # with every=3, step 1 reuses the cached gradient
    want_values, want = _gradients(plain, case, task=False, steps=steps)
    got_values, got = _gradients(hooked, case, task=False, steps=steps)
    assert got_values == pytest.approx(want_values, rel=1e-12)
    # With module hooks, penalised_loss takes the penalty on a forward of its own: for the finite difference,
    # that of pen(x), within the O(ε) of a forward difference (1e-8 here) of the shared one's.
    tol = 1e-7 if case[1:3] == ("finite_difference", True) else 1e-12
    scale = max(float(w.abs().max()) for w in want)
    torch.testing.assert_close(got[0], want[0].clamp(-CLAMP, CLAMP), rtol=tol, atol=tol * scale)  # on the total
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol * scale)
    assert calls.count("parameter") == steps  # once per backward of the caller's
    assert calls.count("module") == steps  # the task loss's backward (zero here), not the penalty's passes


@pytest.mark.parametrize("shared", [False, True])
def test_the_module_hook_acts_on_the_task_gradient_only(shared: bool) -> None:
    """With a task loss, the caller's gradient of a parameter without hooks is the task gradient through the
    hooked model plus the penalty gradient of the model without hooks."""
    case = ("batch_gradient", "exact", shared, 1)
    plain, calls = _model(), []
    hooked = _hooked(plain, calls)
    _, penalty = _gradients(plain, case, task=False)
    _, got = _gradients(hooked, case, task=True)
    task = torch.autograd.grad(F.cross_entropy(hooked(X), Y), list(hooked.parameters()))
    for g, t, p in list(zip(got, task, penalty))[1:]:
        torch.testing.assert_close(g, t + p, rtol=1e-10, atol=1e-14)
