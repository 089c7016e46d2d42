"""Whether two computations of a model's outputs agree, rounding aside, where outputs may hold infinities.

A categorical logit of −Inf is a class masked out (:mod:`torchfim.families.categorical`). A tolerance scaled by
the outputs' largest magnitude would then be infinite and pass anything (``-inf − -inf`` is NaN, and no
comparison with NaN fails): the infinite entries are compared exactly, their places and signs, and the finite
ones against a scale taken from the finite entries alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["finite_gap", "same_infinities"]


def same_infinities(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape) hold −Inf, +Inf and NaN in the same places."""
    return all(torch.equal(test(a), test(b)) for test in (torch.isneginf, torch.isposinf, torch.isnan))


def finite_gap(a: Tensor, b: Tensor) -> tuple[float, float]:
    """``(max |a − b|, max |b|)`` over the entries finite in both (zeros where there are none), in float64.

    Example:
        >>> inf = float("inf")
        >>> finite_gap(torch.tensor([1.0, -inf, 3.0]), torch.tensor([1.5, -inf, 2.0]))
        (1.0, 2.0)
    """
    a, b = a.detach().double(), b.detach().double()
    both = torch.isfinite(a) & torch.isfinite(b)
    if not bool(both.any()):
        return 0.0, 0.0
    return float((a[both] - b[both]).abs().max()), float(b[both].abs().max())
