"""FisherPenalty on outputs with positions (a language model's ``(B, T, V)`` logits), with a padding mask.

The oracle is the definition with one label per position, drawn as the penalty draws them (one
``Categorical.sample`` on the ``(B·T, V)`` per-position outputs from the same seed), the NLL of an input
summed over its observed positions and averaged over inputs, differentiated twice by autograd in
float64: batch gradient ``α‖∇_θ (1/B) Σᵢ Σₜ mᵢₜ (−log p(ŷᵢₜ|xᵢ))‖²``, trace ``α (1/B) Σᵢ ‖∇_θ Σₜ log p(ŷᵢₜ|xᵢ)‖²``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracles import penalty_definition
from torch import nn

from torchfim import TorchfimError
from torchfim.engine.attention_kernel import math_attention
from torchfim.families import Categorical
from torchfim.train import FisherPenalty

VOCAB, B, T, ALPHA = 7, 4, 5, 0.3


class _TokenModel(nn.Module):
    """Per-token logits ``(B, T, V)`` that depend on the whole sequence (a mean over it), as a decoder's do."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(VOCAB, 6), nn.Linear(6, 6), nn.Linear(6, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(tokens))
        return self.head(torch.tanh(self.mix(h) + h.mean(1, keepdim=True)))


def _setup() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    tokens = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:], mask[2, 1:] = False, False
    return _TokenModel().double(), tokens, mask


