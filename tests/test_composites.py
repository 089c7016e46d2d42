"""Layer norms and attention in composite form for forward-mode AD (``torchfim.engine.composites``).

The composite forms must give the fused functions' values, and second derivatives taken through
them by forward-over-forward AD must equal reverse-over-reverse Hessians (attention on torch's math
kernel, which has a double backward).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp
from torch_versions import TORCH_VERSION

from torchfim.engine.attention_kernel import math_attention
from torchfim.engine.composites import attention, composite_forms, layer_norm, multi_head_attention


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_equals_torch(affine: bool) -> None:
    torch.manual_seed(0)
    x = _randn(3, 4, 5, 6)
    w, b = (_randn(5, 6), _randn(5, 6)) if affine else (None, None)
    want = F.layer_norm(x, (5, 6), w, b, 1e-3)
    assert torch.allclose(layer_norm(x, (5, 6), w, b, 1e-3), want, rtol=0, atol=1e-12)
    assert torch.allclose(layer_norm(x, [6], None, None, 1e-5, True), F.layer_norm(x, [6]), rtol=0, atol=1e-12)


GROUPED = pytest.param("grouped", marks=pytest.mark.skipif(TORCH_VERSION < (2, 5), reason="enable_gqa is in torch 2.5+"))


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal", GROUPED])
def test_attention_equals_torch(mask: str) -> None:
    torch.manual_seed(1)
    q, k, v = _randn(2, 3, 4, 8), _randn(2, 3, 6, 8), _randn(2, 3, 6, 8)
    kw: dict = {"scale": 0.3}
    if mask == "bool":
        kw["attn_mask"] = torch.rand(4, 6) > 0.3
        kw["attn_mask"][:, 0] = True  # no row fully masked
    elif mask == "float":
        kw["attn_mask"] = _randn(4, 6)
    elif mask == "causal":
        q, kw["is_causal"] = _randn(2, 3, 6, 8), True
    elif mask == "grouped":  # grouped-query attention: 6 query heads share 3 key/value heads
        q, kw["enable_gqa"] = _randn(2, 6, 4, 8), True
    assert torch.allclose(attention(q, k, v, **kw), F.scaled_dot_product_attention(q, k, v, **kw), rtol=0, atol=1e-12)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multi_head_attention_keeps_the_callers_outputs(need_weights: bool) -> None:
    torch.manual_seed(2)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double().eval()
    x = _randn(3, 5, 8)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    want = mha(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    with composite_forms():
        got = mha(x, x, x, key_padding_mask=padding, need_weights=need_weights)
    assert torch.allclose(got[0], want[0], rtol=0, atol=1e-12)
    assert (got[1] is None) == (not need_weights)
    if need_weights:
        assert torch.allclose(got[1], want[1], rtol=0, atol=1e-12)
    args = (x.transpose(0, 1),) * 3 + (8, 2, mha.in_proj_weight, mha.in_proj_bias, None, None, False, 0.0,
                                      mha.out_proj.weight, mha.out_proj.bias)
    out, weights = multi_head_attention(*args, need_weights=False)
    assert weights is None and out.shape == (5, 3, 8)


class _Block(nn.Module):
    """tanh(W x) → LayerNorm → self-attention (as a transformer layer calls it) → sum of squares."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.norm = nn.Linear(4, 4), nn.LayerNorm(4)
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.lin(x)))
        return self.attn(h, h, h, need_weights=False)[0].square().sum()


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_over_forward_equals_reverse_over_reverse(seed: int) -> None:
    """eᵀ (∇²f) e along a direction of the first layer's weight, through LayerNorm and attention."""
    torch.manual_seed(seed)
    block = _Block().double().eval()
    x = _randn(2, 3, 4)
    w0 = block.lin.weight.detach().clone()
    e = _randn(*w0.shape)

    def f(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(block, {"lin.weight": w}, (x,))

    with math_attention():
        exact = e.flatten() @ torch.autograd.functional.hessian(f, w0).reshape(16, 16) @ e.flatten()
    with composite_forms():
        second = jvp(lambda w: jvp(f, (w,), (e,))[1], (w0,), (e,))[1]
    assert abs(float(second - exact)) <= 1e-10 * max(1.0, abs(float(exact)))
