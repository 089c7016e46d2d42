"""Normalisation layers with an elementwise affine map: ``z = x̂ ⊙ γ + β``.

``x̂`` is the normalised input (LayerNorm, RMSNorm: over the trailing ``normalized_shape``;
GroupNorm: per group of channels; BatchNorm in eval mode: with the running statistics), so the
per-sample gradients are ``∂/∂γ = Σ g ⊙ x̂`` and ``∂/∂β = Σ g``, summed over the dims that share the
parameter (positions, or the spatial dims of a channel) (docs/math.md §6). BatchNorm without
running statistics normalises with the batch's own statistics and is left to the generic rule
(the independence check then refuses it).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Grads, Rule, as_float

_TRAILING = (nn.LayerNorm, nn.RMSNorm)
_CHANNEL = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def norm_supported(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm, and BatchNorm in eval mode with running statistics."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return not module.training and module.running_mean is not None and isinstance(module, _CHANNEL)
    return isinstance(module, _TRAILING + (nn.GroupNorm,))


def normalised(module: nn.Module, x: Tensor) -> Tensor:
    """``x̂``: the module's output before its affine parameters."""
    if isinstance(module, nn.LayerNorm):
        return F.layer_norm(x, module.normalized_shape, None, None, module.eps)
    if isinstance(module, nn.RMSNorm):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = module.running_mean.view(shape), module.running_var.view(shape)
    return (x - mean) / (var + module.eps).sqrt()


class NormRule(Rule):
    """Per-sample products of the affine parameters of a normalisation layer."""

    def _fold(self, t: Tensor) -> Tensor:
        """``(m, b, ...)`` summed over the dims that share one parameter entry → ``(b, m, size)``."""
        m, b = t.shape[:2]
        if isinstance(self.module, _TRAILING):
            size = 1
            for s in self.module.normalized_shape:
                size *= s
            return t.reshape(m, b, -1, size).sum(2).transpose(0, 1)
        return t.reshape(m, b, t.shape[2], -1).sum(-1).transpose(0, 1)

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        g = as_float(sens[0][:, rows])
        out: Grads = {}
        if "weight" in self.params:
            xhat = as_float(normalised(self.module, call.args[0][rows]))
            out[self.params["weight"]] = self._fold(g * xhat.unsqueeze(0))
        if "bias" in self.params:
            out[self.params["bias"]] = self._fold(g)
        return out
