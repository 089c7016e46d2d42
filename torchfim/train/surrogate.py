"""The fixed-gradient term behind :class:`~torchfim.train.FisherPenalty`'s cached gradients.

:func:`fixed_gradient` returns a 0-dim tensor whose value is a given constant and whose gradient
w.r.t. each parameter is a given tensor: the linear surrogate ``v + Σ_p ⟨c_p, θ_p − θ_p|now⟩``
without its arithmetic, which can hand its gradient and value to a function the first time it is
back-propagated. :func:`zero_term` is the same with value and gradients exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: What a term's first backward hands its gradient and value to.
OnBackward = Callable[[list[Tensor], Tensor], None]


class FixedGradient(torch.autograd.Function):
    """A detached value whose gradient w.r.t. each parameter is a given tensor (exact zeros when None).

    It is the linear surrogate ``v + Σ_p ⟨c_p, θ_p − θ_p|now⟩`` without its arithmetic: the
    forward copies ``v`` and the backward hands back ``c_p`` times the incoming gradient (new
    tensors, which the caller owns), so a step that reuses a cached penalty gradient costs one
    multiply per parameter and autograd's addition into the task gradient. ``on_backward``, where given, is called
    with ``c`` and ``v`` by the first backward through the term, whatever its incoming gradient.
    """

    @staticmethod
    def forward(ctx, value: Tensor, grads: list[Tensor] | None, on_backward: OnBackward | None,
                *params: Tensor) -> Tensor:
        ctx.grads, ctx.on_backward, ctx.value = grads, on_backward, value.detach()
        if grads is None:
            ctx.specs = [(p.shape, p.dtype, p.device) for p in params]
        return value.detach().clone()

    @staticmethod
    def backward(ctx, upstream: Tensor):
        if ctx.on_backward is not None:
            # Once: a second backward of a graph kept by retain_graph=True back-propagates the same term again.
            on_backward, ctx.on_backward = ctx.on_backward, None
            on_backward(ctx.grads, ctx.value)
        if ctx.grads is None:
            return (None, None, None,
                    *[torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.specs])
        # New tensors, never the cached ones: torch.autograd.grad hands what a backward returns to the caller, who
        # may change it in place (a review: scaling them halved the penalty on every later reusing step).
        return (None, None, None, *torch._foreach_mul(ctx.grads, upstream))


def zero_term(params: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An exact 0 whose gradient w.r.t. every parameter is an exact zero tensor.

    Neither depends on the parameter values, so both stay 0 even if a parameter is Inf or NaN.
    """
    return FixedGradient.apply(torch.zeros((), dtype=dtype, device=device), None, None, *params)


def fixed_gradient(params: Sequence[Tensor], grads: list[Tensor], value: Tensor,
                   on_backward: OnBackward | None = None) -> Tensor:
    """A 0-dim tensor of value exactly ``value`` whose gradient w.r.t. ``params[i]`` is exactly ``grads[i]``;
    ``on_backward(grads, value)`` runs when it is first back-propagated."""
    return FixedGradient.apply(value, grads, on_backward, *params)
