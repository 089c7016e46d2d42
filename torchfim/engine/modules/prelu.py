"""``nn.PReLU``: ``z = max(0, x) + w ⊙ min(0, x)``, one slope ``w`` for all entries or one per channel.

The per-sample gradient of the slopes is ``∂/∂w = Σ g ⊙ min(0, x)`` over the entries that share a slope
(every entry for one slope; the positions of a channel, dim 1, for one per channel). torch.func batches
PReLU's backward to wrong numbers under nested ``vmap`` (torch 2.13), so this rule also keeps PReLU off
the generic rule's sample-by-sample loop.
"""

from __future__ import annotations

from torch import nn

from .base import Call, Grads, Rule, as_float


def prelu_supported(module: nn.Module) -> bool:
    """``nn.PReLU`` (its one trainable tensor is ``weight``)."""
    return isinstance(module, nn.PReLU)


class PReLURule(Rule):
    """Per-sample gradients of a PReLU's slopes."""

    def grads(self, call: Call, sens: list, rows: slice) -> Grads:
        x = as_float(call.args[0][rows])
        g = as_float(sens[0][:, rows])  # (m, b, *x.shape[1:])
        products = g * x.clamp(max=0)
        if self.module.weight.numel() == 1:
            per_sample = products.flatten(2).sum(-1, keepdim=True)  # (m, b, 1)
        else:  # channels in dim 1 of the input, dim 2 here
            per_sample = products.flatten(3).sum(-1) if products.dim() > 3 else products  # (m, b, channels)
        return {self.params["weight"]: per_sample.transpose(0, 1)}
