"""Layers whose weight a forward pre-hook computes from trainable originals before each call.

Three hooks of torch do so, each setting a plain tensor attribute that the layer's forward uses:

* pruning (``torch.nn.utils.prune``): ``W = W_orig ⊙ M`` with the mask ``M`` a buffer, so
  ``∂/∂W_orig = G ⊙ M``;
* the older weight norm (``torch.nn.utils.weight_norm``): ``W = g ⊙ v/‖v‖``, the map of
  :func:`.parametrized.weight_norm_grads`;
* the older spectral norm (``torch.nn.utils.spectral_norm``): ``W = W_orig/σ`` with ``σ = uᵀ W_orig v`` and
  ``u, v`` held constant, so ``∂/∂W_orig = G/σ − (⟨G, W_orig⟩/σ²) ∂σ/∂W_orig``.

``G = ∂(vᵀo)/∂W`` is the layer's own per-sample gradient (its rule's), so the layer keeps its rule
(:class:`.parametrized.ParametrizedRule`, on probation like any derivation) instead of the generic rule's
second run of the layer: the originals' rows follow by one linear map each.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.utils.prune import BasePruningMethod
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from .base import Rule
from .parametrized import Factors, ParametrizedRule, PullBack, weight_norm_grads

__all__ = ["hooked_names", "hooked_rule"]


def hooked_names(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """The tensors of ``module`` that one of torch's pre-hooks computes, with their originals' names."""
    names: dict[str, tuple[str, ...]] = {}
    for hook in module._forward_pre_hooks.values():
        name = _derived_name(hook)
        if name is not None:
            names[name] = (name + "_g", name + "_v") if isinstance(hook, WeightNorm) else (name + "_orig",)
    return names


def hooked_rule(module: nn.Module, params: dict[str, int], base_rule) -> Rule | None:
    """The layer's rule ``base_rule(module, params, own)`` over the tensors it uses, with the hooked tensors'
    gradients taken back to their originals; None where the layer has no rule, or a parameter is neither
    one of its own nor an original."""
    derived = hooked_names(module)
    trained = [name for name, originals in derived.items() if any(o in params for o in originals)]
    placeholders = {name: -1 - k for k, name in enumerate(trained)}
    originals = {o for name in trained for o in derived[name]}
    base_params = {**{n: i for n, i in params.items() if n not in originals}, **placeholders}
    base = base_rule(module, base_params, set(dict(module.named_parameters(recurse=False))) | set(derived))
    if base is None:
        return None
    hooks = [h for h in module._forward_pre_hooks.values() if _derived_name(h) in placeholders]
    masks = {h._tensor_name: _mask(module, h._tensor_name) for h in hooks if isinstance(h, BasePruningMethod)}
    return ParametrizedRule(base, params, placeholders, {_derived_name(h): _pull_back(module, h) for h in hooks},
                            masks)


def _derived_name(hook: object) -> str | None:
    """The name of the tensor that ``hook`` computes (None for another hook)."""
    if isinstance(hook, BasePruningMethod):
        return hook._tensor_name
    return hook.name if isinstance(hook, (WeightNorm, SpectralNorm)) else None


def _mask(module: nn.Module, name: str) -> Factors:
    """A pruned tensor's elementwise factor: its mask, by the name of its original."""
    return lambda: {name + "_orig": getattr(module, name + "_mask")}


def _pull_back(module: nn.Module, hook: object) -> PullBack:
    """The map from the rows of ``G`` ``(R, numel)`` to those of the hook's originals."""
    if isinstance(hook, BasePruningMethod):
        factors = _mask(module, hook._tensor_name)
        return lambda rows: {n: rows.reshape(-1, *c.shape) * c for n, c in factors().items()}
    if isinstance(hook, WeightNorm):

        def normed(rows: Tensor) -> dict[str, Tensor]:
            scale, direction = (getattr(module, hook.name + s).detach() for s in ("_g", "_v"))
            g, v = weight_norm_grads(rows.reshape(-1, *direction.shape), scale, direction, hook.dim)
            return {hook.name + "_g": g, hook.name + "_v": v}

        return normed

    def spectral(rows: Tensor) -> dict[str, Tensor]:
        original = getattr(module, hook.name + "_orig").detach().requires_grad_()
        u, v = getattr(module, hook.name + "_u"), getattr(module, hook.name + "_v")
        with torch.enable_grad():
            sigma = torch.dot(u, hook.reshape_weight_to_matrix(original) @ v)
            (d_sigma,) = torch.autograd.grad(sigma, original)
        sigma, original = sigma.detach(), original.detach()
        rows = rows.reshape(-1, *original.shape)
        along = (rows * original).flatten(1).sum(1).reshape(-1, *[1] * original.dim())  # ⟨G, W_orig⟩ per row
        return {hook.name + "_orig": rows / sigma - (along / sigma**2) * d_sigma}

    return spectral
