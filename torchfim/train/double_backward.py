"""Gradients of a penalty that holds a gradient: double backprop, with torch's refusals named.

The exact penalty ``α‖∇_θ L‖²`` is differentiated through ``∇_θ L``, so every operation of the model
needs a second derivative. A few have none in torch (``nn.EmbeddingBag(mode="max")``'s backward,
for one): torch builds the first gradient and only fails when the second is taken, which is the
caller's ``loss.backward()`` unless torchfim takes it first. :func:`penalty_gradients` takes it
(once per penalty as a check, or on every step whose gradient is cached) and turns that failure into
the fix: the finite-difference gradient, which differentiates the model once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError

NO_SECOND_DERIVATIVE = (
    "the exact Fisher penalty differentiates the model twice (double backprop), and an operation in it has no "
    "second derivative in torch ({torch}); use grad_method='finite_difference', which differentiates the model "
    "once (its gradient is within about 1e-7 of the exact one in float64, 1e-3 in float32)"
)


def _no_second_derivative(err: Exception) -> bool:
    text = str(err)
    return "not implemented" in text or "double backward" in text


def penalty_gradients(value: Tensor, params: list[Tensor], retain_graph: bool = False) -> list[Tensor | None]:
    """``∇_params value`` detached (None for a parameter it does not reach, which then gets no gradient, as in
    plain training), by double backprop where ``value`` holds a gradient; refused with the fix when an operation
    has no second derivative."""
    if not value.requires_grad:
        return [None] * len(params)
    try:
        grads = torch.autograd.grad(value, params, retain_graph=retain_graph, allow_unused=True)
    except (NotImplementedError, RuntimeError) as err:
        if not _no_second_derivative(err):
            raise
        raise TorchfimError(NO_SECOND_DERIVATIVE.format(torch=str(err).strip())) from err
    return [None if g is None else g.detach() for g in grads]
