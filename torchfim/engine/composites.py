"""Torch functions run as compositions of elementary operations while second derivatives are taken.

Output-Hessian diagonals and Hessian columns go through forward-mode AD (``jvp`` of ``jvp``, ``jvp``
of ``grad``). Two functions that transformers call break it in torch 2.x:

* ``layer_norm``: its forward-mode rule is not itself differentiated correctly in forward mode,
  so ``jvp`` of ``jvp`` through a LayerNorm returns a wrong second derivative (off in the third
  digit on a 5-unit layer in float64, against reverse-over-reverse);
* ``scaled_dot_product_attention`` on CPU dispatches to a flash-attention kernel that has no
  forward-mode rule at all, so every second derivative through ``nn.MultiheadAttention``
  (``need_weights=False``, as ``nn.TransformerEncoderLayer`` calls it) or a Hugging Face SDPA
  attention fails.

Five activations break second derivatives too (``silu``, ``mish``, ``glu``, ``hardsigmoid`` and the eval-mode
``rrelu``): :mod:`.composite_activations` says which and how they run. So does weight normalisation
(``torch._weight_norm``, behind ``nn.utils.parametrizations.weight_norm`` and the older ``nn.utils.weight_norm``):
its fused kernel has no forward-mode rule for its backward, and its backward's own backward is wrong in torch 2.13
(``gradgradcheck`` fails; the exact penalty's gradient on a weight-normed layer's direction ``v`` was 75-110%
off, silently, in a review); it runs as ``v·g/‖v‖`` (the norm over every dim but ``dim``) in both modes.

``instance_norm`` on its input's own statistics has the layer norm's fault (it runs torch's training-mode batch
norm, whose forward-mode rule is not differentiated correctly either): ``jvp`` of ``jvp`` through
``F.instance_norm`` was 22 % below reverse-over-reverse on a ``(1, 3, 5)`` input, and the Î2 variance of a small
convolution's weights before an instance norm 6-310 % off in the trace, silently
(``tests/test_instance_norm_second_derivatives.py``). It runs as ``(x − μ)/√(σ² + ε)·w + b`` per sample and
channel in forward mode (also in training mode with ``track_running_stats=True``, whose Î2 variance was 91 % too
large); on its running statistics (eval mode, a map linear in the input) it is torch's own.
Reverse mode needs the composite too, under ``vmap``: torch's double backward of ``vmap(grad)`` through
``F.instance_norm`` is wrong in torch 2.13 on the gradient that reaches the input (a per-sample weight before the
norm got 68.9 for 0.018 against a loop over the samples), so the exact ``FisherPenalty(kind="trace")``'s gradient
on a convolution before an ``InstanceNorm1d`` was 0.6 % off, silently (the bias the norm removes got a gradient);
it runs as the composite in both modes (in reverse mode, whose forward is a training step's, updating the running
statistics a training-mode norm tracks as torch's does: :func:`instance_norm_twice`).

``group_norm``'s forward-mode rule views a channels-last input (a ``model.to(memory_format=torch.channels_last)``
convolution's output) as ``(B, groups, −1)``, which its strides do not allow: torch 2.13 raises "view size is not
compatible". It runs on the input made contiguous (forward mode only: reverse mode takes every layout).

Six linear-algebra functions (``linalg.solve``, the determinants, ``cholesky_inverse`` and ``householder_product``,
behind ``nn.utils.parametrizations.orthogonal``) have forward-mode rules that forward mode differentiates wrongly
too: :mod:`.composite_linalg` says which and how they run (forward mode only).

``embedding_bag`` has no forward-mode rule either: it runs as a lookup from a ``(bags, longest)`` table of the
bags' ids and a weighted sum, mean or max over each bag (forward mode only).
Nor has its backward (``_embedding_bag_backward``) a derivative, so double backprop (the exact Fisher penalty)
refused ``nn.EmbeddingBag(mode="sum")`` and ``"mean"``: in reverse mode those bags run as the same lookup
(:func:`embedding_bag_twice`); ``max`` bags stay torch's, refused with the fix.

And one differs from torch's reverse mode by convention: ``embedding`` with a ``padding_idx``, whose
padding row torch's backward leaves without a gradient (a constant of the model), while forward-mode
AD differentiates the lookup of that row like any other; the second derivatives would then disagree
with every first-order quantity about that row.

Within :func:`composite_forms` these functions run as their definitions in elementary operations, whose
forward-mode rules torch composes correctly: the layer norm as
``(x − μ)/√(σ² + ε)·w + b`` (``μ``, ``σ²`` the mean and biased variance over the normalised dims),
attention as torch's own reference implementation (``softmax(q kᵀ·scale + mask) v``), and
``multi_head_attention_forward`` on its explicit path (``need_weights=True``, the weights dropped
where the caller did not ask for them), and the lookup from a table whose padding row is detached. The values are those of the fused kernels to round-off;
the passes are slower, which second derivatives (one pass per direction) hardly notice.

A torch function mode sees only the calls made outside other torch functions, so the attention
inside ``multi_head_attention_forward`` is reached by rerouting that function itself; the mode
also keeps ``nn.TransformerEncoderLayer`` off its fused fast path (which takes no override).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .composite_activations import EVERY_MODE, FORWARD_MODE
from .composite_linalg import LINALG_FORWARD
from .composite_pooling import LP_POOLS
from .native_dtype import autocast_enabled


def layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None = None,
               bias: Tensor | None = None, eps: float = 1e-5, cudnn_enable: bool = True) -> Tensor:
    """``(x − μ)/√(σ² + ε)·w + b`` over the last ``len(normalized_shape)`` dims (biased variance);
    ``cudnn_enable`` (of ``torch.layer_norm``) is ignored. Half-precision inputs are normalised in float32 and
    the result cast back, as torch's kernel computes them: in float16 the derivative of ``1/√(σ² + ε)``,
    ``(σ² + ε)^(−3/2)/2``, overflows for a variance below about 5e-4 (a transformer's embeddings at
    initialisation), and the gradients came out NaN. The result has the dtype torch's own gives: float32 under
    CUDA autocast (which runs layer norms in float32), else the input's."""
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    centred = x - x.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    out = out if bias is None else out + bias
    return out.to(torch.float32 if input.is_cuda and autocast_enabled("cuda") else input.dtype)


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
              is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """``softmax(q kᵀ·scale + mask) v``: torch's reference implementation of scaled dot-product attention
    (a boolean mask turned into ``0``/``−∞`` first, as torch's front end does before any kernel)."""
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros(attn_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
            attn_mask.logical_not(), -torch.inf)
    gqa = {"enable_gqa": True} if enable_gqa else {}  # a keyword torch < 2.5 does not know
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, **gqa)[0]


