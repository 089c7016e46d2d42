"""The fixed-gradient term behind :class:`~torchfim.train.FisherPenalty`'s cached gradients.

:func:`fixed_gradient` returns a 0-dim tensor whose value is a given constant and whose gradient
w.r.t. each parameter is a given tensor: the linear surrogate ``v + Σ_p ⟨c_p, θ_p − θ_p|now⟩``
without its arithmetic, which can hand its gradient and value to a function the first time it is
back-propagated. A parameter whose gradient is None (one the model's graph does not reach) is not an input of
the term, so its backward leaves that parameter's ``.grad`` as plain training would (None where nothing else
reaches it): ``DistributedDataParallel(find_unused_parameters=True)`` refuses a gradient for a parameter its
forward did not use. :func:`zero_term` is an exact 0 that reaches no parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

#: What a term's first backward hands its gradient and value to.
OnBackward = Callable[[list[Tensor | None], Tensor], None]


class FixedGradient(torch.autograd.Function):
    """A detached value whose gradient w.r.t. each of ``params`` is the tensor of ``grads`` beside it.

    It is the linear surrogate ``v + Σ_p ⟨c_p, θ_p − θ_p|now⟩`` without its arithmetic: the
    forward copies ``v`` and the backward hands back ``c_p`` times the incoming gradient (new
    tensors, which the caller owns), so a step that reuses a cached penalty gradient costs one
    multiply per parameter and autograd's addition into the task gradient. ``on_backward``, where given, is called
    with ``kept`` (the whole gradient, None where a parameter is not reached) and ``v`` by the first backward
    through the term, whatever its incoming gradient. Where ``params`` is empty the one input is a leaf of its own
    (``anchor``), so that the term still back-propagates.
    """

    @staticmethod
    def forward(ctx, value: Tensor, kept: list[Tensor | None], grads: list[Tensor], on_backward: OnBackward | None,
                *params: Tensor) -> Tensor:
        ctx.kept, ctx.grads, ctx.on_backward, ctx.value = kept, grads, on_backward, value.detach()
        return value.detach().clone()

    @staticmethod
    def backward(ctx, upstream: Tensor):
        if ctx.on_backward is not None:
            # Once: a second backward of a graph kept by retain_graph=True back-propagates the same term again.
            on_backward, ctx.on_backward = ctx.on_backward, None
            on_backward(ctx.kept, ctx.value)
        if not ctx.grads:  # the anchor's
            return None, None, None, None, None
        # New tensors, never the cached ones: torch.autograd.grad hands what a backward returns to the caller, who
        # may change it in place (a review: scaling them halved the penalty on every later reusing step).
        return (None, None, None, None, *torch._foreach_mul(ctx.grads, upstream))


def fixed_gradient(params: Sequence[Tensor], grads: Sequence[Tensor | None], value: Tensor,
                   on_backward: OnBackward | None = None) -> Tensor:
    """A 0-dim tensor of value exactly ``value`` whose gradient w.r.t. ``params[i]`` is exactly ``grads[i]``, and
    which reaches no parameter whose ``grads[i]`` is None; ``on_backward(grads, value)`` runs when it is first
    back-propagated."""
    reached = [(p, g) for p, g in zip(params, grads, strict=True) if g is not None]
    inputs = [p for p, _ in reached] or [torch.zeros((), dtype=value.dtype, device=value.device, requires_grad=True)]
    return FixedGradient.apply(value, list(grads), [g for _, g in reached], on_backward, *inputs)


def zero_term(dtype: torch.dtype, device: torch.device) -> Tensor:
    """An exact 0 that back-propagates (``term.backward()`` works) and reaches no parameter, so it leaves every
    ``.grad`` as it was: the penalty on a step that adds nothing. Neither depends on the parameter values."""
    return fixed_gradient([], [], torch.zeros((), dtype=dtype, device=device))
