"""An ``nn.MultiheadAttention`` under the generic rule (``add_bias_kv``, which has no rule of its own; or its attention
weights read downstream, which its rule leaves to the generic one) given the masks a model builds in its forward: a 3-D
``attn_mask`` ``(B·H, T, S)``, one per sample and head, a 2-D one ``(T, S)`` shared by every sample, a key padding mask.

Before, the generic rule read the masks by their shape alone: a 3-D mask's leading ``B·H`` rows were no batch dim, so
every sample's forward got the whole batch's mask, and torch refused it (``should be (H, T, S)``); a 2-D mask with as
many rows as samples was cut by row; with ``batch_first=False``, a 3-D mask with as many rows as samples at dim 1 was cut
there. The oracle is the definition ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from ``torch.func`` Jacobians of the whole model, in float64.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import module_rules, torchfim_messages
from oracles import exact_fisher
from torch import Tensor, nn
from torch.nn import functional as F

import torchfim
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.attention import AttentionRule
from torchfim.errors import TorchfimError


class _Masked(nn.Module):
    """Self-attention over inputs ``(B, T, 6)`` with a mask built from them: ``"3d"`` an additive ``(B·H, T, T)``,
    ``"bool3d"`` a boolean one, ``"2d"`` a causal ``(T, T)``; with ``padding``, a key padding mask too."""

    def __init__(self, batch_first: bool, bias_kv: bool, weights: bool, mask: str, padding: bool, heads: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(6, heads, batch_first=batch_first, add_bias_kv=bias_kv)
        self.batch_first, self.weights, self.mask, self.padding = batch_first, weights, mask, padding
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        length, heads = x.shape[1], self.attn.num_heads
        score = x[:, :, :1] - x[:, :, :1].transpose(1, 2)  # (B, T, T): one mask per sample
        kwargs: dict = {"need_weights": self.weights}
        if self.mask == "3d":  # head h of sample b at row b·H + h, as torch reads it
            kwargs["attn_mask"] = torch.stack([score * (h + 1) * (-1) ** h for h in range(heads)], 1).flatten(0, 1)
        elif self.mask == "bool3d":
            kwargs["attn_mask"] = ((score > 0.5) & ~torch.eye(length, dtype=torch.bool)).repeat_interleave(heads, 0)
        else:
            kwargs["attn_mask"] = torch.triu(torch.full((length, length), -2.0, dtype=x.dtype), 1)
        if self.padding:
            kwargs["key_padding_mask"] = ((x[:, :, 0] > 0.3) & (torch.arange(length) > 0)).to(x.dtype) * -4.0
        q = x if self.batch_first else x.transpose(0, 1)
        z, weights = self.attn(q, q, q, **kwargs)
        z = (z if self.batch_first else z.transpose(0, 1)).tanh().mean(1)
        return self.head(z + weights[:, 0, :1] if self.weights else z)


CASES = [  # (batch_first, add_bias_kv, weights used, mask, padding, heads, (B, T))
    (True, True, False, "3d", False, 2, (5, 3)),
    (False, True, False, "3d", True, 3, (5, 3)),
    (True, False, True, "3d", True, 2, (5, 3)),
    (False, False, True, "bool3d", False, 2, (5, 4)),
    (False, True, False, "3d", False, 1, (4, 4)),  # T = B, batch_first=False: the mask's dim 1 looked like the batch
    (True, True, False, "2d", True, 2, (4, 4)),  # T = B: the shared mask's rows looked like samples
    (False, False, True, "2d", False, 3, (2, 2)),
]


@pytest.mark.parametrize("batch_first,bias_kv,weights,mask,padding,heads,shape", CASES)
def test_masks_built_in_the_forward_are_cut_by_sample_under_the_generic_rule(batch_first, bias_kv, weights, mask,
                                                                              padding, heads, shape) -> None:
    torch.manual_seed(0)
    model = _Masked(batch_first, bias_kv, weights, mask, padding, heads).double().eval()
    x = torch.randn(*shape, 6, dtype=torch.float64)
    want = exact_fisher(model, x, "categorical")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = torchfim.fisher(model, x, structure="full")
        diag = torchfim.fisher(model, x, structure="diag")
    assert not torchfim_messages(caught)  # nothing moved or looped: the module's own generic products
    assert torch.allclose(full, want, rtol=1e-10, atol=1e-14)
    assert torch.allclose(diag, torch.diagonal(want), rtol=1e-10, atol=1e-14)
    _, rules = module_rules(model, x)
    assert isinstance(rules["attn"], AttentionRule if not bias_kv else GenericRule)


class _OwnAttention(nn.Module):
    """An attention of the user's own that takes its mask as ``(B·H, T, T)`` and unfolds it itself."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.heads = nn.Parameter(torch.randn(3, 6, 6) * 0.3), 2

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, length, width = x.shape
        q, k, v = (F.linear(x, w).reshape(b, length, self.heads, -1).transpose(1, 2) for w in self.qkv)
        mask = mask.reshape(b, self.heads, length, length)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, length, width)


class _OwnMasked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.head = _OwnAttention(), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        score = x[:, :, :1] - x[:, :, :1].transpose(1, 2)
        return self.head(self.attn(x, torch.stack([score, -score], 1).flatten(0, 1)).tanh().mean(1))


def test_a_folded_mask_passed_to_a_module_of_the_users_is_refused_with_the_argument_named() -> None:
    """Which rows of ``(B·H, T, T)`` are a sample's only ``nn.MultiheadAttention``'s signature says; for a module of the
    user's the generic rule cannot tell, and says so, naming the argument and the ways out (the whole-model backend,
    which needs no cut, is exact)."""
    torch.manual_seed(0)
    model = _OwnMasked().double()
    x = torch.randn(5, 3, 6, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"argument 1 of shape \(4, 3, 3\) holds the call's 2 inputs folded with "
                                            r"other rows, 2 each.*\(B, H, T, S\).*backend='functional'"):
        torchfim.fisher(model, x, structure="diag")
    got = torchfim.fisher(model, x, structure="full", backend="functional")
    assert torch.allclose(got, exact_fisher(model, x, "categorical"), rtol=1e-10, atol=1e-14)