def embedding(input: Tensor, weight: Tensor, padding_idx: int | None = None, *args: object, **kwargs: object) -> Tensor:
    """``F.embedding`` with the padding row of ``weight`` detached: a constant, as torch's backward has it."""
    if padding_idx is not None:
        keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[padding_idx] = 0
        weight = weight * keep + weight.detach() * (1 - keep)
    return F.embedding(input, weight, padding_idx, *args, **kwargs)


def embedding_bag(input: Tensor, weight: Tensor, offsets: Tensor | None = None, max_norm: float | None = None,
                  norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                  per_sample_weights: Tensor | None = None, include_last_offset: bool = False,
                  padding_idx: int | None = None) -> Tensor:
    """``F.embedding_bag`` as a padded lookup and a reduction: each bag's ids laid out as a row of a
    ``(bags, longest)`` table, looked up by :func:`embedding`, then summed with their weights (``sum``; ``mean``
    divides by the bag's count of ids other than ``padding_idx``, an empty bag giving 0) or reduced by ``max``.
    torch's fused kernel has no forward-mode derivative; ``max_norm`` (which renormalises the table in place) is
    left to it."""
    if max_norm is not None:
        return F.embedding_bag(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse,
                               per_sample_weights, include_last_offset, padding_idx)
    ids, weights, observed = _bag_table(input, offsets, per_sample_weights, include_last_offset, padding_idx)
    rows = embedding(ids, weight, padding_idx)  # (bags, longest, d)
    count = observed.sum(1, keepdim=True)
    if mode == "max":
        top = rows.masked_fill(~observed.unsqueeze(-1), float("-inf")).amax(1)
        return torch.where(count > 0, top, torch.zeros((), dtype=rows.dtype, device=rows.device))
    weights = observed.to(rows.dtype) if weights is None else weights.to(rows.dtype) * observed
    total = (rows * weights.unsqueeze(-1)).sum(1)
    return total / count.clamp_min(1).to(rows.dtype) if mode == "mean" else total


