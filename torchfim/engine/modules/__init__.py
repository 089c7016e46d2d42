"""Per-module rules: which rule covers a module (docs/math.md §6).

Linear, Conv1d/Conv2d, Embedding, LayerNorm, RMSNorm, GroupNorm and BatchNorm (eval) have rules
of their own; any other module with trainable parameters gets the generic rule (``torch.func``
over that module alone). Adding a rule is one module here and one line in :func:`rule_for`.
"""

from __future__ import annotations

from torch import nn

from .base import Call, Grads, Rule
from .conv import ConvRule, conv_supported
from .embedding import EmbeddingRule, embedding_supported
from .generic import GenericRule, tensors_of
from .linear import LinearRule
from .norm import NormRule, norm_supported

__all__ = ["Call", "Grads", "Rule", "GenericRule", "LinearRule", "rule_for", "tensors_of"]


def rule_for(module: nn.Module, params: dict[str, int], path: str) -> Rule:
    """The rule for ``module`` covering ``params`` (local name → index in θ)."""
    own = set(dict(module.named_parameters(recurse=False)))
    if set(params) <= own and set(params) <= {"weight", "bias"}:
        if isinstance(module, nn.Linear):
            return LinearRule(module, params)
        if conv_supported(module):
            return ConvRule(module, params)
        if embedding_supported(module):
            return EmbeddingRule(module, params)
        if norm_supported(module):
            return NormRule(module, params)
    return GenericRule(module, params, path)
