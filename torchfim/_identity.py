"""The identity matrix in a tensor's dtype, on any torch the package takes."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["identity_like"]


def identity_like(n: int, like: Tensor) -> Tensor:
    """The ``n × n`` identity in ``like``'s dtype, on its device.

    Built in float32 and cast for any other dtype (torch 2.2 has no bfloat16 ``eye`` on CPU); the cast of 0 and 1
    is exact.

    Example:
        >>> identity_like(2, torch.zeros(1, dtype=torch.bfloat16))
        tensor([[1., 0.],
                [0., 1.]], dtype=torch.bfloat16)
    """
    if like.dtype in (torch.float32, torch.float64):
        return torch.eye(n, dtype=like.dtype, device=like.device)
    return torch.eye(n, dtype=torch.float32, device=like.device).to(like.dtype)