def _bag_table(input: Tensor, offsets: Tensor | None, per_sample_weights: Tensor | None, include_last_offset: bool,
               padding_idx: int | None) -> tuple[Tensor, Tensor | None, Tensor]:
    """An embedding bag's ids and weights as ``(bags, longest)`` tables, and where they hold an id that counts
    (inside its bag, not ``padding_idx``): 2-D ids as they are, 1-D ones cut at ``offsets``."""
    if input.dim() == 2:
        ids, weights = input, per_sample_weights
        observed = torch.ones_like(ids, dtype=torch.bool)
    else:
        starts = offsets[:-1] if include_last_offset else offsets
        ends = torch.cat([starts[1:], torch.tensor([input.numel()], device=input.device)])
        lengths = ends - starts
        bag = torch.repeat_interleave(torch.arange(len(starts), device=input.device), lengths)
        slot = torch.arange(input.numel(), device=input.device) - starts[bag]
        longest = max(int(lengths.max()), 1) if len(lengths) else 1
        ids = input.new_zeros(len(starts), longest).index_put((bag, slot), input)
        observed = torch.zeros(len(starts), longest, dtype=torch.bool, device=input.device).index_put(
            (bag, slot), torch.ones((), dtype=torch.bool, device=input.device))
        weights = None if per_sample_weights is None else per_sample_weights.new_zeros(len(starts), longest).index_put(
            (bag, slot), per_sample_weights)
    if padding_idx is not None:
        observed = observed & (ids != padding_idx)
    return ids, weights, observed


def instance_norm(input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                  weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
                  momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """``(x − μ)/√(σ² + ε)·w + b`` per sample and channel, ``μ``, ``σ²`` the mean and biased variance over the spatial
    dims of ``input`` ``(N, C, *spatial)``, where torch's instance norm reads the input's statistics (its running
    statistics, which a training-mode norm that tracks them would update, are left as they are: these passes are no
    training steps, and the value does not read them); torch's own on the running statistics (a map linear in the
    input). Half-precision inputs are normalised in float32, as :func:`layer_norm` does."""
    if not use_input_stats:
        return F.instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)
    dims = tuple(range(2, input.dim()))
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    centred = x - x.mean(dims, keepdim=True)
    out = centred * torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    per_channel = (-1,) + (1,) * len(dims)
    if weight is not None:
        out = out * weight.reshape(per_channel)
    out = out if bias is None else out + bias.reshape(per_channel)
    return out.to(input.dtype)


def aten_instance_norm(input: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, use_input_stats: bool, momentum: float, eps: float,
                       cudnn_enabled: bool) -> Tensor:
    """``torch.instance_norm`` (the function under ``F.instance_norm``, its arguments in another order; a model that
    calls it directly had torch's wrong second derivatives) as :func:`instance_norm`."""
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def native_layer_norm(input: Tensor, normalized_shape: Sequence[int], weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``torch.native_layer_norm``: :func:`layer_norm`'s value with the mean ``μ`` and ``1/√(σ² + ε)`` it normalised by
    (each of the input's shape with the normalised dims kept as 1; float32 for a half-precision input, as torch's)."""
    dims = tuple(range(-len(normalized_shape), 0))
    x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
    mean = x.mean(dims, keepdim=True)
    rstd = torch.rsqrt((x - mean).square().mean(dims, keepdim=True) + eps)
    return layer_norm(input, normalized_shape, weight, bias, eps), mean, rstd


def instance_norm_twice(input: Tensor, running_mean: Tensor | None = None, running_var: Tensor | None = None,
                        weight: Tensor | None = None, bias: Tensor | None = None, use_input_stats: bool = True,
                        momentum: float = 0.1, eps: float = 1e-5) -> Tensor:
    """:func:`instance_norm` for double backprop, whose forward is the training step's own (the Fisher penalty's
    shared forward): a norm that normalises by its input's statistics while tracking running ones updates them as
    torch's does (by torch's kernel on the detached input, without a graph), then runs as the composite."""
    if use_input_stats and running_mean is not None and running_var is not None:
        with torch.no_grad():
            F.instance_norm(input.detach(), running_mean, running_var, None, None, True, momentum, eps)
    return instance_norm(input, running_mean, running_var, weight, bias, use_input_stats, momentum, eps)


def group_norm(input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None,
               eps: float = 1e-5) -> Tensor:
    """``F.group_norm`` of ``input.contiguous()``: the same values, in the layout its forward-mode rule can view."""
    return F.group_norm(input.contiguous(), num_groups, weight, bias, eps)


def weight_norm(v: Tensor, g: Tensor, dim: int = 0) -> Tensor:
    """``v·g/‖v‖``, the norm over every dim of ``v`` but ``dim`` (over all of them where ``dim = −1``), as
    ``torch._weight_norm`` computes it."""
    if dim == -1:
        return v * (g / torch.linalg.vector_norm(v))
    others = [d for d in range(v.dim()) if d != dim % v.dim()]
    return v * (g / torch.linalg.vector_norm(v, dim=others, keepdim=True))


def embedding_bag_twice(input: Tensor, weight: Tensor, offsets: Tensor | None = None, max_norm: float | None = None,
                        norm_type: float = 2.0, scale_grad_by_freq: bool = False, mode: str = "mean",
                        sparse: bool = False, per_sample_weights: Tensor | None = None,
                        include_last_offset: bool = False, padding_idx: int | None = None) -> Tensor:
    """:func:`embedding_bag` for a bag that sums or averages (torch's ``_embedding_bag_backward`` has no derivative
    in torch 2.13, so the exact Fisher penalty's double backprop through ``nn.EmbeddingBag(mode="sum")`` or
    ``"mean"`` failed); ``mode="max"``, ``max_norm`` and ``scale_grad_by_freq`` (which the lookup would drop: the
    penalty's gradients would lose torch's scaling) are left to torch's kernel, whose refusal names the fix."""
    run = F.embedding_bag if mode == "max" or max_norm is not None or scale_grad_by_freq else embedding_bag
    return run(input, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode, sparse, per_sample_weights,
               include_last_offset, padding_idx)


