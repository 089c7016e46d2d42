"""Spectral norm's power iteration, paused while torchfim computes.

Spectral norm divides a weight by ``σ = uᵀ W v``, with ``u, v`` buffers that every forward in training
mode first moves by ``n_power_iterations`` steps of the power method, in place, and then holds constant
(no gradient flows through them). Two forwards of one computation would then see two weights: the
Fisher's forwards and the finite-difference penalty's two passes must see one. Paused, a forward uses
the stored ``u, v`` as a forward in eval mode does, and writes nothing.

Both spellings are covered: the parametrization ``torch.nn.utils.parametrizations.spectral_norm`` (a
module) and the forward pre-hook of the older ``torch.nn.utils.spectral_norm``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm

__all__ = ["pause_power_iterations", "paused_power_iterations"]


def pause_power_iterations(tree: nn.Module) -> None:
    """Pause the power iterations of ``tree`` for good: for the engine's private copy of a model.

    The parametrization modules are the copy's own; the older spelling's hook objects are shared with the
    user's modules, so the copy's registries get paused copies of them.
    """
    for module in tree.modules():
        if isinstance(module, _SpectralNorm):
            module.n_power_iterations = 0
        hooks = module._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, SpectralNorm):
                paused = copy.copy(hook)
                paused.n_power_iterations = 0
                hooks[key] = paused


@contextmanager
def paused_power_iterations(model: nn.Module) -> Iterator[None]:
    """Within the block, the forwards of ``model`` (the user's own) move no ``u, v``; restored after."""
    owners = []
    for module in model.modules():
        if isinstance(module, _SpectralNorm):
            owners.append(module)
        if module._forward_pre_hooks:
            owners += [h for h in module._forward_pre_hooks.values() if isinstance(h, SpectralNorm)]
    counts = [o.n_power_iterations for o in owners]
    for owner in owners:
        owner.n_power_iterations = 0
    try:
        yield
    finally:
        for owner, count in zip(owners, counts):
            owner.n_power_iterations = count
