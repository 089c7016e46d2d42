"""Hooks of the user's own on a model's modules.

Forward hooks are part of the function (activation steering, patching): the ``user_hooks`` case of
``cases.py`` runs them through every oracle. Backward hooks are not: they change or watch the gradients
that pass through a module, so the Fisher is that of the same model without them, and a logging hook
must not see the output vectors the engine pulls back. Before, a hook that zeroed its module's input
gradient changed the exact diagonal by 11 % (the modules backend) or made ``backend="functional"`` raise
from inside torch. Oracle: ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from ``torch.func`` Jacobians of the model without hooks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from cases import _tokens, mlp_inputs, tanh_mlp, tied
from clients import rel_err
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.train import FisherTraceMonitor


def _with_backward_hooks(seen: list[str]) -> nn.Module:
    """``tanh_mlp`` with a hook that zeroes the gradient into its hidden layer's input (as a gradient
    reversal or a per-module clip would change it), one that rescales its last layer's output gradient,
    and one that logs."""
    model = tanh_mlp(3, hidden=5)
    model[2].register_full_backward_hook(lambda module, grad_in, grad_out: (torch.zeros_like(grad_in[0]),))
    model[4].register_full_backward_pre_hook(lambda module, grad_out: (3.0 * grad_out[0],))
    model[0].register_full_backward_hook(lambda module, grad_in, grad_out: seen.append("backward"))
    return model


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, on the user's own backward
@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_the_fisher_of_a_model_with_backward_hooks_is_that_of_its_forward(backend: str) -> None:
    x, seen = mlp_inputs(9), []
    want = exact_fisher(tanh_mlp(3, hidden=5), x, "categorical")
    model = _with_backward_hooks(seen)
    for structure, expected in (("full", want), ("diag", torch.diagonal(want)), ("trace", torch.trace(want))):
        assert rel_err(torchfim.fisher(model, x, structure=structure, backend=backend), expected) < 1e-10
    hessian = torchfim.fisher(model, x, structure="diag", estimator="hessian", backend=backend,
                              generator=torch.Generator().manual_seed(2))
    plain = torchfim.fisher(tanh_mlp(3, hidden=5), x, structure="diag", estimator="hessian", backend=backend,
                            generator=torch.Generator().manual_seed(2))
    assert rel_err(hessian, plain) < 1e-12
    monitor = FisherTraceMonitor(model, x, every=1, n_samples=3, generator=torch.Generator().manual_seed(4))
    plain_monitor = FisherTraceMonitor(tanh_mlp(3, hidden=5), x, every=1, n_samples=3,
                                       generator=torch.Generator().manual_seed(4))
    assert monitor.measure(0).trace == pytest.approx(plain_monitor.measure(0).trace, rel=1e-12)
    assert seen == []  # the logging hook saw none of the engine's pull-backs
    model(x).sum().backward()
    assert seen == ["backward"]  # and the user's own backward still runs it


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_the_fisher_of_a_model_with_parameter_hooks_is_that_of_its_forward(backend: str) -> None:
    """A mask on a tied embedding/output weight (only the last two rows train) and a clamp on a bias: the
    rules keep every parameter (no warning), tying stays, and the hooks see none of the engine's gradients."""
    x, calls = _tokens(8, 3, 4), []
    want = exact_fisher(tied(4), x, "categorical")
    model = tied(4)
    rows = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)[:, None]
    model.embed.weight.register_hook(lambda g: (calls.append("mask"), g * rows)[1])
    model.mix.bias.register_hook(lambda g: (calls.append("clamp"), g.clamp(-1e-3, 1e-3))[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing sent to a generic rule, nothing said
        for structure, expected in (("full", want), ("diag", torch.diagonal(want)), ("trace", torch.trace(want))):
            assert rel_err(torchfim.fisher(model, x, structure=structure, backend=backend), expected) < 1e-10
    assert calls == []
    model(x).sum().backward()
    assert sorted(calls) == ["clamp", "mask"]
    assert torch.equal(model.embed.weight.grad[:2], torch.zeros(2, 3, dtype=torch.float64))


def test_a_monitor_sees_a_forward_hook_registered_after_its_first_measurement() -> None:
    """The monitor keeps its copy of the model between measurements; a hook registered since (a steering
    scale) must rebuild it. Before, it measured the model without the hook: 1.59 against 2.27."""
    model, x = tanh_mlp(3), mlp_inputs(12)
    monitor = FisherTraceMonitor(model, x, every=1, n_samples=256, generator=torch.Generator().manual_seed(4))
    before = float(torchfim.fisher(model, x, structure="trace"))
    assert monitor.measure(0).trace == pytest.approx(before, rel=0.2)
    model[0].register_forward_hook(lambda module, args, out: 3.0 * out)
    after = float(torchfim.fisher(model, x, structure="trace"))
    record = monitor.measure(1)
    assert abs(after - before) > 6 * record.stderr  # the test can tell the two apart
    assert abs(record.trace - after) < 4 * record.stderr


def _reads_the_last_weight(model: nn.Module) -> None:
    """A forward hook on the activation that reads the last layer's weight (a closure over ``model``, which
    the engine's copy rebinds): a use of that weight outside its module, which the coverage check finds."""
    model[1].register_forward_hook(lambda module, args, out: out + 0.5 * torch.tanh(out @ model[2].weight.T
                                                                                     @ model[2].weight))


def test_a_hook_registered_after_a_first_call_is_checked_again() -> None:
    """What the coverage check settled on the first call is kept per model; a hook registered since changes
    the forward, so the check runs again. Before, the kept coverage left the new use of the weight out:
    23 % off."""
    x = mlp_inputs(9)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    later = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    later.load_state_dict(fresh.state_dict())
    _reads_the_last_weight(fresh)
    want = torch.diagonal(exact_fisher(fresh, x, "categorical"))
    with pytest.warns(RuntimeWarning, match="used outside their module's forward"):
        assert rel_err(torchfim.fisher(fresh, x, structure="diag"), want) < 1e-10
    torchfim.fisher(later, x, structure="diag")
    _reads_the_last_weight(later)
    with pytest.warns(RuntimeWarning, match="used outside their module's forward"):
        assert rel_err(torchfim.fisher(later, x, structure="diag"), want) < 1e-10


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # torch's, on the user's own backward
@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_global_backward_hooks_are_no_part_of_the_fisher_or_the_penalty(backend: str) -> None:
    """torch's global module backward hooks (``register_module_full_backward_hook``), one halving every
    gradient: before, the exact Fisher came out 25 % off, ``backend="functional"`` refused the model and the
    penalty was 33 % off. They run again on the caller's own backward, once."""
    from torch.nn.modules.module import register_module_full_backward_hook

    from torchfim.train import FisherPenalty

    x, seen = mlp_inputs(9), []
    want = exact_fisher(tanh_mlp(3, hidden=5), x, "categorical")
    model, plain_model = tanh_mlp(3, hidden=5), tanh_mlp(3, hidden=5)
    pen_plain = FisherPenalty(plain_model, generator=torch.Generator().manual_seed(1))(x, step=0)
    handle = register_module_full_backward_hook(
        lambda module, grad_in, grad_out: (seen.append(type(module).__name__),
                                           tuple(None if g is None else 0.5 * g for g in grad_in))[1])
    try:
        assert rel_err(torchfim.fisher(model, x, structure="full", backend=backend), want) < 1e-10
        monitor = FisherTraceMonitor(model, x, n_samples=3, generator=torch.Generator().manual_seed(4))
        plain_monitor = FisherTraceMonitor(tanh_mlp(3, hidden=5), x, n_samples=3,
                                           generator=torch.Generator().manual_seed(4))
        assert monitor.measure(0).trace == pytest.approx(plain_monitor.measure(0).trace, rel=1e-12)
        pen = FisherPenalty(model, generator=torch.Generator().manual_seed(1))(x, step=0)
        assert float(pen.detach()) == pytest.approx(float(pen_plain.detach()), rel=1e-12)
        for got, plain in zip(torch.autograd.grad(pen, list(model.parameters())),
                              torch.autograd.grad(pen_plain, list(plain_model.parameters()))):
            torch.testing.assert_close(got, plain, rtol=1e-12, atol=1e-15)
        assert seen == []
        model(x).sum().backward()
        assert sorted(set(seen)) == ["Linear", "Sequential", "Tanh"]  # the caller's own backward still runs it
    finally:
        handle.remove()