_MHA_PARAMETERS = tuple(inspect.signature(F.multi_head_attention_forward).parameters)


def multi_head_attention(*args: object, **kwargs: object) -> tuple[Tensor, Tensor | None]:
    """``F.multi_head_attention_forward`` on its explicit path, with the attention weights only if asked for."""
    bound = {**dict(zip(_MHA_PARAMETERS, args)), **kwargs}
    out, weights = F.multi_head_attention_forward(**{**bound, "need_weights": True})
    return out, (weights if bound.get("need_weights", True) else None)


#: torch function -> its composite form, in forward and reverse mode alike.
_COMPOSITES: dict[Callable, Callable] = {
    F.layer_norm: layer_norm,
    torch.layer_norm: layer_norm,
    F.scaled_dot_product_attention: attention,
    F.multi_head_attention_forward: multi_head_attention,
    F.embedding: embedding,
    torch._weight_norm: weight_norm,
    **EVERY_MODE,
    **LP_POOLS,
    F.embedding_bag: embedding_bag_twice,  # these two: reverse mode's forms, which the forward ones replace below
    F.instance_norm: instance_norm_twice,
}
#: The same with the functions that forward-mode AD alone needs in composite form (activations, bags, group and
#: instance norms, linear solves, determinants and Householder products).
_FORWARD_COMPOSITES: dict[Callable, Callable] = {**_COMPOSITES, **FORWARD_MODE, F.embedding_bag: embedding_bag,
                                                  F.group_norm: group_norm, F.instance_norm: instance_norm,
                                                  **LINALG_FORWARD, torch.instance_norm: aten_instance_norm,
                                                  torch.native_layer_norm: native_layer_norm}


class _CompositeForms(TorchFunctionMode):
    def __init__(self, table: dict[Callable, Callable]) -> None:
        super().__init__()
        self.table = table

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        return self.table.get(func, func)(*args, **(kwargs or {}))


def reverse_mode_forms() -> TorchFunctionMode:
    """:func:`composite_forms` for second derivatives by reverse mode (double backprop) and for ``vmap(grad)``:
    without the activations that torch differentiates twice in reverse mode and batches itself (SiLU, Mish, GLU),
    whose composites would only cost time and memory there."""
    return _CompositeForms(_COMPOSITES)


def composite_forms() -> TorchFunctionMode:
    """A context in which layer norms, attention and the activations of :mod:`.composite_activations` run as
    compositions of elementary operations.

    Example:
        >>> import torch
        >>> from torch.func import jvp
        >>> ln = torch.nn.LayerNorm(4).double()
        >>> x, e = torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64)
        >>> f = lambda x: torch.tanh(ln(x)).sum()
        >>> with composite_forms():
        ...     second = jvp(lambda x: jvp(f, (x,), (e,))[1], (x,), (e,))[1]
        >>> exact = e.flatten() @ torch.autograd.functional.hessian(f, x).reshape(8, 8) @ e.flatten()
        >>> bool(torch.isclose(second, exact, rtol=1e-10))
        True
    """
    return _CompositeForms(_FORWARD_COMPOSITES)
