"""Whether a frozen ``nn.TransformerEncoder`` with nested tensors gives the model other outputs outside torchfim.

torchfim's forwards take the path with autograd through every attention layer
(:mod:`.function_forwards`): the function that training differentiates. A frozen encoder (no trainable parameter,
in eval mode, on inputs that need no gradient) takes torch's fast path in training too, and with a padding mask that
path packs the batch into a nested tensor and returns zeros at the padded positions, where the path with autograd
computes them. A model whose later layers read the padded positions is then another function outside torchfim than
inside, and its Fisher here would be of the latter without a word: the first mini-batch's outputs are compared with
a forward as torch runs it, and a difference is named, with the fix.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..errors import warn_user
from ..families import Family, Positions
from .batch import Batch
from .function_forwards import torchs_fast_path
from .output_compare import batching_tolerance, outputs_agree

FAST_PATH_DIFFERS = (
    "torchfim: the frozen nn.TransformerEncoder {names} (eval mode, nested tensors) gives the model other outputs "
    "outside torchfim (by up to {gap:.3g}): there torch takes its fast path, which returns zeros at padded positions, "
    "where torchfim's forwards compute them (the path with autograd), so this Fisher is of the model with padded "
    "positions computed. Set enable_nested_tensor=False and use_nested_tensor=False on the encoder to run the model "
    "so everywhere, or leave the padded positions out before a layer reads them"
)


def frozen_nested_encoders(model: nn.Module) -> list[str]:
    """Names of the modules of ``model`` that are ``nn.TransformerEncoder`` s in eval mode with nested tensors on and
    no trainable parameter."""
    return [name or "(the model)" for name, m in model.named_modules()
            if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and not m.training
            and not any(p.requires_grad for p in m.parameters())]


def observed_outputs(family: Family, out: Tensor) -> Tensor | None:
    """The output numbers of ``out`` (B, L·C) that ``family`` observes, where it leaves positions out (a mask of
    :class:`~torchfim.families.Positions`); None where it observes them all."""
    mask = family.mask if isinstance(family, Positions) else None
    if mask is None or out.dim() != 2 or out.shape[1] % mask.shape[1]:
        return None
    return mask.to(out.device).repeat_interleave(out.shape[1] // mask.shape[1], dim=1)


def check_fast_path_agrees(model: nn.Module, batch: Batch, out: Tensor, flat: Callable[[object], Tensor],
                           observed: Tensor | None = None) -> None:
    """Warn where ``model``'s outputs on ``batch`` with torch's fast path differ from ``out`` (torchfim's forward;
    ``flat`` reads a raw output as it) in the output numbers ``observed`` (all by default); nothing to run for a
    model without a frozen nested encoder."""
    names = frozen_nested_encoders(model)
    if not names:
        return
    with torch.no_grad(), torchs_fast_path(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's notice that nested tensors are a prototype: this forward is ours
        plain = flat(batch.call(model)).reshape(out.shape)
    ref = out.detach()
    if observed is not None:
        plain, ref = plain[observed], ref[observed]
    if not outputs_agree(plain, ref, batching_tolerance(model, out), floor=1.0):
        gap = float((plain - ref).abs().max())
        warn_user(FAST_PATH_DIFFERS.format(names=", ".join(repr(n) for n in names), gap=gap))
