"""Hugging Face models' attention on its eager implementation for a while: what ``vmap`` over their inputs needs.

A Hugging Face model with SDPA attention (the default) builds its attention mask by asking, in Python, whether the
padding mask is all ones (``padding_mask.all()``, to skip the mask where it can): under ``torch.func.vmap`` over
the inputs each sample's answer is a batched tensor, which Python cannot branch on, and the whole model cannot be
batched. The eager implementation (``softmax(q kᵀ/√d + mask) v`` in torch operations) builds the mask without that
question, and computes the same attention to round-off (a 2-layer GPT-2's trace penalty: the same value, 9× faster
than one input at a time).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["EAGER_NOT_FINITE", "eager_attention", "refuse_non_finite", "switchable_attention"]

#: Why a pass under eager attention is not taken: a Hugging Face model's eager attention gives NaN on a query row
#: that attends to no key (a left-padded sequence's padding under a causal mask), where SDPA gives finite values.
EAGER_NOT_FINITE = ("with eager attention, which vmap needs, it gives non-finite values where its SDPA attention "
                    "does not (padding rows that attend to no key, as left padding makes)")


def refuse_non_finite(values: Tensor | Mapping[str, Tensor], eager: bool) -> None:
    """Where ``eager`` attention made ``values`` (a tensor, or a dict of them) non-finite, raise the ``RuntimeError``
    of a pass that cannot be batched (:data:`EAGER_NOT_FINITE`): the callers then take it as torch.func's own."""
    tensors = values.values() if isinstance(values, Mapping) else (values,)
    if eager and not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise RuntimeError(EAGER_NOT_FINITE)


def switchable_attention(model: nn.Module) -> bool:
    """Whether ``model`` holds a Hugging Face model whose attention is not eager and can be switched (transformers'
    ``set_attn_implementation``)."""
    return any(_switchable(module) for module in model.modules())


def _switchable(module: nn.Module) -> bool:
    config = getattr(module, "config", None)
    return hasattr(module, "set_attn_implementation") and getattr(config, "_attn_implementation", "eager") != "eager"


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, every Hugging Face model in ``model`` (an ensemble's several, a multimodal model's
    sub-models) attends by its eager implementation; afterwards each configuration has the implementation it had."""
    configs = {id(c): c for m in model.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    before = {key: config.__dict__.get("_attn_implementation_internal") for key, config in configs.items()}
    try:
        for module in model.modules():  # outermost first: switching one switches the sub-models it holds
            if _switchable(module):
                try:
                    module.set_attn_implementation("eager")
                except (ValueError, RuntimeError):  # a model that refuses the switch keeps its own (vmap says why)
                    pass
        yield
    finally:
        for key, config in configs.items():  # the stored value itself: the setter would pass it to sub-configs
            config.__dict__["_attn_implementation_internal"] = before[key]
