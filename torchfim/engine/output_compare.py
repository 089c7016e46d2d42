"""Whether two computations of a model's outputs agree, rounding aside, where outputs may hold masked classes.

A categorical logit of −Inf is a class masked out (:mod:`torchfim.families.categorical`); so, in effect, is a fill
of −1e30 or ``torch.finfo(dtype).min``. A tolerance scaled by the outputs' largest magnitude would then be
infinite, or astronomically large, and pass anything (``-inf − -inf`` is NaN, and no comparison with NaN fails).
So the infinite entries are compared exactly, their places and signs, and each finite entry within
``tol · max(|b|, S)``, where the scale ``S`` is the largest magnitude among the entries within a million times
the median one: a fill is left out of it (and compared relative to itself), the model's own values are not
(``S`` is their largest, as a tolerance scaled by the largest output had it). Outputs most of whose entries are
fills keep them in ``S``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batching_tolerance", "outputs_agree", "same_infinities"]

#: Entries beyond this many times the median magnitude are fills, left out of the scale.
FILL_RATIO = 1e6
#: The tolerance of a batched against a one-sample forward, in units of the working precision's eps: wide in
#: float32 and float64, where other kernels for another batch size may sum in another order over long
#: reductions; narrow in half precision, whose eps is so coarse that 1e3 of them pass any mixing of samples
#: (bfloat16: 7.8 of the outputs' scale). Measured batched against alone on CPU: under 1 eps in float32, 0 in
#: bfloat16 and float16 (a deep tanh MLP, a transformer encoder, a GroupNorm CNN, a 2-layer GPT-2).
BATCHING_EPS, HALF_BATCHING_EPS = 1e3, 16.0


def same_infinities(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` (one shape) hold −Inf, +Inf and NaN in the same places."""
    return all(torch.equal(test(a), test(b)) for test in (torch.isneginf, torch.isposinf, torch.isnan))


def outputs_agree(a: Tensor, b: Tensor, tol: float, floor: float = 0.0) -> bool:
    """Whether ``a`` and ``b`` (one shape) agree: infinities and NaNs in the same places, each entry finite in both
    within ``tol · max(|b|, S, floor)`` (see the module docstring), in float64.

    Example:
        >>> inf, fill = float("inf"), torch.finfo(torch.float32).min
        >>> outputs_agree(torch.tensor([1.0, -inf, 3.0]), torch.tensor([1.0, -inf, 3.0 + 1e-7]), 1e-6)
        True
        >>> outputs_agree(torch.tensor([1.0, fill, 3.0]), torch.tensor([1.5, fill, 3.0]), 1e-6)  # not 1e32 wide
        False
    """
    if not same_infinities(a, b):
        return False
    a, b = a.detach().double(), b.detach().double()
    both = torch.isfinite(a) & torch.isfinite(b)
    if not bool(both.any()):
        return True
    x, size = a[both], b[both].abs()
    typical = float(size.median())
    ordinary = size[size <= FILL_RATIO * typical] if typical > 0 else size
    scale = max(float(ordinary.max()) if ordinary.numel() else 0.0, floor)
    return bool(((x - b[both]).abs() <= tol * size.clamp_min(scale)).all())


def batching_tolerance(model: torch.nn.Module, out: Tensor) -> float:
    """The relative tolerance (for :func:`outputs_agree`) between the outputs ``out`` of a batched forward and those
    of fewer samples: :data:`BATCHING_EPS` eps of the least precise floating dtype the forward computes in (its
    parameters' and outputs'), :data:`HALF_BATCHING_EPS` where that is a half precision. Taken from the outputs
    alone, a float32 body under a float64 head was refused as mixing samples (its rounding, 6e-8, is above 1e3
    float64 eps); buffers are left out, as a half-precision one the forward may not use would loosen the check of
    a float32 model a thousandfold."""
    dtypes = {t.dtype for t in model.parameters() if t.is_floating_point()}
    eps = max(torch.finfo(d).eps for d in dtypes | ({out.dtype} if out.is_floating_point() else set()))
    return (HALF_BATCHING_EPS if eps > torch.finfo(torch.float32).eps else BATCHING_EPS) * eps
