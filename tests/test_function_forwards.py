"""Forwards that compute part of their output without autograd (``torch.no_grad`` and its kin inside the
forward), or register gradient hooks on their tensors.

Reverse mode holds a region without autograd constant; forward mode, which the engine's second derivatives go
through, did not: on a frozen encoder under ``torch.no_grad()`` the Hessian estimator Î2's diagonal had entries
for the encoder (summing to −0.11 on the model below) where the exact Fisher and Î1 were zero, and a statistic
of a weight taken under ``torch.no_grad()`` moved Î2 of that weight itself. Oracle: the twin of each model whose
region is the same computation detached (``.detach()`` stops both modes), with the same labels.

A hook that doubled the gradient into a layer made its exact Fisher and Î1 4 times the function's, and Î2 6.2
times; a hook that stored gradients saw the engine's pull-backs. Oracle: the twin without the hook. The penalty,
whose forward is the training step's, keeps them (the task loss's gradient goes through it).
"""

from __future__ import annotations

import threading

import pytest
import torch
from cases import mlp_inputs, tanh_mlp
from torch import Tensor, nn

import torchfim
from torchfim.engine.function_forwards import function_forwards
from torchfim.train import FisherTraceMonitor

_REGIONS = {
    "no_grad": torch.no_grad,
    "set_grad_enabled": lambda: torch.set_grad_enabled(False),
}


