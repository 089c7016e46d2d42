"""torchfim's forwards leave the model's buffers as they were: a forward that writes one in place (a call counter,
a running average kept in eval mode) must not carry torchfim's measurements into the user's model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfim
from torchfim import TorchfimError
from torchfim.train import FisherTraceMonitor


class _Counting(nn.Module):
    """A linear classifier whose forward counts its calls and keeps a running mean of its inputs, in place;
    with ``scaled`` its outputs read the counter (so each forward is another model)."""

    def __init__(self, scaled: bool = False) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.register_buffer("calls", torch.zeros(()))
        self.register_buffer("mean", torch.zeros(3))
        self.scaled = scaled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        out = self.lin(x)
        return out * self.calls if self.scaled else out


def _setup(scaled: bool = False) -> tuple[nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _Counting(scaled).double().eval()
    x = torch.randn(12, 3, dtype=torch.float64)
    return model, x, {n: b.clone() for n, b in model.named_buffers()}


def _unmoved(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    for name, b in model.named_buffers():
        assert torch.equal(b, before[name]), name


def _brute_force(model: _Counting, x: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σᵢ Jᵢᵀ (diag(p) − ppᵀ) Jᵢ`` for the linear classifier, dense in float64, from the closed-form
    Jacobian ``∂zₖ/∂W = eₖ xᵀ``, ``∂zₖ/∂b = eₖ``."""
    w, b = model.lin.weight.detach(), model.lin.bias.detach()
    total = torch.zeros(w.numel() + b.numel(), w.numel() + b.numel(), dtype=torch.float64)
    for xi in x:
        p = torch.softmax(w @ xi + b, 0)
        lam = torch.diag(p) - torch.outer(p, p)
        jac = torch.cat([torch.kron(torch.eye(4, dtype=torch.float64), xi[None]), torch.eye(4, dtype=torch.float64)], 1)
        total += jac.T @ lam @ jac
    return total / len(x)


@pytest.mark.parametrize("structure", ["full", "diag"])
@pytest.mark.parametrize("backend", ["auto", "modules"])
def test_a_fisher_leaves_buffers_written_in_place_as_they_were(structure: str, backend: str) -> None:
    model, x, before = _setup()
    got = torchfim.fisher(model, x, family="categorical", structure=structure, backend=backend)
    _unmoved(model, before)
    want = _brute_force(model, x)
    assert torch.allclose(got, want if structure == "full" else torch.diagonal(want), rtol=1e-10, atol=1e-13)


def test_variance_and_score_estimates_leave_buffers_as_they_were() -> None:
    model, x, before = _setup()
    torchfim.fisher_variance(model, x, family="categorical", estimator="score", structure="diag")
    torchfim.fisher(model, x, family="categorical", estimator="score", structure="trace", n_samples=3)
    _unmoved(model, before)


def test_a_refused_forward_leaves_buffers_as_they_were() -> None:
    model, x, before = _setup(scaled=True)
    with pytest.raises(TorchfimError, match=r"updates its buffers 'calls', 'mean' in place"):
        torchfim.fisher(model, x, family="categorical", structure="diag")
    _unmoved(model, before)


def test_the_monitor_leaves_buffers_as_they_were_between_measurements() -> None:
    model, x, before = _setup()
    monitor = FisherTraceMonitor(model, x, family="categorical", every=1)
    for step in range(3):
        assert monitor.step(step) is not None
        _unmoved(model, before)
    model(x)  # the user's own forward still updates them
    assert model.calls.item() == before["calls"].item() + 1


def test_another_writers_updates_of_the_users_buffers_are_kept() -> None:
    """A hook that writes the user's own buffer tensor on every forward of the engine's copy stands in for another
    writer (a training thread updating running statistics meanwhile): its updates stay. Writing the buffers' old
    values back after a pass (the first version) undid them; the copy now writes only into its own clones."""
    model, x, before = _setup()
    users = model.mean  # the tensor itself, as another thread holds it

    def other_writer(module: nn.Module, args: tuple) -> None:
        with torch.no_grad():
            users.add_(1.0)

    model.register_forward_pre_hook(other_writer)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    got = torchfim.fisher(model, x, family="categorical", structure="full")
    assert torch.equal(model.mean, before["mean"] + len(calls)) and len(calls) >= 2
    assert model.calls.item() == before["calls"].item()  # the forward's own counter: written into the clone
    assert torch.allclose(got, _brute_force(model, x), rtol=1e-10, atol=1e-13)
