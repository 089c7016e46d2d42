"""Layer norms and attention in composite form for forward-mode AD (``torchfim.engine.composites``).

The composite forms must give the fused functions' values, and second derivatives taken through
them by forward-over-forward AD must equal reverse-over-reverse Hessians (attention on torch's math
kernel, which has a double backward).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp
from torch_versions import TORCH_VERSION, skip_unless_the_model_runs

import torchfim
import torchfim.train
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


#: torch's activation → its composite, with the keyword arguments each call passes.
ACTIVATIONS = {
    "silu": (F.silu, {}), "silu_inplace": (F.silu, {"inplace": True}), "mish": (F.mish, {}),
    "hardsigmoid": (F.hardsigmoid, {}), "glu": (F.glu, {"dim": 1}), "rrelu_eval": (F.rrelu, {"training": False}),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activations_equal_torch_and_their_derivatives_reverse_mode(name: str) -> None:
    """Values, first derivatives (jvp against torch's backward) and second derivatives (jvp of jvp, the Hessian
    estimator's) along a direction: against reverse over reverse where torch has a double backward, and 0 for the
    piecewise-linear ones (Hardsigmoid, the eval-mode RReLU), whose second derivative is 0 off their kinks."""
    function, kwargs = ACTIVATIONS[name]
    x, e, w = _randn(4, 6) * 3, _randn(4, 6), _randn(4, 3 if name == "glu" else 6)
    x = x.masked_fill((x.abs() - 3).abs() < 1e-3, 0.5)  # off Hardsigmoid's kinks

    def f(t: torch.Tensor) -> torch.Tensor:
        return (function(t.clone(), **kwargs) * w).sum()

    with composite_forms():
        value = f(x)
        first = jvp(f, (x,), (e,))[1]
        second = jvp(lambda t: jvp(f, (t,), (e,))[1], (x,), (e,))[1]
    assert torch.allclose(value, f(x), rtol=1e-13, atol=0)
    grad = torch.autograd.grad(f(x.requires_grad_()), x)[0]
    # torch's float64 Hardsigmoid backward has its slope 1/6 rounded to float32 (3e-8 off); the composite's is exact
    rtol = 1e-7 if name == "hardsigmoid" else 1e-12
    assert torch.allclose(first, (grad * e).sum(), rtol=rtol, atol=0)
    if name in ("hardsigmoid", "rrelu_eval"):
        assert float(second) == 0.0
    else:
        exact = e.flatten() @ torch.autograd.functional.hessian(f, x.detach()).reshape(24, 24) @ e.flatten()
        assert abs(float(second - exact)) <= 1e-10 * max(1.0, abs(float(exact)))


def test_rrelu_in_training_mode_is_torchs_own() -> None:
    """Random slopes, drawn from torch's generator as torch's own function draws them."""
    x = _randn(5, 7)
    torch.manual_seed(3)
    want = F.rrelu(x, training=True)
    torch.manual_seed(3)
    with composite_forms():
        got = F.rrelu(x, training=True)
    assert torch.equal(got, want) and not torch.equal(got, F.leaky_relu(x, (1 / 8 + 1 / 3) / 2))


@pytest.mark.parametrize("module", [nn.Hardsigmoid(), nn.RReLU()], ids=["hardsigmoid", "rrelu"])
def test_the_hessian_estimator_takes_what_has_no_forward_or_batching_rule(module: nn.Module) -> None:
    """Î2 of an MLP with the activation equals Î2 of the same MLP with the activation written out in elementary
    operations (the same labels: the same seed); before, Hardsigmoid had no forward-mode rule for its backward
    and the eval-mode RReLU no batching rule, and both failed."""

    class Written(nn.Module):
        def forward(self, t: torch.Tensor) -> torch.Tensor:
            if isinstance(module, nn.Hardsigmoid):
                return torch.clamp(t / 6 + 0.5, 0.0, 1.0)
            return torch.where(t >= 0, t, t * ((module.lower + module.upper) / 2))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), module, nn.Linear(6, 4)).double().eval()
    written = copy.deepcopy(model)
    written[1] = Written()
    x = _randn(16, 3) * 4
    tol = 2e-7 if isinstance(module, nn.Hardsigmoid) else 1e-12  # torch's float32 slope (above), squared in F

    def close(got: torch.Tensor, want: torch.Tensor) -> bool:
        return float((got - want).abs().max()) <= tol * float(want.abs().max())

    for structure in ("diag", "full"):
        assert close(*(torchfim.fisher(m, x, estimator="hessian", structure=structure, n_samples=3,
                                       generator=torch.Generator().manual_seed(1)) for m in (model, written)))
    assert close(*(torchfim.fisher_variance(m, x, estimator="hessian", structure="diag") for m in (model, written)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_in_half_precision_normalises_in_float32(dtype: torch.dtype) -> None:
    """torch's values to one unit in the last place, and second derivatives that stay finite on activations that
    vary little (σ² ≈ 4e-4: in float16, ``(σ² + ε)^(-3/2)/2`` overflows)."""
    x, w, b = (_randn(64, 32) * 0.02).to(dtype), _randn(32).to(dtype), _randn(32).to(dtype)
    skip_unless_the_model_runs(lambda t: F.layer_norm(t, (32,), w, b), x)  # torch 2.2 has no float16 CPU kernel
    want, got = F.layer_norm(x, (32,), w, b), layer_norm(x, (32,), w, b)
    assert got.dtype == dtype
    assert torch.allclose(got.float(), want.float(), rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    e = torch.randn_like(x)

    def f(t: torch.Tensor) -> torch.Tensor:
        return layer_norm(t, (32,), w, b).float().square().sum()

    second = jvp(lambda t: jvp(f, (t,), (e,))[1], (x,), (e,))[1]
    assert bool(torch.isfinite(second))


class _InPlace(nn.Module):
    """Activations written into their input, which the forward reads afterwards (``inplace=True``)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.a, self.b, self.c, self.inplace = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3), inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        if self.inplace:
            F.silu(h, inplace=True)
            g = self.b(h)
            F.hardsigmoid(g, inplace=True)
            F.rrelu(g, training=False, inplace=True)
        else:
            g = F.rrelu(F.hardsigmoid(self.b(F.silu(h))), training=False)
        return self.c(g)