class _FrozenEncoder(nn.Module):
    """A tanh encoder run without autograd (or detached, ``region=None``), a trainable tanh head after it."""

    def __init__(self, region: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.region = region
        self.enc, self.mid, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def encode(self, x: Tensor) -> Tensor:
        return torch.tanh(self.enc(x))

    @torch.no_grad()
    def encode_decorated(self, x: Tensor) -> Tensor:
        return self.encode(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.region is None:
            h = self.encode(x).detach()
        elif self.region == "decorator":
            h = self.encode_decorated(x)
        else:
            with _REGIONS[self.region]():
                h = self.encode(x)
        return self.head(torch.tanh(self.mid(h)))


class _NormedHead(nn.Module):
    """``head(tanh(body(x))) / ‖W_head‖`` with the norm taken without autograd and the hidden layer inside a
    ``torch.enable_grad()`` within that region, so it keeps its derivatives (or the norm detached)."""

    def __init__(self, detached: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.detached = detached
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        if self.detached:
            scale = self.head.weight.norm().detach()
            h = torch.tanh(self.body(x))
        else:
            with torch.no_grad():
                scale = self.head.weight.norm()
                with torch.enable_grad():
                    h = torch.tanh(self.body(x))
        return self.head(h) / scale


class _HookedScale(nn.Module):
    """``tanh(h ⊙ w)``, a module without a rule of its own (the generic rule runs its forward), with a gradient
    hook on ``h ⊙ w``."""

    def __init__(self, hook) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.linspace(0.5, 1.5, 4))
        self.hook = hook

    def forward(self, h: Tensor) -> Tensor:
        z = h * self.w
        if self.hook is not None and z.requires_grad:
            z.register_hook(self.hook)
        return torch.tanh(z)


class _HookedHidden(nn.Module):
    """A tanh MLP whose hidden activations get a gradient hook registered in the forward (``hook=None``: none),
    or, ``inside``, a module without a rule of its own that registers it."""

    def __init__(self, hook=None, inside: bool = False) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.hook = None if inside else hook
        self.body, self.head = nn.Linear(3, 4), nn.Linear(4, 3)
        self.scale = _HookedScale(hook if inside else None)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        if self.hook is not None and h.requires_grad:
            h.register_hook(self.hook)
        return self.head(self.scale(h))


def _hessian(model: nn.Module, structure: str, backend: str) -> Tensor:
    return torchfim.fisher(model, mlp_inputs(9), estimator="hessian", structure=structure, n_samples=4,
                           generator=torch.Generator().manual_seed(3), backend=backend)


@pytest.mark.filterwarnings("ignore:torchfim. module")
@pytest.mark.parametrize("backend", ["auto", "functional"])
@pytest.mark.parametrize("region", ["no_grad", "set_grad_enabled", "decorator"])
def test_a_frozen_encoder_has_no_hessian_estimate(region: str, backend: str) -> None:
    model, twin = _FrozenEncoder(region).double(), _FrozenEncoder(None).double()
    got = _hessian(model, "diag", backend)
    assert torch.allclose(got, _hessian(twin, "diag", backend), rtol=1e-12, atol=1e-14)
    assert not got[:16].any()  # the encoder's weight and bias, as in the exact Fisher
    variance = torchfim.fisher_variance(model, mlp_inputs(9), estimator="hessian", structure="diag")
    assert torch.allclose(variance, torchfim.fisher_variance(twin, mlp_inputs(9), estimator="hessian",
                                                             structure="diag"), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("backend", ["auto", "functional"])
def test_a_statistic_taken_without_autograd_is_a_constant_of_the_hessian(backend: str) -> None:
    """The region's ``enable_grad()`` keeps the body's derivatives: the twin detaches the norm alone."""
    model, twin = _NormedHead(detached=False).double(), _NormedHead(detached=True).double()
    got, want = _hessian(model, "full", backend), _hessian(twin, "full", backend)
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    exact = torchfim.fisher(model, mlp_inputs(9), structure="full")
    assert torch.allclose(exact, torchfim.fisher(twin, mlp_inputs(9), structure="full"), rtol=1e-12, atol=1e-14)
    assert exact[:16, :16].abs().max() > 1e-3  # the body's block: kept by the enable_grad inside the region


@pytest.mark.parametrize("inside", [False, True], ids=["model", "ruleless-module"])
@pytest.mark.parametrize("backend", ["auto", "functional"])
@pytest.mark.parametrize("estimator", ["exact", "score", "hessian"])
def test_gradient_hooks_of_the_forward_are_no_part_of_the_fisher(estimator: str, backend: str, inside: bool) -> None:
    """``inside``: the hook is registered in the forward of a module that the per-module backend's generic rule
    runs itself (it was counted there: 4 times the Fisher of the module's weight)."""
    seen: list[Tensor] = []

    def compute(hook) -> Tensor:
        random = {} if estimator == "exact" else {"n_samples": 3, "generator": torch.Generator().manual_seed(3)}
        return torchfim.fisher(_HookedHidden(hook, inside).double(), mlp_inputs(9), estimator=estimator,
                               structure="diag", backend=backend, **random)

    want = compute(None)
    assert torch.allclose(compute(lambda g: 2 * g), want, rtol=1e-12, atol=0)
    assert torch.allclose(compute(seen.append), want, rtol=1e-12, atol=0) and not seen
    model = _HookedHidden(seen.append, inside).double()
    model(mlp_inputs(9)).sum().backward()  # the user's own backward: the hook is torch's again
    assert len(seen) == 1


def test_the_penalty_keeps_the_training_forwards_gradient_hooks() -> None:
    """The penalty's forward is the step's (its task loss shares it): a hook doubling the gradient into the body
    makes ``α‖g‖² = α(4‖g_body‖² + ‖g_head‖²)``, as in training (the same labels: same outputs, same seed)."""
    from torchfim.train import FisherPenalty

    def value(hook, body: bool = True) -> Tensor:
        model = _HookedHidden(hook).double()
        model.body.requires_grad_(body)
        return FisherPenalty(model, generator=torch.Generator().manual_seed(3))(mlp_inputs(9), step=0).detach()

    plain, head = value(None), value(None, body=False)
    assert torch.allclose(value(lambda g: 2 * g), 4 * (plain - head) + head, rtol=1e-12, atol=0)


def test_a_region_instance_shared_with_another_thread_sets_back_this_threads_setting() -> None:
    """One ``torch.no_grad()`` instance entered by a thread in the block and, meanwhile, by one outside it: each
    thread's forward-mode setting comes back as it was (before, the outside thread's exit took the other's)."""
    shared, inside, done, seen = torch.no_grad(), threading.Event(), threading.Event(), {}

    def in_block() -> None:
        with function_forwards():
            with shared:
                inside.set()
                done.wait(10)
            seen["after the region"] = torch._C._is_fwd_grad_enabled()

    def outside() -> None:
        inside.wait(10)
        with shared:
            pass
        seen["outside"] = torch._C._is_fwd_grad_enabled()
        done.set()

    threads = [threading.Thread(target=in_block), threading.Thread(target=outside)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {"after the region": True, "outside": True}
    left_open = torch.no_grad()
    try:
        with function_forwards():
            left_open.__enter__()  # a region the forward does not end
        assert torch._C._is_fwd_grad_enabled()
    finally:
        left_open.__exit__(None, None, None)  # autograd back on for the tests after


def test_a_monitor_sees_an_inference_mode_model_rewritten_in_place() -> None:
    """Weights loaded into a model made in inference mode, inside inference mode (an evaluation loop reading
    checkpoints): the monitor's next record is its twin's (before, it measured the weights of its first record)."""
    with torch.inference_mode():
        model = tanh_mlp(3)
    twin = tanh_mlp(3)
    monitors = [FisherTraceMonitor(m, mlp_inputs(7), generator=torch.Generator().manual_seed(1)) for m in (model, twin)]
    for step in range(2):
        got, want = (mon.measure(step).trace for mon in monitors)
        assert got == pytest.approx(want, rel=1e-12)
        with torch.inference_mode():
            for p in model.parameters():
                p.mul_(3)
        with torch.no_grad():
            for p in twin.parameters():
                p.mul_(3)
