"""The per-module backend's attention rule: it covers its out-projection, equals the functional backend (self- and
cross-attention over longer keys, sample by sample in chunks), is recorded in parts unless its weights are asked
for, and fails as torch does on a causal hint without a mask.
"""

from __future__ import annotations

import pytest
import torch
from cases import BY_NAME
from engine_checks import _assert_equals_functional, _rules
from torch import nn

import torchfim
from torchfim.engine import ModelView, batches
from torchfim.engine.modules.attention import AttentionRule
from torchfim.engine.modules.linear import LinearRule
from torchfim.engine.per_module import PerModuleBackend


def test_attention_has_its_own_rule_covering_its_out_projection() -> None:
    case = BY_NAME["encoder"]
    rules = _rules(case.build(3), case.inputs(3))
    assert rules["layer.self_attn"] == AttentionRule.__name__
    assert "layer.self_attn.out_proj" not in rules  # its parameters are used by the attention's forward
    assert rules["layer.linear1"] == LinearRule.__name__


class _Attend(nn.Module):
    """Multi-head attention over inputs (B, L, 4) with the masks and layouts of one test case."""

    def __init__(self, batch_first: bool, cross: bool, mask: str, bias: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first, bias=bias)
        self.batch_first, self.cross, self.mask = batch_first, cross, mask
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length = x.shape[0], x.shape[1]
        q = x if self.batch_first else x.transpose(0, 1)
        kv = (q.flip(-1) * 0.5) if self.cross else q
        kwargs: dict = {"need_weights": self.mask == "weights"}
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        if self.mask == "causal":
            kwargs.update(attn_mask=causal, is_causal=True)
        elif self.mask == "additive3d":
            score = x[:, :, :1] - x[:, :, :1].transpose(1, 2)  # one additive mask per sample and head
            kwargs["attn_mask"] = torch.stack([score, -2 * score], 1).reshape(b * 2, length, length)
        elif self.mask == "padding":
            pad = (x[:, :, 0] > 0.3) & (torch.arange(length) > 0)  # never the first key, so no row is all masked
            kwargs.update(key_padding_mask=pad, attn_mask=causal.to(x.dtype) * -3.0)
        z = self.attn(q, kv, kv, **kwargs)[0]
        z = z if self.batch_first else z.transpose(0, 1)
        return self.head(z.tanh().mean(1))


@pytest.mark.parametrize(
    "batch_first,cross,mask,bias",
    [(True, False, "none", True), (False, False, "causal", True), (True, True, "additive3d", False),
     (False, True, "padding", True), (True, False, "weights", True)],
)
@pytest.mark.parametrize("estimator", ["exact", "score"])
def test_attention_rule_equals_the_functional_backend(batch_first, cross, mask, bias, estimator) -> None:
    torch.manual_seed(1)
    model = _Attend(batch_first, cross, mask, bias).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert _rules(model, x)["attn"] == AttentionRule.__name__
    _assert_equals_functional(model, x, estimator, seed=3)


class _AttendLonger(nn.Module):
    """Cross-attention whose keys and values have 2 positions more than the queries (S = L + 2)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.memory = nn.Linear(4, 4)
        self.batch_first = batch_first
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.memory(torch.cat([x, x[:, :2].flip(-1)], 1))  # (B, L + 2, 4)
        q, kv = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        mask = -torch.arange(kv.shape[0 if not self.batch_first else 1], dtype=x.dtype) * 0.3  # (S,) additive
        z = self.attn(q, kv, kv, need_weights=False, attn_mask=mask.expand(x.shape[1], -1))[0]
        z = z if self.batch_first else z.transpose(0, 1)
        return self.head(z.tanh().mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_over_longer_keys_equals_the_functional_backend(batch_first: bool) -> None:
    torch.manual_seed(4)
    model = _AttendLonger(batch_first).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert _rules(model, x)["attn"] == AttentionRule.__name__
    for estimator in ("exact", "score"):
        _assert_equals_functional(model, x, estimator, seed=5, structures=("diag",))


@pytest.mark.parametrize(("mask", "cross", "parts", "taps"),
                         [("none", False, 1, 2), ("padding", True, 3, 4), ("weights", False, 0, 2)])
def test_attention_is_recorded_in_parts_unless_its_weights_are_asked_for(mask: str, cross: bool, parts: int,
                                                                         taps: int) -> None:
    """While recording, the attention runs in parts on the engine's copy: its outputs equal the module's
    own, ``q, k, v`` become taps (one packed tap for self-attention, three otherwise), and afterwards
    the copy's forward is the module's again. A call asking for the weights keeps the module's forward."""
    torch.manual_seed(6)
    model = _Attend(False, cross, mask, True).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    view = ModelView(model)
    backend = PerModuleBackend(view)
    rec = backend.record(next(batches(x, None, view.device, view.dtype)))
    (call,) = [c for r, c in rec.calls if isinstance(r, AttentionRule)]
    assert len(call.cache.get("parts", ())) == parts and len(call.taps) == taps  # weights: output and weights
    assert "forward" not in view.model.attn.__dict__
    assert torch.allclose(rec.values, model(x), rtol=1e-12, atol=1e-14)


def test_attention_rule_sample_by_sample_chunks_equal_the_functional_backend(monkeypatch) -> None:
    """The attention backward is computed once per call and reused: chunks of one sample must agree."""
    import torchfim.engine.modules.base as base_module
    import torchfim.engine.per_module as per_module

    monkeypatch.setattr(per_module, "CACHE_ELEMENTS", 1)  # one sample per chunk of per-sample products
    monkeypatch.setattr(base_module, "SQUARES_ELEMENTS", 1)  # and of the squares at positions
    torch.manual_seed(2)
    model = _Attend(False, True, "padding", True).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    got = torchfim.fisher(model, x, structure="diag")
    want = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


def test_attention_causal_hint_without_a_mask_fails_as_in_torch() -> None:
    """``is_causal=True`` without ``attn_mask`` is refused by torch; recording in parts must not compute
    an unmasked attention instead."""

    class Hinted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False, is_causal=True)[0].mean(1))

    model, x = Hinted().double(), torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        model(x)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        torchfim.fisher(model, x)
