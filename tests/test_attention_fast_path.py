"""A transformer encoder in eval mode with a padding mask (``nn.TransformerEncoder``, whose nested-tensor fast path
torch takes by default without autograd).

Without autograd the encoder packs the padded batch into a nested tensor and gives the padded positions zeros,
where the forward with autograd (the one training and torchfim differentiate) computes them; the engine's check
that samples are independent runs without autograd, so it saw other outputs and refused the model as mixing
samples. The engine's forwards now take no fast path (``engine/function_forwards.py``), nor do the trace penalty's
forward for its labels and its per-input gradients.

Oracle: ``(1/n) Σᵢ Σₜ mᵢₜ Jᵢₜᵀ Λᵢₜ Jᵢₜ`` from ``torch.func`` Jacobians of the forward with the fast path off
(float64), with the padding mask ``m`` and without one (every position observed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev
from torch_versions import FAST_PATH_SWITCH

import torchfim
from torchfim.engine.function_forwards import attention_fast_path_off
from torchfim.train import FisherPenalty, FisherTraceMonitor


class _Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)  # enable_nested_tensor=True, torch's default
        self.head = nn.Linear(8, 3)

    def forward(self, ids: Tensor, pad: Tensor) -> Tensor:
        return self.head(self.encoder(self.embed(ids), src_key_padding_mask=pad))


def _model_and_batch(mask_check: bool = True) -> tuple[nn.Module, dict[str, Tensor]]:
    """``mask_check=False``: the encoder does not ask whether the padding is left-aligned before packing it."""
    torch.manual_seed(0)
    model = _Encoder().double().eval()
    model.encoder.mask_check = mask_check
    pad = torch.zeros(5, 6, dtype=torch.bool)
    pad[0, 4:], pad[2, 2:], pad[3, 5:] = True, True, True  # right-padded, as a tokenizer pads
    return model, {"ids": torch.randint(0, 11, (5, 6)), "pad": pad}


def _oracle(model: nn.Module, batch: dict[str, Tensor], observed: Tensor) -> Tensor:
    """Every forward here has autograd on and parameters that require it, so torch takes no fast path (on any
    torch: 2.2 has no switch to turn it off)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    total = torch.zeros(sum(p.numel() for p in params.values()), dtype=torch.float64)
    for i in range(len(batch["ids"])):
        one = {k: v[i : i + 1] for k, v in batch.items()}
        jac = jacrev(lambda p, one=one: functional_call(model, p, (), one)[0])(params)
        jac = torch.cat([j.reshape(6, 3, -1) for j in jac.values()], -1)  # (T, C, P)
        probs = model(**one)[0].detach().softmax(-1)
        lam = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
        total += torch.einsum("tcp,tcd,tdp,t->p", jac, lam, jac, observed[i].double())
    return total / len(batch["ids"])


@pytest.mark.parametrize("mask_check", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_an_eval_mode_encoder_with_a_padding_mask_has_its_fisher(masked: bool, mask_check: bool) -> None:
    model, batch = _model_and_batch(mask_check)
    observed = ~batch["pad"] if masked else torch.ones_like(batch["pad"])
    mask = (lambda b: ~b["pad"]) if masked else None
    want = _oracle(model, batch, observed)
    got = torchfim.fisher(model, [batch], structure="diag", mask=mask)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert not FAST_PATH_SWITCH or torch.backends.mha.get_fastpath_enabled()  # the user's setting, as it was


def test_the_monitor_measures_an_eval_mode_encoder_with_a_padding_mask() -> None:
    model, batch = _model_and_batch()
    want = float(_oracle(model, batch, ~batch["pad"]).sum())
    record = FisherTraceMonitor(model, [batch], mask=lambda b: ~b["pad"], n_samples=64).measure(0)
    assert abs(record.trace - want) < 5 * record.stderr


def test_attention_layers_script_while_and_after_the_stand_in_is_installed() -> None:
    """TorchScript compiles the attention layer's call of ``get_fastpath_enabled``: the stand-in's own body
    (a ``ThreadMode``) failed to compile, and the half-compiled class then refused every later script."""
    with attention_fast_path_off():
        during = torch.jit.script(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True).eval())
        encoder = torch.jit.script(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2))
    after = torch.jit.script(nn.MultiheadAttention(8, 2, batch_first=True).eval())
    again = torch.jit.script(nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True), 2))
    x = torch.randn(2, 3, 8)
    assert during(x).shape == x.shape and after(x, x, x)[0].shape == x.shape
    assert encoder.eval()(x).shape == again.eval()(x).shape == x.shape


