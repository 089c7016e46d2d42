"""torchfim called inside ``torch.no_grad()`` or ``torch.inference_mode()``, and inputs made in inference mode.

An evaluation block is where a monitor's measurement or a Fisher is often taken. torchfim differentiates,
so it computes with autograd on whatever mode the caller is in. Before: inside ``torch.no_grad()`` the
per-module backend raised "element 0 of tensors does not require grad" from inside torch (``fisher``,
``fisher_variance``, the monitor); inside ``torch.inference_mode()`` every one of them returned a wrong
Fisher without a word (the exact diagonal 0.25 off on a small MLP), and inputs made in inference mode
(a preprocessing step under it) made them raise "Inference tensors cannot be saved for backward", and so did a
model built or loaded in inference mode (for evaluation), whose parameters and buffers are such tensors (the
monitor raised "Inference tensors do not track version counter"). Oracle: the same call outside any such mode,
on a twin of the model made outside it.
"""

from __future__ import annotations

import pytest
import torch
from cases import mlp_inputs, tanh_mlp
from torch import nn

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor

_CALLS = {
    "fisher": lambda m, x: torchfim.fisher(m, x, structure="diag"),
    "fisher-functional": lambda m, x: torchfim.fisher(m, x, structure="diag", backend="functional"),
    "fisher-hessian": lambda m, x: torchfim.fisher(m, x, estimator="hessian", structure="diag", n_samples=3,
                                                   generator=torch.Generator().manual_seed(1)),
    "fisher_variance": lambda m, x: torchfim.fisher_variance(m, x, structure="diag"),
    "monitor": lambda m, x: torch.tensor(FisherTraceMonitor(m, x, generator=torch.Generator().manual_seed(1))
                                         .measure(0).trace),
    "penalty": lambda m, x: FisherPenalty(m, generator=torch.Generator().manual_seed(1))(x, step=0).detach(),
}
_MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@pytest.mark.parametrize("mode", list(_MODES))
@pytest.mark.parametrize("call", list(_CALLS))
def test_torchfim_inside_a_mode_without_autograd_computes_as_outside(call: str, mode: str) -> None:
    model, x = tanh_mlp(3), mlp_inputs(7)
    want = _CALLS[call](model, x)
    with _MODES[mode]():
        got = _CALLS[call](model, x)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("call", list(_CALLS))
def test_inputs_made_in_inference_mode_are_taken(call: str) -> None:
    model, x = tanh_mlp(3), mlp_inputs(7)
    with torch.inference_mode():
        made = x * 1.0
    assert made.is_inference()
    assert torch.allclose(_CALLS[call](model, made), _CALLS[call](model, x), rtol=1e-12, atol=0)


@pytest.mark.parametrize("call", [c for c in _CALLS if c != "penalty"])
def test_inputs_that_require_grad_leave_no_graph_on_the_result(call: str) -> None:
    """Inputs that require grad (a saliency map's): before, ``backend="functional"`` returned a Fisher that
    carried an autograd graph through them (held in memory; torch warned where the user read it as a number).
    The engine takes the inputs detached; the penalty, which a training step differentiates, keeps them."""
    model, x = tanh_mlp(3), mlp_inputs(7)
    wanting = x.clone().requires_grad_(True)
    got = _CALLS[call](model, wanting)
    assert not got.requires_grad and wanting.grad is None
    assert torch.allclose(got, _CALLS[call](model, x), rtol=1e-12, atol=0)


class _TiedNormed(nn.Module):
    """Two tanh layers with one weight (tied), batch norm between them (buffers read in eval mode)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.inner = nn.Linear(3, 3)
        self.norm = nn.BatchNorm1d(3)
        self.outer = nn.Linear(3, 3)
        self.outer.weight = self.inner.weight
        self.head = nn.Linear(3, 4)
        self.norm.running_mean.normal_()
        self.norm.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.outer(torch.tanh(self.norm(self.inner(x))))))


@pytest.mark.parametrize("call", [c for c in _CALLS if c != "penalty"])
def test_a_model_made_in_inference_mode_is_measured_as_its_twin(call: str) -> None:
    """The penalty is left out: such a model cannot be trained (its loss's backward raises in torch)."""
    want = _CALLS[call](_TiedNormed().double().eval(), mlp_inputs(7))
    with torch.inference_mode():
        model = _TiedNormed().double().eval()
    assert model.inner.weight.is_inference() and model.norm.running_var.is_inference()
    got = _CALLS[call](model, mlp_inputs(7))
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    assert model.inner.weight.is_inference()  # the user's model is left as it was


def test_a_model_made_in_inference_mode_keeps_its_ties() -> None:
    """One parameter held by two modules stays one: the full Fisher has the twin's size and values."""
    want = torchfim.fisher(_TiedNormed().double().eval(), mlp_inputs(7), structure="full")
    with torch.inference_mode():
        model = _TiedNormed().double().eval()
    got = torchfim.fisher(model, mlp_inputs(7), structure="full")
    assert got.shape == want.shape == (3 * 3 + 3 + 3 + 3 + 3 + 4 * 3 + 4,) * 2
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def test_the_report_of_a_model_made_in_inference_mode_is_its_twins() -> None:
    """The report freezes all but one parameter tensor for each layer's spectrum; torch lets a parameter made in
    inference mode require grad again only inside that mode (before: the report raised there)."""
    from torchfim import report

    def computed(model: nn.Module) -> dict:
        got = report.compute_report(model, report.Data(mlp_inputs(12), None, "held"), progress=False)
        return {key: got[key] for key in ("trace", "layers", "spectra")}

    with torch.inference_mode():
        model = tanh_mlp(3)
    assert computed(model) == computed(tanh_mlp(3))
    assert all(p.requires_grad and p.is_inference() for p in model.parameters())  # as the user had it
