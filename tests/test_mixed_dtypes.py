"""Models whose parameters are not all of one dtype: a float32 body under a float64 head, and a bfloat16 model with
modules kept in float32 (as Hugging Face keeps its ``_keep_in_fp32_modules``), each casting in its forward.

Before: the second-order passes (the Hessian estimator, the variances and bounds of Î2) met a layer of another dtype
than the first parameter's with a bare ``RuntimeError`` of torch (a unit direction or an output perturbation in the
first parameter's dtype, a product of two dtypes); ``FisherPenalty(kind="trace", grad_method="finite_difference")``
moved a bfloat16 tensor by a float32 step, making it float32; and floating-point inputs were cast to the first
trainable parameter's dtype, so a float32 body registered after a float64 head got float64 inputs and raised where
``model(x)`` runs. References: the float64 copy of the model (weights exact in float64) through torch.func Jacobians
and Hessians, or torchfim's closed forms on that copy, to the rounding of the model's least precise dtype.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from oracles import exact_fisher
from test_train_penalty import brute_penalty
from torch import Tensor, nn

import torchfim
from torchfim.families import get_family
from torchfim.train import FisherPenalty, FisherTraceMonitor

EPS = {dt: torch.finfo(dt).eps for dt in (torch.bfloat16, torch.float16, torch.float32)}


class BodyAndHead(nn.Module):
    """A float32 body under a float64 head; the forward casts to the dtype of the layer it feeds. ``head_first``
    registers the head first (its dtype then the first trainable parameter's); ``cast_inputs`` False leaves ``x``
    as given, as a forward written for float32 inputs does."""

    def __init__(self, head_first: bool = False, cast_inputs: bool = True) -> None:
        super().__init__()
        torch.manual_seed(0)
        if head_first:
            self.head = nn.Linear(6, 3).double()
        self.body = nn.Linear(4, 6)
        if not head_first:
            self.head = nn.Linear(6, 3).double()
        self.cast_inputs = cast_inputs

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x.to(self.body.weight.dtype) if self.cast_inputs else x))
        return self.head(h.to(self.head.weight.dtype))


class KeptInFloat32(nn.Module):
    """A half-precision model whose middle Linear and LayerNorm are kept in float32."""

    def __init__(self, dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.kept, self.norm, self.b = nn.Linear(4, 6), nn.Linear(6, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        self.to(dtype)
        self.kept.float()
        self.norm.float()

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        h = self.norm(torch.tanh(self.kept(h.to(self.kept.weight.dtype))))
        return self.b(h.to(self.b.weight.dtype))


def inputs(dtype: torch.dtype = torch.float32, n: int = 16) -> Tensor:
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(1)).to(dtype)


def flat(value: Tensor | dict[str, Tensor]) -> Tensor:
    return torch.cat([v.double().reshape(-1) for v in value.values()]) if isinstance(value, dict) \
        else value.double().reshape(-1)


def rel(got: Tensor | dict[str, Tensor], want: Tensor | dict[str, Tensor]) -> float:
    """``max |got − want| / max |want|``."""
    got, want = flat(got), flat(want)
    return float((got - want).abs().max() / want.abs().max())


MODELS = {
    "float32-body-float64-head": (lambda: BodyAndHead(), torch.float32, 1e-5),
    "float64-head-registered-first": (lambda: BodyAndHead(head_first=True), torch.float32, 1e-5),
    "bfloat16-with-float32-modules": (lambda: KeptInFloat32(), torch.bfloat16, 8 * EPS[torch.bfloat16]),
    "float16-with-float32-modules": (lambda: KeptInFloat32(torch.float16), torch.float16, 8 * EPS[torch.float16]),
}


@pytest.mark.parametrize("structure", ["diag", "trace", "blocks", "full"])
@pytest.mark.parametrize("bound", [False, True], ids=["variance", "bound"])
@pytest.mark.parametrize("name", list(MODELS))
def test_hessian_variances_and_bounds_of_mixed_models(name: str, bound: bool, structure: str) -> None:
    """Raised "expected m1 and m2 to have the same dtype" (diag), "expected scalar type Double but found Float"
    (full; blocks of the bfloat16 model); now within the least precise dtype's rounding of the float64 copy's."""
    build, x_dtype, rtol = MODELS[name]
    model, x = build(), inputs(x_dtype)
    call = torchfim.variance_bound if bound else torchfim.fisher_variance
    got = call(model, x, estimator="hessian", structure=structure)
    want = call(copy.deepcopy(model).double(), x.double(), estimator="hessian", structure=structure)
    assert rel(got, want) <= rtol
    first = next(model.parameters()).dtype
    assert {v.dtype for v in (got.values() if isinstance(got, dict) else [got])} == {
        torch.float32 if first in (torch.float16, torch.bfloat16) else first}


@pytest.mark.parametrize("structure", ["diag", "trace", "blocks"])
@pytest.mark.parametrize("name", ["float32-body-float64-head", "bfloat16-with-float32-modules"])
def test_hessian_estimator_of_mixed_models_is_unbiased(name: str, structure: str) -> None:
    """Î2 raised on these models (diag and trace; blocks of the bfloat16 one); its mean over 2,000 labels per input
    is now the Fisher of the float64 copy (torch.func Jacobians, ``(1/n) Σ Jᵀ Λ J``) within 5 standard errors
    (closed form, same copy) plus the rounding of the model's dtypes."""
    build, x_dtype, rtol = MODELS[name]
    model, x = build(), inputs(x_dtype)
    reference, k = copy.deepcopy(model).double(), 2000
    got = torchfim.fisher(model, x, estimator="hessian", structure=structure, n_samples=k,
                          generator=torch.Generator().manual_seed(2))
    full = exact_fisher(reference, x.double(), "categorical")
    sd = torchfim.fisher_variance(reference, x.double(), estimator="hessian", structure=structure, n_samples=k)
    if structure == "blocks":
        want = torch.cat([torch.diagonal(b).reshape(-1) for b in _blocks(full, reference).values()])
        got = torch.cat([torch.diagonal(b).double() for b in got.values()])
        sd = torch.cat([torch.diagonal(b) for b in sd.values()])
    else:
        want = torch.diagonal(full) if structure == "diag" else torch.trace(full)
    tolerance = 5 * sd.sqrt() + rtol * want.abs().max()
    assert bool(((got.double() - want).abs() <= tolerance).all())


def _blocks(full: Tensor, model: nn.Module) -> dict[str, Tensor]:
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = full[start:start + p.numel(), start:start + p.numel()]
        start += p.numel()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_trace_penalty_finite_difference_of_a_model_with_float32_modules(dtype: torch.dtype) -> None:
    """Raised "mat1 and mat2 must have the same dtype, but got BFloat16 and Float": each input's shifted copy of a
    half-precision tensor came out float32. Now its gradient is within the documented coarseness of a half-precision
    forward difference (0.25, as test_penalty_half_precision; measured 0.10 bfloat16, 0.05 float16) of the penalty's
    definition differentiated in float64 on the labels the penalty drew."""
    model, x = KeptInFloat32(dtype), inputs(dtype)
    with torch.no_grad():
        y = get_family("categorical").sample(model(x), 1, torch.Generator().manual_seed(3))[:, 0]
    _, want = brute_penalty(copy.deepcopy(model).double(), x.double(), y, "categorical", 0.5, "trace")
    pen = FisherPenalty(model, alpha=0.5, kind="trace", grad_method="finite_difference",
                        generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the named coarseness of half precision
        got = torch.autograd.grad(pen(x, step=0), list(model.parameters()))
    num = sum(float((g.double() - w).square().sum()) for g, w in zip(got, want))
    assert math.sqrt(num / sum(float(w.square().sum()) for w in want)) < 0.25


def test_inputs_of_a_dtype_of_the_model_reach_it_as_given() -> None:
    """A float32 body registered after a float64 head, its forward written for float32 inputs: ``model(x)`` runs,
    and torchfim cast ``x`` to float64 (the first trainable parameter's) and raised torch's "mat1 and mat2 must have
    the same dtype" in fisher, the monitor and the penalty. Now the inputs go as given: the Fisher is the float64
    copy's (torch.func Jacobians) to float32 rounding."""
    model, x = BodyAndHead(head_first=True, cast_inputs=False), inputs()
    reference = copy.deepcopy(model).double()
    want = exact_fisher(reference, x.double(), "categorical")
    for structure in ("full", "trace"):
        got = torchfim.fisher(model, x, structure=structure)
        assert got.dtype == torch.float64
        assert rel(got, want if structure == "full" else torch.trace(want)) <= 1e-5
    record = FisherTraceMonitor(model, x, n_samples=4, generator=torch.Generator().manual_seed(4)).measure(0)
    assert math.isfinite(record.trace)
    pen = FisherPenalty(model, alpha=0.5, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = get_family("categorical").sample(model(x), 1, torch.Generator().manual_seed(5))[:, 0]
    value, grads = brute_penalty(reference, x.double(), y, "categorical", 0.5, "batch_gradient")
    term = pen(x, step=0)
    assert abs(float(term.detach()) / float(value) - 1) <= 1e-5


def test_inputs_a_mixed_model_does_not_take_are_named() -> None:
    """A bfloat16 first layer given float32 inputs by a model that keeps other modules in float32: the model itself
    raises; torchfim says why and how to pass them (it cast them to bfloat16 before, now it passes a dtype of the
    model's parameters as given)."""
    with pytest.raises(torchfim.TorchfimError, match=r"several dtypes \(bfloat16, float32\).*dtype of the layer"):
        torchfim.fisher(KeptInFloat32(), inputs(torch.float32))


def _t5_kept_in_float32() -> tuple[nn.Module, dict[str, Tensor]]:
    """Tiny T5 from a config, in bfloat16 with its ``_keep_in_fp32_modules`` (the feed-forward ``wo``) put back to
    float32, as ``from_pretrained(torch_dtype=torch.bfloat16)`` loads it; trainable: the feed-forward weights
    (``wi`` in bfloat16 first, ``wo`` in float32; dense layers, whose second-order sweep goes by unit), the rest
    frozen."""
    import hf_models

    model = hf_models.tiny_t5().to(torch.bfloat16)
    assert "wo" in type(model)._keep_in_fp32_modules
    for name, module in model.named_modules():
        if name.endswith(".wo"):
            module.float()
    for name, p in model.named_parameters():
        p.requires_grad_(name.endswith(("wi.weight", "wo.weight")))
    return model, hf_models.labelled_batch([5, 3, 4], seed=0)


@pytest.mark.parametrize("bound", [False, True], ids=["variance", "bound"])
def test_t5_in_bfloat16_with_float32_feed_forward_outputs(bound: bool) -> None:
    """The Hessian estimator and Î2's variance raised "expected m1 and m2 to have the same dtype, but got: float !=
    c10::BFloat16" on this model; now Î2's variance (and bound) is the float64 copy's to bfloat16 rounding, the
    exact Fisher's diagonal too (3e-2, as test_half_precision_rules), and Î2 runs."""
    model, batch = _t5_kept_in_float32()
    reference = copy.deepcopy(model).double()
    call = torchfim.variance_bound if bound else torchfim.fisher_variance
    got = call(model, batch, estimator="hessian", structure="diag")
    want = call(reference, batch, estimator="hessian", structure="diag")
    assert got.dtype == torch.float32 and rel(got, want) <= 8 * EPS[torch.bfloat16]
    if not bound:
        diagonal = torchfim.fisher(model, batch, structure="diag")
        assert diagonal.dtype == torch.bfloat16  # the first trainable parameter's: the encoder's wi.weight
        assert rel(diagonal, torchfim.fisher(reference, batch, structure="diag")) <= 3e-2
        estimate = torchfim.fisher(model, batch, estimator="hessian", structure="trace",
                                   generator=torch.Generator().manual_seed(6))
        assert estimate.dtype == torch.bfloat16 and math.isfinite(float(estimate))


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_functional_backend_takes_a_half_precision_model_with_float32_modules(dtype: torch.dtype, rtol: float) -> None:
    """``backend="functional"`` refused this model, blaming "a batching rule of this torch build": its check of
    torch.func's per-sample gradients against autograd's held them to float32's 1e-4 (the gradients' dtype), while
    the bfloat16 layers before the float32 ones round them to 1.1e-3 (float16 6.7e-4). Now the check allows the
    least precise dtype's rounding, and the diagonal is the float64 copy's (torch.func Jacobians) to the tolerances of
    test_half_precision_rules."""
    model, x = KeptInFloat32(dtype), inputs(dtype)
    got = torchfim.fisher(model, x, structure="diag", backend="functional")
    want = torch.diagonal(exact_fisher(copy.deepcopy(model).double(), x.double(), "categorical"))
    assert got.dtype == dtype and rel(got, want) <= rtol
