"""A digest of the model's outputs on the first inputs, as the engine reads them: the processes of a shared
computation compare theirs (:func:`torchfim._process_checks.check_same_outputs`), so that models with the same weights
but other forwards (another activation, a float attribute, a hook on one process) are refused, not blended."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .batch import Batch
from .view import ModelView

#: The fractional part of the golden ratio: ``(i·φ) mod 1`` spreads the digest's weights over [0, 1) with no period.
_GOLDEN = 0.6180339887498949
#: Rows of the first mini-batch that the digest runs the model on (two: a forward that squeezes drops a batch of one).
_ROWS = 2


def probe_rows(batch: Batch) -> Batch:
    """A copy of the first rows of ``batch`` (a copy: the probe does not hold a streamed mini-batch's storage)."""
    rows = batch.rows(slice(0, min(_ROWS, batch.size)))
    return rows.map(lambda t: t.clone() if isinstance(t, Tensor) else t)


def output_digest(view: ModelView, rows: Batch) -> list[float]:
    """``[Σᵢ oᵢ, Σᵢ wᵢ oᵢ, Σᵢ |oᵢ|, eps]`` in float64 over the entries ``o`` of ``view``'s outputs on ``rows`` (through
    ``output=``, as the engine reads them; non-finite entries as 0), ``wᵢ = 0.5 + (i·φ mod 1)`` fixed: outputs
    scaled, permuted or shifted move the first two, the third is their scale, ``eps`` that of the outputs' dtype
    (what rounding moves them by). NaN where the forward fails (the
    computation raises its own error). Called where the engine session holds the view's private buffers."""
    try:
        with torch.no_grad():
            out = view.to_tensor(rows.call(view.model)).detach()
    except Exception:  # noqa: BLE001 (before the collective: raising here would leave the other processes waiting)
        return [math.nan] * 4
    eps = torch.finfo(out.dtype).eps
    out = out.reshape(-1).to("cpu", torch.float64).nan_to_num(0.0, 0.0, 0.0)  # two rows' outputs (MPS has no float64)
    weights = torch.arange(out.numel(), dtype=torch.float64).mul_(_GOLDEN).frac_().add_(0.5)
    return [float(out.sum()), float(out @ weights), float(out.abs().sum()), eps]
