"""Which layers' Fisher is rounding, not data: each layer's score gradients computed twice, in two precisions.

A layer whose outputs' dependence cancels exactly (an attention key's bias, which softmax ignores; a shift of
every logit) has a gradient ``Jᵀu`` that is 0 in exact arithmetic for every input and output score ``u``; what a
computation gives is its rounding, a sum of terms that should cancel, left at about ε times their size. How big
that is depends on how the terms cancel and in which precision each operation ran, not on the model's dtype
alone: a float64 ViT computes its softmax in float32 (Hugging Face's eager attention), so its key bias's Tr came
out 1.06e-22, far above ε²·Tr(F) = 1.4e-30 of float64, while a genuine query bias held 5e-10 of Tr(F) and a
layer fed inputs scaled by 1e-9 far less; no threshold on the share of Tr(F) tells them apart (a review).

What does tell them apart is that rounding is not a function of the data: computed in another precision, a
layer's gradients that are data come out the same to that precision, and rounding comes out as other numbers.
:func:`rounding_disagreement` takes, on a few inputs (:data:`CHECK_INPUTS`, drawn as the variance subset
is), one drawn output score ``uᵢ`` each (in the range of the output Fisher Λᵢ, so that a layer with
``Jᵢᵀ Λᵢ Jᵢ = 0`` gets ``Jᵢᵀuᵢ = 0``) and each layer's gradients ``aᵢ = Jᵢᵀuᵢ`` in the model's dtype and ``bᵢ`` in
a twin precision (float64 for a model in float32 or half precision, float32 for one in float64: the parameters,
buffers and inputs cast, the scores the same), and returns per layer

    d = ‖a − b‖² / (‖a‖² + ‖b‖²)    (over the inputs' gradients stacked).

With ``a = t + rₐ``, ``b = t + r_b`` (``t`` the data, ``r`` the rounding of each computation),
``d ≈ (1 − c)·(‖rₐ‖² + ‖r_b‖²) / (2‖t‖² + ‖rₐ‖² + ‖r_b‖²)`` where ``c`` is the two roundings' correlation: about
``(ε·R)²`` for data whose terms are ``R`` times its size (1e-14 to 1e-13 for every genuine layer of the tests,
the 1e-9-scaled one included: float32 against float64), about ``1 − c`` for rounding (``t = 0``). The rounding
of an operation that runs in the same precision in both computations is partly the same in both: the ViT's
float32 softmax makes its key bias's ``d`` 0.54 (float64 model) and 0.60 (float32), where BERT's, whose softmax
follows the model's dtype, is 1.0. :data:`ROUNDING_DISAGREEMENT` = 0.1 sits between the two with room on each
side (rounding shared up to 90%; data flagged only where rounding is over about a tenth of it), and is what the
report takes as the layer's Fisher being zero to precision. ``d`` is scale-free (a layer of tiny but exact
values agrees in both precisions) and measures the rounding the computation really does (a float32 softmax
inside a float64 model, a half-precision model's own), with no model of where it arises. It costs one forward
and :data:`CHECK_INPUTS` backward passes per precision, on that many inputs.

Limits: in a float64 model the twin is float32, so a layer whose gradient is data only below float32's
resolution (its terms cancelling to under about 10⁻⁶ of their size, yet not exactly) is flagged too; a layer
whose gradient is exactly 0 on the inputs checked (d undefined, None) is judged by its Tr alone (zero to
precision where it is exactly 0). Where the twin cannot be computed (an operation without a kernel in the
other precision), :func:`rounding_disagreement` returns None and the report falls back to Tr ≤ ε²·Tr(F).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..engine.batch import Batch, batches
from ..engine.function_forwards import function_forwards
from ..engine.kept_buffers import private_buffers
from ..engine.view import ModelView, engine_session
from .data import Inputs

__all__ = ["CHECK_INPUTS", "ROUNDING_DISAGREEMENT", "rounding_disagreement", "twin_dtype"]

#: Inputs whose gradients the check compares (one drawn score each): the report draws them as its variance subset.
CHECK_INPUTS = 8
#: ``d`` above which a layer's gradients are more rounding than data (see the module's docstring).
ROUNDING_DISAGREEMENT = 0.1


def twin_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision the check recomputes a ``dtype`` model in: float32 for float64, float64 otherwise."""
    return torch.float32 if dtype == torch.float64 else torch.float64