def _labels(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        o = model(tokens)
    return Categorical().sample(o.reshape(-1, VOCAB), 1, torch.Generator().manual_seed(5)).reshape(B, T)


def _oracle(model: nn.Module, tokens: torch.Tensor, mask: torch.Tensor | None, kind: str) -> list[torch.Tensor]:
    """Value and gradient of the penalty from its definition."""
    params, y = list(model.parameters()), _labels(model, tokens)
    keep = torch.ones(B, T, dtype=torch.float64) if mask is None else mask.double()

    def log_p(rows: slice) -> torch.Tensor:
        lp = torch.log_softmax(model(tokens[rows]), -1).gather(-1, y[rows, :, None])[..., 0]
        return (lp * keep[rows]).sum()

    return penalty_definition(log_p, params, B, kind, ALPHA)


def _penalty(model: nn.Module, **kw: object) -> FisherPenalty:
    return FisherPenalty(model, alpha=ALPHA, generator=torch.Generator().manual_seed(5), **kw)


#: (kind, grad_method, masked).
CASES = [(kind, method, masked) for kind in ("batch_gradient", "trace") for method in ("exact", "finite_difference")
         for masked in (False, True)]


@pytest.mark.parametrize(("kind", "grad_method", "masked"), CASES)
def test_penalty_on_position_outputs_equals_its_definition(kind: str, grad_method: str, masked: bool) -> None:
    model, tokens, mask = _setup()
    want = _oracle(model, tokens, mask if masked else None, kind)
    term = _penalty(model, kind=kind, grad_method=grad_method)(tokens, step=0, mask=mask if masked else None)
    got = [term.detach(), *torch.autograd.grad(term, list(model.parameters()))]
    tol = 1e-11 if grad_method == "exact" else 1e-6  # the forward difference: ε·‖H'‖ (float64)
    assert torch.allclose(got[0], want[0], rtol=1e-12, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert torch.allclose(g, w, rtol=tol, atol=tol * max(float(t.abs().max()) for t in want[1:]))


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_the_shared_forward_takes_the_mask_too(kind: str) -> None:
    """``penalised_loss``: the task loss on all the outputs, the penalty's value as ``pen(x, mask=...)``."""
    model, tokens, mask = _setup()
    value = _penalty(model, kind=kind, grad_method="finite_difference")(tokens, step=0, mask=mask)
    assert not torch.allclose(value, _penalty(model, kind=kind)(tokens, step=0), rtol=1e-3)  # the mask matters
    shared = _penalty(model, kind=kind, grad_method="finite_difference")
    loss = shared.penalised_loss(tokens, lambda out: F.cross_entropy(out.reshape(-1, VOCAB), tokens.reshape(-1)),
                                 step=0, mask=mask)
    assert torch.allclose(shared.last_value, value.detach(), rtol=1e-12, atol=0)
    assert torch.allclose(loss - shared.last_value, F.cross_entropy(model(tokens).reshape(-1, VOCAB), tokens.reshape(-1)),
                          rtol=1e-6)  # the task loss at θ + εĝ


def test_masks_the_penalty_cannot_use_are_refused() -> None:
    model, tokens, mask = _setup()
    with pytest.raises(TorchfimError, match=r"mask must be a bool tensor \(batch, \*positions\).*one row per input \(4\)"):
        _penalty(model)(tokens, step=0, mask=mask[:2])
    with pytest.raises(TorchfimError, match=r"mask must be a bool tensor of shape \(batch, 5\)"):
        _penalty(model)(tokens, step=0, mask=mask[:, :3])
    with pytest.raises(TorchfimError, match=r"got torch.float64 \(4, 5\) holding values other than 0 and 1"):
        _penalty(model)(tokens, step=0, mask=mask.double() * 0.5)  # a weighting, not a mask
    flat = nn.Sequential(nn.Linear(3, 4)).double()
    with pytest.raises(TorchfimError, match=r"shape \(4, 5\) marks positions, but the model's outputs \(4, 4\) have none.*"
                                            r"pass a \(batch,\) mask"):
        _penalty(flat)(torch.randn(4, 3, dtype=torch.float64), step=0, mask=mask)


@pytest.mark.parametrize(("kind", "grad_method"), [(k, g) for k in ("batch_gradient", "trace")
                                                   for g in ("exact", "finite_difference")])
def test_a_mask_of_one_value_per_input_is_one_position_per_input(kind: str, grad_method: str) -> None:
    """Outputs ``(B, C)`` with a ``(B,)`` mask, as ``fisher`` reads them: an input marked False observes nothing,
    ``α‖∇_θ (1/B) Σᵢ mᵢ (−log p(ŷᵢ|xᵢ))‖²``, the mean still over all ``B`` inputs."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, VOCAB)).double()
    x = torch.randn(B, 3, dtype=torch.float64)
    keep = torch.tensor([True, False, True, True])
    with torch.no_grad():
        y = Categorical().sample(model(x), 1, torch.Generator().manual_seed(5)).reshape(B)

    def log_p(rows: slice) -> torch.Tensor:
        lp = torch.log_softmax(model(x[rows]), -1).gather(-1, y[rows, None])[:, 0]
        return (lp * keep[rows].double()).sum()

    want = penalty_definition(log_p, list(model.parameters()), B, kind, ALPHA)
    term = _penalty(model, kind=kind, grad_method=grad_method)(x, step=0, mask=keep)
    got = [term.detach(), *torch.autograd.grad(term, list(model.parameters()))]
    tol = 1e-11 if grad_method == "exact" else 1e-6
    assert torch.allclose(got[0], want[0], rtol=1e-12, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert torch.allclose(g, w, rtol=tol, atol=tol * max(float(t.abs().max()) for t in want[1:]))
    unmasked = _penalty(model, kind=kind, grad_method=grad_method)(x, step=0)
    assert not torch.allclose(term, unmasked, rtol=1e-3)  # the mask matters


def test_outputs_and_inputs_the_penalty_cannot_read_are_refused_with_the_fix_named() -> None:
    model, tokens, mask = _setup()

    class _Returns(nn.Module):
        def __init__(self, wrap) -> None:
            super().__init__()
            self.inner, self.wrap = model, wrap

        def forward(self, t: torch.Tensor) -> object:
            return self.wrap(self.inner(t))

    for method in ("exact", "finite_difference"):
        with pytest.raises(TorchfimError, match=r"returned a tuple.*pass output= a function that picks it"):
            _penalty(_Returns(lambda o: (o,)), grad_method=method)(tokens, step=0)
        with pytest.raises(TorchfimError, match=r"returned a tuple.*pass output="):
            _penalty(_Returns(lambda o: (o,)), grad_method=method, sub_batch=2).penalised_loss(
                tokens, lambda out: 0.0, step=0)
        # a dict with logits is read as fisher reads it, and output= picks any other field
        want = _penalty(model, grad_method=method)(tokens, step=0)
        assert torch.equal(_penalty(_Returns(lambda o: {"logits": o}), grad_method=method)(tokens, step=0), want)
        assert torch.equal(_penalty(_Returns(lambda o: (o,)), grad_method=method, output=lambda out: out[0])(
            tokens, step=0), want)
    with pytest.raises(TorchfimError, match=r"FisherPenalty takes the mini-batch as a torch.Tensor .* or a dict"):
        _penalty(model)([tokens], step=0)
    with pytest.raises(TorchfimError, match=r"a dict mini-batch needs tensors whose first dim is the batch"):
        _penalty(model)({"n": 3}, step=0)
    with pytest.raises(TorchfimError, match=r"mask='attention_mask' names a key of the dict mini-batch.*none"):
        _penalty(model)(tokens, step=0, mask="attention_mask")
    with pytest.raises(TorchfimError, match="output must be a function"):
        _penalty(model, output="logits")


class _Encoder(nn.Module):
    """Embedding → TransformerEncoderLayer (attention by SDPA, LayerNorm) → mean pool → Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(tokens)).mean(1))


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_exact_penalty_through_attention_and_layer_norm_equals_its_definition(kind: str) -> None:
    """Double backprop through a transformer layer: torch has no double backward for its CPU flash
    attention (a bare RuntimeError before) and, under vmap (kind='trace'), gets layer_norm's wrong (the
    gradient was off by 5 % of its size). The oracle runs attention on torch's math kernel, without vmap."""
    torch.manual_seed(0)
    model, tokens = _Encoder().double().eval(), torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    params = list(model.parameters())
    with torch.no_grad():
        y = Categorical().sample(model(tokens), 1, torch.Generator().manual_seed(5)).reshape(B)
    with math_attention():
        value, *want = penalty_definition(
            lambda rows: -F.cross_entropy(model(tokens[rows]), y[rows], reduction="sum"), params, B, kind, ALPHA)
    term = _penalty(model, kind=kind)(tokens, step=0)
    got = torch.autograd.grad(term, params)
    assert torch.allclose(term, value, rtol=1e-10, atol=0)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-9, atol=1e-10 * scale)