def test_a_forward_outside_torchfim_keeps_torchs_fast_path() -> None:
    """The engine's stand-in answers for its own forwards only: torch's own answer, and a user's setting, stand."""
    model, batch = _model_and_batch()
    torchfim.fisher(model, [batch], structure="trace", mask=lambda b: ~b["pad"])
    with torch.no_grad():
        out = model(**batch)
    assert bool((out[2, 2:] == model.head.bias).all())  # the padded positions of the fast path: zeros, then the head


@pytest.mark.skipif(not FAST_PATH_SWITCH, reason="torch < 2.3 has no switch for the fast path (torch.backends.mha)")
def test_a_users_switch_of_the_fast_path_stands() -> None:
    model, batch = _model_and_batch()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        torchfim.fisher(model, [batch], structure="trace", mask=lambda b: ~b["pad"])
        assert not torch.backends.mha.get_fastpath_enabled()
    finally:
        torch.backends.mha.set_fastpath_enabled(True)


@pytest.mark.parametrize("mask_check", [True, False])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_the_trace_penalty_draws_and_differentiates_as_without_the_fast_path(grad_method: str, mask_check: bool) -> None:
    """``kind="trace"``: its labels come from a forward without autograd, its per-input gradients from vmap; with
    torch's fast path on (the default), labels at padded positions (no mask: they count) were drawn from the fast
    path's zeros, and vmap met the encoder's nested-tensor check, so the gradients went one input at a time. Oracle:
    the same penalty, same generator seed, with the fast path turned off by the user (on torch 2.2, which has no
    switch, the encoder's nesting turned off; its layers' fused kernels differ by rounding only)."""
    model, batch = _model_and_batch(mask_check)

    def value() -> float:
        pen = FisherPenalty(model, alpha=1.0, kind="trace", grad_method=grad_method,
                            generator=torch.Generator().manual_seed(3))
        return float(pen(batch, step=0).detach())

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "one input at a time" would raise
        got = value()
    if FAST_PATH_SWITCH:
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            want = value()
        finally:
            torch.backends.mha.set_fastpath_enabled(True)
    else:
        model.encoder.use_nested_tensor = False
        want = value()
    assert got == pytest.approx(want, rel=1e-12)


class _Kept(_Encoder):
    """The encoder taking the observed positions (``keep``, 1 where observed), as a report's ``--mask`` names them."""

    def forward(self, ids: Tensor, keep: Tensor) -> Tensor:  # type: ignore[override]
        return super().forward(ids, keep == 0)


