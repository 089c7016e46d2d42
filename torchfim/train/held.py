"""The monitor's held inputs: its mini-batches as the engine's batches, pooled for subset windows.

A held mini-batch is a tensor whose first dimension is the batch, or a dict of keyword inputs
(Hugging Face style: ``{"input_ids": ..., "attention_mask": ...}``); target keys are dropped. The
tensors are kept as they came (detached) and moved to the model's device and float dtype at each
measurement, so a model moved or cast after the monitor was made is measured as it is then.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._batches import Inputs, iter_batches
from ..engine.batch import Batch, detached, make_batch
from ..errors import TorchfimError, all_finite

__all__ = ["hold", "pooled"]


def hold(inputs: Inputs) -> list[Batch]:
    """The non-empty mini-batches of ``inputs``, checked (a batch dimension, finite floats) and detached."""
    held = []
    for x, _ in iter_batches([inputs] if isinstance(inputs, Mapping) else inputs):
        if not isinstance(x, (Tensor, Mapping)):
            raise TorchfimError(
                f"each mini-batch of held inputs must be a torch.Tensor or a dict of tensors, got {type(x).__name__}"
            )
        if isinstance(x, Tensor) and x.dim() == 0:
            raise TorchfimError("held inputs must have a batch dimension first, got a 0-dim tensor")
        batch = make_batch(x, None, None, None)
        tensors = [*batch.args, *(v for v in batch.kwargs.values() if isinstance(v, Tensor))]
        if any(t.is_floating_point() and not all_finite(t) for t in tensors):
            raise TorchfimError("the held inputs contain NaN or Inf; clean or drop those samples before monitoring")
        if batch.size > 0:
            held.append(batch.map(detached))
    if not held:
        raise TorchfimError("the held inputs are empty: pass at least one input to measure Tr(F) on")
    return held


def pooled(held: list[Batch]) -> Batch:
    """One batch of all held inputs, to draw subset windows from (every tensor concatenated along its
    batch dimension; other values must be the same in every mini-batch)."""
    first = held[0]
    try:
        args = tuple(_joined([b.args[i] for b in held], held) for i in range(len(first.args)))
        kwargs = {k: _joined([b.kwargs[k] for b in held], held) for k in first.kwargs}
    except (RuntimeError, KeyError, IndexError, ValueError) as exc:
        raise TorchfimError(
            f"subset= needs held mini-batches of one input shape and the same keys, to draw windows across "
            f"them ({exc})"
        ) from None
    return Batch(args, kwargs, sum(b.size for b in held))


def _joined(values: list[object], held: list[Batch]) -> object:
    if all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b.size for v, b in zip(values, held)):
        return torch.cat(values)  # type: ignore[arg-type]
    if any(v is not values[0] and not (isinstance(v, Tensor) and isinstance(values[0], Tensor)
                                       and torch.equal(v, values[0])) for v in values):
        raise ValueError("an input that is not per-sample differs between held mini-batches")
    return values[0]