def test_in_place_activations_write_their_input_in_composite_form() -> None:
    """A forward that reads the input of an in-place activation after the call: the composites read it as out of
    place at first, so the exact penalty of such a model took the layer before the activation (loss 0.742 for
    0.260) and the Hessian estimator another Fisher. Both now equal the same model written out of place."""
    torch.manual_seed(0)
    plain = _InPlace(inplace=False).double()
    written = copy.deepcopy(plain)
    written.inplace = True
    x = _randn(16, 4)
    for structure in ("diag", "full"):
        got, want = (torchfim.fisher(m, x, estimator="hessian", structure=structure, n_samples=2,
                                     generator=torch.Generator().manual_seed(1)) for m in (written, plain))
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-15)
    terms = []
    for model in (written, plain):
        pen = torchfim.train.FisherPenalty(model, alpha=0.5, generator=torch.Generator().manual_seed(2))
        loss = pen.penalised_loss(x, lambda out: out.square().mean(), step=0)
        terms.append((loss.detach(), torch.autograd.grad(loss, list(model.parameters()))))
    assert torch.allclose(terms[0][0], terms[1][0], rtol=1e-12)
    for a, b in zip(terms[0][1], terms[1][1], strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-13)


def test_glu_on_an_odd_dimension_is_refused_as_torch_refuses_it() -> None:
    with composite_forms(), pytest.raises(RuntimeError, match="Halving dimension must be even"):
        F.glu(_randn(2, 3))


@pytest.mark.parametrize("kind", ["parametrization", "hook"])
def test_the_hessian_estimator_takes_weight_norm(kind: str) -> None:
    """Î2 and its variance of an MLP whose first layer is weight-normalised (the parametrization and the older
    hook) equal those of the same MLP with ``w = v·g/‖v‖`` written out (a user trial: torch's fused weight norm has
    no forward-mode rule for its backward, and both were refused)."""

    class Written(nn.Module):
        def __init__(self, bias: torch.Tensor, g: torch.Tensor, v: torch.Tensor) -> None:
            super().__init__()
            self.bias, self.g, self.v = (nn.Parameter(t.detach().clone()) for t in (bias, g, v))

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            w = self.v * (self.g / self.v.square().sum(1, keepdim=True).sqrt())
            return t @ w.T + self.bias

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the hook is deprecated in favour of the parametrization
        first = (nn.utils.parametrizations.weight_norm if kind == "parametrization" else nn.utils.weight_norm)(
            nn.Linear(3, 5))
    model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 4)).double()
    (_, bias), (_, g), (_, v) = list(model[0].named_parameters())
    written = nn.Sequential(Written(bias, g, v), nn.Tanh(), copy.deepcopy(model[2]))
    x = _randn(16, 3)

    def blocks(m: nn.Module) -> list[torch.Tensor]:
        return list(torchfim.fisher(m, x, estimator="hessian", structure="layers", n_samples=3,
                                    generator=torch.Generator().manual_seed(1)).values())

    for got, want in zip(blocks(model), blocks(written), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(*(torchfim.fisher_variance(m, x, estimator="hessian", structure="trace")
                                 for m in (model, written)), rtol=1e-10, atol=1e-12)