def rounding_disagreement(model: nn.Module, X: Inputs, opts: dict, names: list[str],
                          seed: int = 0) -> dict[str, float | None] | None:
    """Per layer name (``names``, the report's), ``d = ‖a − b‖²/(‖a‖² + ‖b‖²)`` of its score gradients ``a`` in
    the model's dtype and ``b`` in :func:`twin_dtype` on the first :data:`CHECK_INPUTS` inputs of ``X`` (None
    for a layer whose gradients are exactly 0 in both); None where the twin could not be computed or the names
    are not the model's.
    ``opts``: the report's ``family``, ``mask`` and ``class_dim``; ``seed`` draws the scores."""
    generator = torch.Generator().manual_seed(seed)
    with engine_session(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the report's library calls warn of the same model and data
        view = ModelView(model, None, opts.get("class_dim"))
        with private_buffers(view.model, view.constants):
            try:
                sums = _gradients(view, X, opts, generator)
            except (RuntimeError, TypeError, NotImplementedError):  # no kernel, or no twin, in the other precision
                return None
    if not set(names) <= set(sums):  # the engine's names are not the report's: nothing to say of the layers
        return None
    result: dict[str, float | None] = {}
    for name in names:
        aa, bb, apart = sums[name]
        result[name] = apart / (aa + bb) if aa + bb > 0 and math.isfinite(aa + bb) else None
    return result


def _gradients(view: ModelView, X: Inputs, opts: dict, generator: torch.Generator) -> dict[str, list[float]]:
    """Per parameter name, ``[‖a‖², ‖b‖², ‖a − b‖²]`` of its gradients ``aᵢ = Jᵢᵀuᵢ`` in the model's dtype and
    ``bᵢ`` in the twin's over the first :data:`CHECK_INPUTS` inputs, summed input by input (no more than one input's
    gradients held at a time)."""
    other = twin_dtype(view.dtype)
    sums = {name: torch.zeros(3, dtype=torch.float64, device=view.device) for name in view.params}
    left = CHECK_INPUTS
    for batch in batches(X, None, view.device, view.dtype, labels=view.labels, defaults=view.call_defaults()):
        if left <= 0:
            break
        batch = batch.rows(slice(0, min(left, batch.size)))
        left -= batch.size
        shape, flat, leaves = _flat_outputs(view, view.dtype, batch)
        family = view.family_for(shape, batch, opts["family"], opts.get("mask"))
        scores = family.sample_scores(flat.detach(), 1, generator)[:, 0]
        _, flat_twin, leaves_twin = _flat_outputs(view, other, batch.to(None, other))
        for i in range(batch.size):
            a = _gradient(flat[i] @ scores[i].to(flat.dtype), leaves)
            b = _gradient(flat_twin[i] @ scores[i].to(other), leaves_twin)
            for name, total in sums.items():
                ga, gb = a[name].double(), b[name].double()
                total += torch.stack([ga.square().sum(), gb.square().sum(), (ga - gb).square().sum()])
    return {name: [float(v) for v in total] for name, total in sums.items()}  # one copy to the host, at the end


def _flat_outputs(view: ModelView, dtype: torch.dtype, batch: Batch) -> tuple[torch.Size, Tensor, dict[str, Tensor]]:
    """The raw output shape and the flat outputs ``(B, L·C)`` of ``batch`` with every floating parameter and buffer
    of the view in ``dtype``, and the trainable parameters (the view's own, cast) as the leaves they come from."""
    leaves = {n: p.detach().to(dtype, copy=True).requires_grad_(True) for n, p in view.params.items()}
    constants = {n: t.to(dtype) if t.is_floating_point() else t for n, t in view.constants.items()}
    with torch.enable_grad(), function_forwards():
        raw = functional_call(view.model, {**constants, **leaves}, batch.args, batch.kwargs)
        out = view.to_tensor(raw, batch)
    return out.shape, view.flat(out), leaves


def _gradient(value: Tensor, leaves: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each leaf's gradient of ``value`` (zeros where unused), the graph kept for the next input's."""
    grads = torch.autograd.grad(value, list(leaves.values()), retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g.detach() for (n, p), g in zip(leaves.items(), grads)}