def test_the_report_of_an_eval_mode_encoder_with_a_padding_mask_is_the_oracles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: refused by the engine's independence check; the report's own first forward also took the fast path
    (with torch's warning that nested tensors are a prototype): no forward of the report packs the batch now."""
    from torchfim import report as report_mod

    packed = []
    pack = torch._nested_tensor_from_mask
    monkeypatch.setattr(torch, "_nested_tensor_from_mask", lambda *a, **k: packed.append(1) or pack(*a, **k))
    model, batch = _model_and_batch()
    kept = _Kept().double().eval()
    kept.load_state_dict(model.state_dict())
    data = {"ids": batch["ids"], "keep": (~batch["pad"]).long()}
    got = report_mod.compute_report(kept, report_mod.as_data(data, "test"), mask="keep", variance_inputs=2,
                                    max_block=0, progress=False)
    assert not packed
    want = float(_oracle(model, batch, ~batch["pad"]).sum())
    assert got["trace"]["exact"] == pytest.approx(want, rel=1e-10)
    with torch.no_grad():
        kept(**data)
    assert packed  # the spy sees torch's own fast path


class _FrozenNestedEncoder(nn.Module):
    """A frozen ``nn.TransformerEncoder`` with nested tensors, and a trainable head over the sum of its positions,
    the padded ones included (``read_padding``) or masked out."""

    def __init__(self, read_padding: bool, nested: bool = True) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 6, 0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=nested).requires_grad_(False)
        self.fc, self.read_padding = nn.Linear(4, 3), read_padding

    def forward(self, x: Tensor, kpm: Tensor) -> Tensor:
        h = self.enc(x, src_key_padding_mask=kpm)
        return self.fc((h if self.read_padding else h.masked_fill(kpm.unsqueeze(-1), 0.0)).sum(1))


@pytest.mark.parametrize("read_padding", [True, False])
def test_a_frozen_nested_encoder_whose_padding_is_read_is_named(read_padding: bool) -> None:
    """Outside torchfim torch's fast path gives the frozen encoder's padded positions zeros; torchfim computes them.
    Where the head reads them the two models differ (Tr F 5.80 against 8.53 in a user trial, silently): named, with
    the fix; following it (nested tensors off) the model runs everywhere as torchfim measures it, with the same
    Fisher and no warning. Where the head masks them out, nothing to say."""
    torch.manual_seed(0)
    model = _FrozenNestedEncoder(read_padding).double().eval()
    kpm = torch.zeros(4, 3, dtype=torch.bool)
    kpm[1, 2] = True
    kpm[2, 1:] = True
    batch = {"x": torch.randn(4, 3, 4, dtype=torch.float64), "kpm": kpm}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trace = torchfim.fisher(model, batch, structure="trace")
    named = [str(w.message) for w in caught if "frozen nn.TransformerEncoder 'enc'" in str(w.message)]
    assert len(named) == (1 if read_padding else 0)
    if read_padding:
        assert "enable_nested_tensor=False and use_nested_tensor=False" in named[0]
    model.enc.enable_nested_tensor = model.enc.use_nested_tensor = False
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert float(torchfim.fisher(model, batch, structure="trace")) == pytest.approx(float(trace), rel=1e-12)


class _PerPositionHead(nn.Module):
    """The frozen nested encoder of the test above with a head per position: outputs (B, T, 3)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(4, 2, 6, 0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 1, enable_nested_tensor=True).requires_grad_(False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor, kpm: Tensor) -> Tensor:
        return self.fc(self.enc(x, src_key_padding_mask=kpm))


def _fast_path_warnings(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "frozen nn.TransformerEncoder" in str(w.message)]


def test_the_fast_path_check_reads_only_observed_positions_and_batches_of_one() -> None:
    """Outputs per position whose padded positions a mask leaves out: the two paths differ only there, the Fisher is
    the same, and nothing is said (the mask is read); without the mask it is said. A single padded input, a batch of
    one, is checked too (the check ran with the independence check, from batches of two)."""
    torch.manual_seed(0)
    model = _PerPositionHead().double().eval()
    kpm = torch.zeros(4, 3, dtype=torch.bool)
    kpm[1, 2] = True
    kpm[2, 1:] = True
    batch = {"x": torch.randn(4, 3, 4, dtype=torch.float64), "kpm": kpm}
    assert _fast_path_warnings(lambda: torchfim.fisher(model, batch, structure="trace", mask=~kpm)) == []
    assert len(_fast_path_warnings(lambda: torchfim.fisher(model, batch, structure="trace"))) == 1
    pooled = _FrozenNestedEncoder(read_padding=True).double().eval()
    one = {"x": batch["x"][2:3], "kpm": kpm[2:3]}
    assert len(_fast_path_warnings(lambda: torchfim.fisher(pooled, one, structure="trace"))) == 1
