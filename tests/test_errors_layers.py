"""Layers in a mode or state the Fisher cannot take end in a TorchfimError naming the fix (issue 2, point 5):
batch norm, dropout and RReLU in training mode (dropout inside recurrent and attention layers too), batch norm
without running statistics, embeddings with max_norm or scale_grad_by_freq, lazy modules before their first
forward, and models that mix samples.
"""

from __future__ import annotations

import re

import error_fixtures
import pytest
import torch
from conftest import mlp_inputs
from oracles import exact_fisher
from torch import nn

import torchfim
import torchfim.train
from torchfim import TorchfimError

model = error_fixtures.model  # a fixture the tests take


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(TorchfimError, match=r"BatchNorm layer in training mode.*model\.eval\(\)"):
        torchfim.fisher(model, mlp_inputs(4))
    model.eval()
    torchfim.fisher(model, mlp_inputs(4))


def test_batchnorm_without_running_statistics():
    """In eval mode too it normalises with the batch's statistics; before, a bare ValueError from torch."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).double()
    model.eval()
    with pytest.raises(TorchfimError, match=r"'1' is a BatchNorm layer without running statistics.*nn\.GroupNorm"):
        torchfim.fisher(model, mlp_inputs(4))


def _embedding_model(**options) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(6, 3, **options), nn.Flatten(), nn.Linear(12, 3)).double()


def test_embedding_with_max_norm_is_refused_with_the_fix_that_works():
    """Its forward rescales rows of the weight in place; before, the refusal blamed another thread."""
    model, ids = _embedding_model(max_norm=0.5), torch.randint(0, 6, (5, 4), generator=torch.Generator().manual_seed(1))
    with pytest.raises(TorchfimError, match=r"'0' is an embedding with max_norm=0\.5.*emb\.max_norm = None"):
        torchfim.fisher(model, ids)
    with torch.no_grad():  # the fix the message gives
        torch.embedding_renorm_(model[0].weight, ids, 0.5, 2.0)
    model[0].max_norm = None
    want = exact_fisher(model, ids, "categorical")
    assert torch.allclose(torchfim.fisher(model, ids, structure="full"), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_scale_grad_by_freq_leaves_the_fisher_of_derivatives(backend: str):
    """``scale_grad_by_freq`` rescales an embedding's gradient by the ids' counts in the batch (a training
    heuristic): the Fisher is of derivatives, the same as without it; the user's module keeps the flag."""
    model, ids = _embedding_model(scale_grad_by_freq=True), torch.randint(0, 6, (5, 4), generator=torch.Generator().manual_seed(1))
    want = exact_fisher(_embedding_model(), ids, "categorical")  # the same weights, without the flag
    got = torchfim.fisher(model, ids, structure="full", backend=backend)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13) and model[0].scale_grad_by_freq


@pytest.mark.parametrize("call", ["fisher", "fisher_variance", "samples_needed"])
def test_a_lazy_module_before_its_first_forward_is_refused_with_the_fix(call: str):
    """Its parameters have no shape yet; before, a RuntimeError from inside torch. After the forward the
    message names, the Fisher is the dense oracle's."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3)).double(), mlp_inputs(5)
    with pytest.raises(TorchfimError, match=r"'0\.weight', '0\.bias' of the model are not initialised yet.*model\(x\)"):
        getattr(torchfim, call)(model, x)
    with torch.no_grad():
        model(x)
    assert torch.allclose(torchfim.fisher(model, x, structure="full"), exact_fisher(model, x, "categorical"),
                          rtol=1e-10, atol=1e-13)


def test_training_tools_on_a_lazy_module_before_its_first_forward():
    """A monitor made, and measured, before the training loop's first forward is refused with the fix (before, a
    ValueError from inside torch) and, after that forward, measures what a monitor of the initialised model does;
    the penalty's own forward initialises the model, and its value and gradient are the initialised twin's."""
    import copy

    from torchfim.train import FisherPenalty, FisherTraceMonitor

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3)).double(), mlp_inputs(6)
    mon = FisherTraceMonitor(model, x, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TorchfimError, match=r"'0\.weight', '0\.bias' of the model are not initialised yet.*model\(x\)"):
        mon.measure(0)
    pen = FisherPenalty(model, generator=torch.Generator().manual_seed(1))
    value = pen(x, step=0)  # its forward initialises the lazy layer
    grads = torch.autograd.grad(value, list(model.parameters()))
    twin = copy.deepcopy(model)
    twin_value = FisherPenalty(twin, generator=torch.Generator().manual_seed(1))(x, step=0)
    assert float(value.detach()) == float(twin_value.detach()) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(twin_value, list(twin.parameters()))))
    want = FisherTraceMonitor(twin, x, generator=torch.Generator().manual_seed(0)).measure(0)
    got = mon.measure(0)
    assert (got.trace, got.stderr) == (want.trace, want.stderr)


def test_dropout_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double()
    with pytest.raises(TorchfimError, match=r"Dropout.*model\.eval\(\)"):
        torchfim.fisher(model, mlp_inputs(4))


def test_rrelu_in_training_mode_is_named_as_random():
    """Before: refused as mixing samples (its random slopes differ between forwards)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 3)).double()
    with pytest.raises(TorchfimError, match=r"'1' is an RReLU in training mode.*random.*model\.eval\(\)"):
        torchfim.fisher(model, mlp_inputs(4))
    model.eval()
    assert torch.allclose(torchfim.fisher(model, mlp_inputs(4), structure="full"),
                          exact_fisher(model, mlp_inputs(4), "categorical"), rtol=1e-10, atol=1e-13)


class MixesSamples(nn.Module):
    """Subtracts the batch mean: a forward that couples samples without BatchNorm."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3).double()

    def forward(self, x):
        h = self.linear(x)
        return h - h.mean(0, keepdim=True)


def test_generic_sample_mixing_is_caught():
    with pytest.raises(TorchfimError, match="depends on the other samples"):
        torchfim.fisher(MixesSamples(), mlp_inputs(4))


class _InnerDropout(nn.Module):
    """Layers whose dropout is an argument, not an nn.Dropout module (``kind``: "lstm" or "attention")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True) if kind == "lstm" else None
        self.attn = nn.MultiheadAttention(3, 1, dropout=0.5, batch_first=True) if kind == "attention" else None
        self.head = nn.Linear(4 if kind == "lstm" else 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lstm(x)[0] if self.kind == "lstm" else self.attn(x, x, x, need_weights=False)[0]
        return self.head(h[:, -1])


@pytest.mark.parametrize(("kind", "name"), [("lstm", "'lstm' (LSTM)"), ("attention", "'attn' (MultiheadAttention)")])
def test_dropout_inside_a_recurrent_or_attention_layer_in_training_mode_is_named(kind: str, name: str) -> None:
    """Before, it was refused as a model whose samples mix (its outputs differ from call to call)."""
    model, x = _InnerDropout(kind).train(), torch.randn(6, 5, 3)
    with pytest.raises(TorchfimError, match=re.escape(name) + r" applies its own dropout \(dropout=0.5\) in training mode.*model.eval"):
        torchfim.fisher(model, x, structure="trace")
    assert torch.isfinite(torchfim.fisher(model.eval(), x, structure="trace"))
