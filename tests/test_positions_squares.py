"""Squared per-sample gradients of linear maps applied at positions (Linear on sequences, the attention's
projections, transformers' ``Conv1D``): :func:`positions_squares` against brute force, and the rules
that take it against the functional backend, in chunks of one sample and with several vectors."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from cases import BY_NAME, TokenModel
from torch import nn

import torchfim
from torchfim.engine.modules import attention as attention_module
from torchfim.engine.modules import base as base_module
from torchfim.engine.modules import linear as linear_module
from torchfim.engine.modules.base import positions_squares


@pytest.mark.parametrize("budget", [1, 24, 2**19], ids=["one-sample-chunks", "a-shorter-last-chunk", "one-chunk"])
def test_positions_squares_equal_brute_force_per_sample_gradients(monkeypatch, budget: int) -> None:
    monkeypatch.setattr(base_module, "SQUARES_ELEMENTS", budget)
    gen = torch.Generator().manual_seed(0)
    m, b, length, units, width = 3, 5, 4, 6, 2  # a budget of 24 = 2·width·units: chunks of 2, 2 and 1 samples
    g = torch.randn(m, b, length, units, generator=gen, dtype=torch.float64)
    a = torch.randn(b, length, width, generator=gen, dtype=torch.float64)
    weight, bias = positions_squares(g.transpose(1, 2).contiguous().transpose(1, 2), a)  # a strided g too
    per_sample = torch.einsum("jilo,ilk->ijko", g, a)  # ∂(vᵢⱼᵀoᵢ)/∂W in the layout (in, out)
    assert torch.allclose(weight, per_sample.square().sum((0, 1)), rtol=1e-13, atol=0)
    assert torch.allclose(bias, g.sum(2).square().sum((0, 1)), rtol=1e-13, atol=0)
    frozen_weight, same_bias = positions_squares(g, a, weight=False)
    assert frozen_weight is None and torch.equal(same_bias, bias)


class _Attention(nn.Module):
    """Self- or cross-attention over (B, L, 4) (cross: the three projections take different inputs)."""

    def __init__(self, cross: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.cross = cross
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = x.flip(1) * 0.5 if self.cross else x
        return self.head(self.attn(x, kv, kv, need_weights=False)[0].tanh().mean(1))


def _token_model() -> nn.Module:
    torch.manual_seed(3)
    return TokenModel(4).double()


def _encoder() -> nn.Module:
    return BY_NAME["encoder"].build(4)


def _attention(cross: bool, *frozen: str) -> nn.Module:
    torch.manual_seed(5)
    model = _Attention(cross).double().eval()
    for name in frozen:
        model.attn.get_parameter(name).requires_grad_(False)
    return model


def _biases_only(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """``build`` with every weight frozen (fine-tuning the biases alone, as BitFit does)."""

    def frozen() -> nn.Module:
        model = build()
        for name, p in model.named_parameters():
            p.requires_grad_("bias" in name)
        return model

    return frozen


MODELS = {
    "linear-at-positions": (_token_model, lambda: torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(1))),
    "encoder": (_encoder, lambda: BY_NAME["encoder"].inputs(4)),
    "self-attention": (lambda: _attention(False), lambda: torch.randn(4, 3, 4, dtype=torch.float64)),
    "cross-attention": (lambda: _attention(True), lambda: torch.randn(4, 3, 4, dtype=torch.float64)),
    "frozen-in-bias": (lambda: _attention(False, "in_proj_bias"), lambda: torch.randn(4, 3, 4, dtype=torch.float64)),
    "frozen-out-weight": (lambda: _attention(True, "out_proj.weight"), lambda: torch.randn(4, 3, 4, dtype=torch.float64)),
    "frozen-in-weight": (lambda: _attention(False, "in_proj_weight"), lambda: torch.randn(4, 3, 4, dtype=torch.float64)),
    "frozen-in-projection": (lambda: _attention(True, "in_proj_weight", "in_proj_bias"),
                             lambda: torch.randn(4, 3, 4, dtype=torch.float64)),
    "biases-only-encoder": (_biases_only(_encoder), lambda: BY_NAME["encoder"].inputs(4)),
    "biases-only-linear": (_biases_only(_token_model),
                           lambda: torch.randint(0, 5, (4, 6), generator=torch.Generator().manual_seed(1))),
}


@pytest.mark.parametrize("budget", [1, 24, 2**19], ids=["one-sample-chunks", "a-shorter-last-chunk", "one-chunk"])
@pytest.mark.parametrize("estimator", ["exact", "score"])
@pytest.mark.parametrize("name", list(MODELS))
def test_rules_at_positions_square_as_the_functional_backend(monkeypatch, name: str, estimator: str,
                                                            budget: int) -> None:
    """The diagonal through :func:`positions_squares` (taken by every covered call: spied) equals the
    functional backend's to 1e-10, in chunks of one sample or of all, with C − 1 vectors for the exact one."""
    monkeypatch.setattr(base_module, "SQUARES_ELEMENTS", budget)
    taken: list[int] = []
    weights: list[bool] = []

    def spy(g: torch.Tensor, a: torch.Tensor, weight: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        taken.append(g.shape[0])
        weights.append(weight)
        return positions_squares(g, a, weight)

    monkeypatch.setattr(linear_module, "positions_squares", spy)
    monkeypatch.setattr(attention_module, "positions_squares", spy)
    build, inputs = MODELS[name]
    model, x = build(), inputs()
    kw = dict(estimator=estimator, structure="diag")
    got = torchfim.fisher(model, x, generator=torch.Generator().manual_seed(2), **kw)
    want = torchfim.fisher(model, x, generator=torch.Generator().manual_seed(2), backend="functional", **kw)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
    assert taken and (estimator == "score" or max(taken) > 1)
    assert any(weights) != name.startswith("biases-only")  # no product formed for a frozen weight


@pytest.mark.parametrize("structure", ["full", "layers", "trace"])
@pytest.mark.parametrize("name", [n for n in MODELS if n.startswith(("frozen", "biases-only"))])
def test_frozen_projections_in_every_structure_as_the_functional_backend(name: str, structure: str) -> None:
    """Per-sample gradients (not only squares) with frozen weights or a frozen in-projection: with the
    whole in-projection frozen its ``q, k, v`` carry no autograd history and are not pulled back to."""
    build, inputs = MODELS[name]
    model, x = build(), inputs()
    got = torchfim.fisher(model, x, structure=structure)
    want = torchfim.fisher(model, x, structure=structure, backend="functional")
    for a, b in zip(got.values(), want.values()) if isinstance(got, dict) else [(got, want)]:
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)
