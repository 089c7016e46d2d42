"""The kernel torchfim's passes run ``scaled_dot_product_attention`` on: torch's math kernel.

Its backward has batching rules, so torch.func's ``vmap`` takes it and several output vectors go back through one
recorded forward in one batched backward; the fused CPU kernels go sample by sample, or vector by vector.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch 2.2
    sdpa_kernel = None

__all__ = ["math_attention"]


def math_attention() -> AbstractContextManager[None]:
    """Within the block, ``scaled_dot_product_attention`` runs on torch's math kernel.

    Example:
        >>> import torch
        >>> q = torch.randn(1, 2, 4, 8, requires_grad=True)  # (batch, heads, tokens, dims)
        >>> "Flash" in type(torch.nn.functional.scaled_dot_product_attention(q, q, q).grad_fn).__name__  # fused
        True
        >>> with math_attention():
        ...     out = torch.nn.functional.scaled_dot_product_attention(q, q, q)
        >>> type(out.grad_fn).__name__  # the math kernel's operations
        'UnsafeViewBackward0'
    """
    if sdpa_kernel is None:  # torch 2.2: the CUDA back-end's switch, whose flags its CPU kernels follow too
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False)
    return sdpa_kernel(SDPBackend.MATH)
