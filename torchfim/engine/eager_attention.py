"""Hugging Face models' attention on its eager implementation for a while: what ``vmap`` over their inputs needs.

A Hugging Face model with SDPA attention (the default) builds its attention mask by asking, in Python, whether the
padding mask is all ones (``padding_mask.all()``, to skip the mask where it can): under ``torch.func.vmap`` over
the inputs each sample's answer is a batched tensor, which Python cannot branch on, and the whole model cannot be
batched. The eager implementation (``softmax(q kᵀ/√d + mask) v`` in torch operations) builds the mask without that
question, and computes the same attention to round-off (a 2-layer GPT-2's trace penalty: the same value, 9× faster
than one input at a time).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

__all__ = ["eager_attention", "switchable_attention"]


def switchable_attention(model: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face model in ``model`` whose attention is not eager and can be switched (transformers'
    ``set_attn_implementation``); None where there is none."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if hasattr(module, "set_attn_implementation") and getattr(config, "_attn_implementation", "eager") != "eager":
            return module
    return None


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, the Hugging Face models in ``model`` attend by their eager implementation; afterwards each of
    their configurations has the implementation it had (a multimodal model's sub-models may have had several)."""
    owner = switchable_attention(model)
    if owner is None:
        yield
        return
    configs = {id(c): c for m in owner.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    before = {key: config._attn_implementation for key, config in configs.items()}
    try:
        try:
            owner.set_attn_implementation("eager")
        except (ValueError, RuntimeError):  # a model that refuses the switch keeps its own (vmap then says why)
            pass
        yield
    finally:
        for key, config in configs.items():
            config._attn_implementation = before[key]
