"""Power-average pooling (``F.lp_pool1d/2d/3d``) in a form whose second derivatives are finite where a window is all
zero (:func:`.composites.composite_forms`, both modes).

torch computes ``(Σ_window x^p)^(1/p)`` as ``(sign(s)·relu(|s|)·k)^(1/p)`` of the window mean ``s``: the first
derivative at a window of zeros is set to 0 (relu's), but the derivative of ``t^(1/p)`` at ``t = 0`` is infinite, and
double backprop multiplies it by relu's zero: NaN. After a ReLU such windows are common, and the exact Fisher penalty's
gradient through ``LPPool1d(3, 2)`` came out NaN in every parameter, without a warning
(``tests/test_penalty_second_derivatives.py``). Here the root (and, for ``p > 1``, the power of the inputs, whose
second derivative is infinite at 0 for ``p < 2``) is taken of 1 where its argument is 0 and the result set to 0 there:
the same values and first derivatives as torch's, finite second ones. ``p = ±∞`` is torch's own (a max pool).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LP_POOLS"]


def _power_at_zero_zero(t: Tensor, exponent: float) -> Tensor:
    """``t ** exponent`` with ``0 ** exponent`` taken as 0 through a branch that does not differentiate the power."""
    zero = t == 0
    return torch.where(zero, torch.zeros_like(t), torch.where(zero, torch.ones_like(t), t).pow(exponent))


def _lp_pool(torchs: Callable, average: Callable, dims: int) -> Callable:
    """The composite of torch's ``lp_pool{dims}d`` (``torchs``), pooling by ``average`` (``avg_pool{dims}d``)."""

    def lp_pool(input: Tensor, norm_type: float, kernel_size: int | tuple[int, ...], stride: object = None,
                ceil_mode: bool = False) -> Tensor:
        if math.isinf(norm_type):
            return torchs(input, norm_type, kernel_size, stride, ceil_mode)
        powered = _power_at_zero_zero(input, norm_type) if norm_type > 1 else input.pow(norm_type)
        out = average(powered, kernel_size, stride if stride is not None else kernel_size, 0, ceil_mode)
        size = kernel_size if isinstance(kernel_size, int) else None
        window = size ** dims if size is not None else math.prod(kernel_size)
        return _power_at_zero_zero((torch.sign(out) * F.relu(torch.abs(out))).mul(window), 1.0 / norm_type)

    return lp_pool


#: torch's power-average pools -> their composite forms.
LP_POOLS: dict[Callable, Callable] = {
    F.lp_pool1d: _lp_pool(F.lp_pool1d, F.avg_pool1d, 1),
    F.lp_pool2d: _lp_pool(F.lp_pool2d, F.avg_pool2d, 2),
    **({F.lp_pool3d: _lp_pool(F.lp_pool3d, F.avg_pool3d, 3)} if hasattr(F, "lp_pool3d") else {}),
}
