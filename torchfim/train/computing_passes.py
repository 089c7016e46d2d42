"""The contexts the passes of :class:`~torchfim.train.FisherPenalty`'s computing steps run in.

Like the engine's, they run in :func:`~torchfim.engine.plain_forwards.differentiated_forwards`; compiled
code runs eagerly (:func:`~torchfim.engine.plain_forwards.eager_compiled`) unless the step differentiates
the model once only (the finite difference of ``kind="batch_gradient"``), since double backprop and
per-sample gradients cannot run it; a finite difference computed in half precision (the parameters', or
autocast's: the caller's, or a region the forward enters) is named as coarse;
embeddings give dense gradients; and the caller's backward hooks do not run on the penalty's own
differentiations (:func:`~torchfim.engine.derivative_settings.quiet_backward_hooks`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from ..engine.derivative_settings import dense_gradients, quiet_backward_hooks
from ..engine.native_dtype import autocast_observed
from ..engine.plain_forwards import differentiated_forwards, eager_compiled, holds_compiled
from ..errors import warn_user
from .finite_difference import working_dtype
from .forward_precision import ForwardPrecision

COMPILED = ("the model is compiled (torch.compile), and FisherPenalty(kind={kind!r}, grad_method={method!r}) "
            "differentiates it twice or per sample, which compiled code cannot: the steps that compute the "
            "penalty run it eagerly. kind='batch_gradient' with grad_method='finite_difference' differentiates "
            "it once and keeps it compiled")
COARSE = ("torchfim: FisherPenalty(grad_method='finite_difference') computes in {dtype} here (the model's parameters "
          "or torch.autocast), where a forward difference of gradients is coarse, by how much depends on the model: "
          "measured 7-17 % off the exact gradient on a small MLP in bfloat16 (3-5 % in float16), 100-120 % on a "
          "one-layer GPT-2 (61-81 % in float16); grad_method='exact' is within 1 % in the same precision on both")


def computing_passes(model: nn.Module, kind: str, grad_method: str, params: list[Tensor], name_precision: bool,
                     module_hooks: bool = True, precision: ForwardPrecision | None = None) -> ExitStack:
    """The contexts of one computing step on the trainable ``params``; with ``name_precision``, a finite difference
    in half precision (of the parameters, or of autocast) is named by a warning; the backward hooks of the
    parameters, and with ``module_hooks`` of the modules (not where a forward is shared with the task loss), are
    quiet."""
    stack = ExitStack()
    if grad_method == "finite_difference":
        stack.enter_context(_precision_seen(model, params[0], name_precision, precision or ForwardPrecision()))
    stack.enter_context(differentiated_forwards(transforms=kind == "trace"))  # per-input gradients: vmap
    stack.enter_context(dense_gradients(model))
    stack.enter_context(quiet_backward_hooks(model, params, modules=module_hooks))
    if not (grad_method == "finite_difference" and kind == "batch_gradient"):
        if holds_compiled(model):
            warn_user(COMPILED.format(kind=kind, method=grad_method))
        stack.enter_context(eager_compiled())
    return stack

CAST_DOWN = ("torchfim: FisherPenalty(grad_method='finite_difference'): the model's forward computes in {dtype} inside "
             "a {params} model (it casts down and back, as Llama-family RMS norms do), so the step is taken for "
             "{dtype} and the gradient has {dtype}'s finite-difference accuracy (1e-2 off the exact one on a Llama "
             "trial), not {params}'s; grad_method='exact' keeps {params}'s")


@contextmanager
def _precision_seen(model: nn.Module, first: Tensor, name: bool, precision: ForwardPrecision) -> Iterator[None]:
    """Autocast regions of the forward and the less precise dtypes it casts to (``precision``) observed: the step ε
    is taken for their precision; with ``name``, a step that computed in half precision, of the parameters or of
    autocast, is named when it ends."""
    with autocast_observed(), precision.counted(model, first):
        yield
        dtype = working_dtype(first)  # within the block: the regions the passes entered count
    if name and dtype in (torch.float16, torch.bfloat16):
        warn_user(COARSE.format(dtype=str(dtype).removeprefix("torch.")))
    elif name and dtype in precision.lower:
        warn_user(CAST_DOWN.format(dtype=str(dtype).removeprefix("torch."),
                                   params=str(first.dtype).removeprefix("torch.")))
