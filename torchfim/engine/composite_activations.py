"""Activations run as compositions of elementary operations while second derivatives are taken
(:func:`.composites.composite_forms`).

Three have no forward-mode rule for their backward, so the Hessian estimator's forward-over-reverse and
forward-over-forward passes through them fail: ``silu`` (``x·σ(x)``), ``mish`` (``x·tanh(softplus(x))``) and
``glu`` (``a·σ(b)``, ``a, b`` the halves of ``x`` along ``dim``). torch differentiates them twice in reverse mode
and batches them, so the penalty's double backprop takes them as they are (:data:`FORWARD_MODE`).

Two fail in reverse mode as well (:data:`EVERY_MODE`): ``hardsigmoid`` (``relu6(x + 3)/6``) has no second
derivative in torch at all, and ``rrelu`` in eval mode (the leaky ReLU of slope ``(lower + upper)/2``) no batching
rule; in training mode RReLU's slopes are random and it is torch's own.

``inplace=True`` writes the composite's value into the input, as torch's own does (a model may read the input
after the call), from a copy of it, so that the composite differentiates the input's value before the write.
The values are torch's to round-off (``hardsigmoid``'s to the bit). torch's float64 ``hardsigmoid`` backward has its
slope 1/6 rounded to float32 (3e-8 relative); the composite's is exact.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _written(input: Tensor, inplace: bool, composite: Callable[[Tensor], Tensor]) -> Tensor:
    """``composite(input)``, written into ``input`` where ``inplace`` (computed from a copy)."""
    return input.copy_(composite(input.clone())) if inplace else composite(input)


def silu(input: Tensor, inplace: bool = False) -> Tensor:
    """``x·σ(x)``."""
    return _written(input, inplace, lambda x: x * torch.sigmoid(x))


def mish(input: Tensor, inplace: bool = False) -> Tensor:
    """``x·tanh(softplus(x))``."""
    return _written(input, inplace, lambda x: x * torch.tanh(F.softplus(x)))


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``relu6(x + 3)/6`` (``clamp(x/6 + 1/2, 0, 1)``), torch's values to the bit."""
    return _written(input, inplace, lambda x: F.relu6(x + 3) / 6)


def glu(input: Tensor, dim: int = -1) -> Tensor:
    """``a·σ(b)`` for the halves ``a, b`` of ``input`` along ``dim``; torch's own where that dim is odd (its error)."""
    if input.shape[dim] % 2:
        return F.glu(input, dim)
    a, b = input.chunk(2, dim)
    return a * torch.sigmoid(b)


def rrelu(input: Tensor, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
          inplace: bool = False) -> Tensor:
    """In eval mode, the leaky ReLU of slope ``(lower + upper)/2``; in training mode torch's own (random slopes)."""
    if training:
        return F.rrelu(input, lower, upper, training, inplace)
    return F.leaky_relu(input, (lower + upper) / 2, inplace)


#: torch function -> composite, where forward-mode second derivatives need it.
FORWARD_MODE: dict[Callable, Callable] = {F.silu: silu, F.mish: mish, F.glu: glu}
#: torch function -> composite, where reverse-mode second derivatives or batching need it too.
EVERY_MODE: dict[Callable, Callable] = {F.hardsigmoid: hardsigmoid, F.rrelu: rrelu}
