"""The monitor's held inputs: its mini-batches as the engine's batches, pooled for subset windows.

All held mini-batches are pooled into one batch where they join (per-sample tensors of one shape past the batch
dimension, the same other values); where they do not (a language model's mini-batches padded to other lengths),
into one batch per group that does, each mini-batch joining the first group it fits. A window's rows are numbered
through the pool's batches in order, and a window is measured as one sub-batch per pooled batch that holds some
of its rows (so it costs one forward and backward per such batch: bucket held sequences to a few lengths, or pad
them to one with a mask, where there are many).

A held mini-batch is a tensor whose first dimension is the batch, or a dict of keyword inputs
(Hugging Face style: ``{"input_ids": ..., "attention_mask": ...}``); target keys are not passed to the model,
but their labels -100 leave positions out as in :func:`torchfim.fisher`. The
tensors are kept as they came (detached) and moved to the model's device and float dtype at each
measurement, so a model moved or cast after the monitor was made is measured as it is then.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .._batches import Inputs, copied, held_by_caller, iter_batches
from ..engine.batch import Batch, detached, make_batch
from ..engine.labels import ModelLabels
from ..errors import TorchfimError, all_finite

__all__ = ["hold", "pooled", "pooled_groups", "window_batches"]


def hold(inputs: Inputs, labels: ModelLabels | None = None) -> list[Batch]:
    """The non-empty mini-batches of ``inputs``, checked (a batch dimension, finite floats) and detached; a dict's
    labels read as the model's loss reads them where ``labels`` says how (:func:`.engine.batch.make_batch`)."""
    held, copy = [], not held_by_caller(inputs)  # a loader may refill one buffer from one mini-batch to the next
    for x, y in iter_batches([inputs] if isinstance(inputs, Mapping) else inputs):
        if not isinstance(x, (Tensor, Mapping)):
            raise TorchfimError(
                f"each mini-batch of held inputs must be a torch.Tensor or a dict of tensors, got {type(x).__name__}"
            )
        if isinstance(x, Tensor) and x.dim() == 0:
            raise TorchfimError("held inputs must have a batch dimension first, got a 0-dim tensor")
        batch = make_batch(x, y, None, None, labels=labels)  # an (x, y) pair's labels -100 leave positions out
        tensors = [*batch.args, *(v for v in batch.kwargs.values() if isinstance(v, Tensor))]
        if any(t.is_floating_point() and not all_finite(t) for t in tensors):
            raise TorchfimError("the held inputs contain NaN or Inf; clean or drop those samples before monitoring")
        if batch.size > 0:
            held.append(batch.map(copied if copy else detached))
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
        targets = _joined([b.targets for b in held], held)
    except (RuntimeError, KeyError, IndexError, ValueError) as exc:
        raise TorchfimError(
            f"subset= could not join the held mini-batches into one pool to draw windows from ({exc})"
        ) from None
    return Batch(args, kwargs, sum(b.size for b in held), targets)


def pooled_groups(held: list[Batch]) -> list[Batch]:
    """The held mini-batches pooled for subset windows: all in one batch where :func:`pooled` joins them; else one
    batch per group of mini-batches that join (the same keys, per-sample tensors of the same shape past the batch
    dimension, the same values that are not per sample), each joining the group of the first it joins with."""
    try:
        return [pooled(held)]
    except TorchfimError:
        groups: list[list[Batch]] = []
        for batch in held:
            group = next((g for g in groups if _join(g[0], batch)), None)
            if group is None:
                groups.append([batch])
            else:
                group.append(batch)
        return [pooled(group) for group in groups]


def window_batches(pool: list[Batch], rows: Tensor) -> tuple[list[Batch], Tensor | None]:
    """The sub-batches of the pool's rows ``rows`` (numbered through ``pool`` in order), one per pooled batch that
    holds some, and the order that puts their per-input results back in the order of ``rows`` (None: that order)."""
    if len(pool) == 1:
        return [pool[0].rows(rows)], None
    parts, taken, start = [], [], 0
    for batch in pool:
        mine = ((rows >= start) & (rows < start + batch.size)).nonzero().reshape(-1)
        if len(mine):
            parts.append(batch.rows(rows[mine] - start))
            taken.append(mine)
        start += batch.size
    return parts, torch.argsort(torch.cat(taken))


def _join(first: Batch, batch: Batch) -> bool:
    """Whether ``batch`` joins the group of ``first``: :func:`pooled` joins the two."""
    try:
        pooled([first, batch])
    except TorchfimError:
        return False
    return True


def _joined(values: list[object], held: list[Batch]) -> object:
    if all(isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == b.size for v, b in zip(values, held)):
        return torch.cat(values)  # type: ignore[arg-type]
    if any(v is not values[0] and not (isinstance(v, Tensor) and isinstance(values[0], Tensor)
                                       and torch.equal(v, values[0])) for v in values):
        raise ValueError("an input that is not per-sample differs between held mini-batches")
    return values[0]
