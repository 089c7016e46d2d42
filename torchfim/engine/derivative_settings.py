"""Settings of a model's modules that torchfim overrides while it computes, so that its forwards are of
one function and its gradients dense.

* Spectral norm divides a weight by ``σ = uᵀ W v``, with ``u, v`` buffers that every forward in training
  mode first moves by ``n_power_iterations`` steps of the power method, in place, and then holds constant
  (no gradient flows through them). Two forwards of one computation would then see two weights: the
  Fisher's forwards and the finite-difference penalty's two passes must see one. Paused, a forward uses
  the stored ``u, v`` as a forward in eval mode does, and writes nothing. Both spellings are covered: the
  parametrization ``torch.nn.utils.parametrizations.spectral_norm`` (a module) and the forward pre-hook
  of the older ``torch.nn.utils.spectral_norm``.
* Embeddings with ``sparse=True`` store their gradient as a sparse tensor, for a sparse optimiser; the
  Fisher's products, norms and per-sample (``vmap``) gradients need it dense. The values are the same.
* Embeddings with ``scale_grad_by_freq=True`` rescale their gradient by the ids' counts in the batch, a
  training heuristic; the Fisher is of derivatives, so the engine's copy turns it off.
* Embeddings with ``max_norm`` rescale the rows they look up in place on every forward: refused.
* A module's backward hooks (``register_full_backward_hook``, ``register_full_backward_pre_hook``) change or
  watch the gradients that pass through it; they are no part of the function whose Fisher is taken (a
  hook that rescales or reverses gradients would rescale it; a logging hook would see every output vector
  the engine pulls back), and torch.func cannot transform them. The copy has none; forward hooks, which
  are part of the function, stay. Nor has it the hooks on parameters (``weight.register_hook``, a mask
  that trains a few embedding rows): each such parameter is an alias of the user's without them (the
  same storage and version counter, so every in-place update is seen).
* Parameters and buffers made under ``torch.inference_mode()`` (a model built or loaded for evaluation) can
  be neither saved for backward nor versioned; the copy holds copies of them, made with it (they can change
  only inside inference mode, unseen: a copy kept for long, as the monitor's, is made afresh for each use).

:func:`for_derivatives` sets all of this for good on the engine's private copy of a model; the penalty,
which runs the user's own model, overrides what it needs for the length of a block
(:func:`dense_gradients`, :func:`paused_power_iterations`, :func:`kept_hook_weights`, :func:`per_input_passes`,
:func:`quiet_backward_hooks`)
and restores it.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.parametrizations import _SpectralNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from ..errors import TorchfimError
from .kept_buffers import private_buffers
from .private_tree import SLOTS_LOCK

__all__ = ["dense_gradients", "emptied", "for_derivatives", "has_module_backward_hooks", "kept_hook_weights",
           "made_in_inference_mode", "paused_power_iterations", "per_input_passes", "quiet_backward_hooks"]

_EMBEDDINGS = (nn.Embedding, nn.EmbeddingBag)


def for_derivatives(tree: nn.Module) -> None:
    """Set ``tree`` (the engine's private copy of a model) up for derivatives: power iterations paused,
    embeddings' gradients dense and unscaled, no backward hooks on modules or parameters; embeddings with
    ``max_norm`` refused.

    The parametrization modules and embeddings are the copy's own; the older spectral norm's hook objects
    are shared with the user's modules, so the copy's registries get paused copies of them.
    """
    aliases: dict[int, nn.Parameter] = {}
    for name, module in tree.named_modules():
        if isinstance(module, _SpectralNorm):
            module.n_power_iterations = 0
        hooks = module._forward_pre_hooks
        for key, hook in list(hooks.items()):
            if isinstance(hook, SpectralNorm):
                paused = copy.copy(hook)
                paused.n_power_iterations = 0
                hooks[key] = paused
        _derivable_tensors(module, aliases)
        if module._backward_hooks or module._backward_pre_hooks:  # the copy's own registries
            module._backward_hooks.clear()
            module._backward_pre_hooks.clear()
            module._is_full_backward_hook = None
        if isinstance(module, _EMBEDDINGS):
            _refuse_max_norm(name, module)
            module.scale_grad_by_freq = module.sparse = False


def made_in_inference_mode(t: Tensor) -> bool:
    """Whether ``t`` was made under ``torch.inference_mode()`` (a lazy module's parameter without a shape yet is
    not: torch refuses the question, and the engine refuses the parameter with its fix)."""
    return not is_lazy(t) and t.is_inference()


def _derivable_tensors(module: nn.Module, aliases: dict[int, nn.Parameter]) -> None:
    """In ``module`` (of the copy), each parameter with tensor hooks replaced by its alias without them, and
    each parameter or buffer made in inference mode by a copy (one per tensor, in all its slots: tying stays)."""
    for key, p in module._parameters.items():  # the copy's own registry
        if p is not None and (p._backward_hooks or made_in_inference_mode(p)):
            if id(p) not in aliases:
                value = p.detach().clone() if made_in_inference_mode(p) else p.detach()
                aliases[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
            module._parameters[key] = aliases[id(p)]
    for key, b in module._buffers.items():
        if b is not None and made_in_inference_mode(b):
            if id(b) not in aliases:
                aliases[id(b)] = b.clone()
            module._buffers[key] = aliases[id(b)]


@contextmanager
def paused_power_iterations(model: nn.Module) -> Iterator[None]:
    """Within the block, the forwards of ``model`` (the user's own) move no ``u, v``; restored after."""
    owners = []
    for module in model.modules():
        if isinstance(module, _SpectralNorm):
            owners.append(module)
        if module._forward_pre_hooks:
            owners += [h for h in module._forward_pre_hooks.values() if isinstance(h, SpectralNorm)]
    with _overridden(owners, "n_power_iterations", 0):
        yield


@contextmanager
def kept_hook_weights(model: nn.Module) -> Iterator[None]:
    """Within the block, forwards of ``model`` (the user's own) leave it the weight that the older reparametrising
    forward pre-hooks (``torch.nn.utils.spectral_norm``, ``torch.nn.utils.weight_norm``) compute at every forward
    and set as a plain attribute of their module: what it held before, after. A forward inside would leave there a
    weight of shifted parameters (the finite-difference pass) or a torch.func wrapper (the per-input passes), which
    ``torch.save(model)`` refuses."""
    kept = [(module.__dict__, hook.name, module.__dict__.get(hook.name)) for module in model.modules()
            for hook in module._forward_pre_hooks.values() if isinstance(hook, (SpectralNorm, WeightNorm))]
    try:
        yield
    finally:
        for attributes, name, weight in kept:
            attributes[name] = weight


@contextmanager
def per_input_passes(model: nn.Module) -> Iterator[None]:
    """Within the block, the forwards of ``model`` (the user's own) move no ``u, v`` (:func:`paused_power_iterations`)
    and write no buffer: each buffer slot holds a clone (:func:`.kept_buffers.private_buffers`), so a running
    statistic that a forward in training mode updates in place (``InstanceNorm(track_running_stats=True)``) moves once
    per penalty call, by the call's forward over the batch, not once more per input by the passes of its per-input
    gradients. Restored after, with the weights the older reparametrising hooks set (:func:`kept_hook_weights`).
    Their parameters (``functional_call``) and buffers are swapped in the slots of ``model`` itself, so no other
    thread copies it meanwhile (:data:`.private_tree.SLOTS_LOCK`)."""
    with SLOTS_LOCK, paused_power_iterations(model), kept_hook_weights(model), private_buffers(model, {}):
        yield


@contextmanager
def dense_gradients(model: nn.Module) -> Iterator[None]:
    """Within the block, the embeddings of ``model`` (the user's own) with ``sparse=True`` give dense
    gradients (the same values); restored after."""
    with _overridden([m for m in model.modules() if isinstance(m, _EMBEDDINGS) and m.sparse], "sparse", False):
        yield


def has_module_backward_hooks(model: nn.Module) -> bool:
    """Whether a module of ``model`` has backward hooks (``register_full_backward_hook`` or its pre-hook, its
    own or torch's global ones)."""
    from torch.nn.modules import module

    if module._global_backward_hooks or module._global_backward_pre_hooks:
        return True
    return any(m._backward_hooks or m._backward_pre_hooks for m in model.modules())


@contextmanager
def quiet_backward_hooks(model: nn.Module, params: list[nn.Parameter], modules: bool = True) -> Iterator[None]:
    """Within the block, the tensor hooks of ``params`` (``weight.register_hook``) do not run, and with ``modules``
    neither do the backward hooks of ``model``'s modules, whose forwards in the block then put none in the graph;
    all restored after. The penalty's own differentiations are of the model's function, as the engine's
    copy without hooks is: the hooks act on the gradient of the loss the caller back-propagates.

    Both registries are emptied and refilled in place: autograd reads a parameter's hook dict when it runs.
    """
    registries = [p._backward_hooks for p in params if p._backward_hooks]
    if modules:
        registries += [r for m in model.modules() for r in (m._backward_hooks, m._backward_pre_hooks) if r]
    refill = emptied(registries)
    try:
        yield
    finally:
        refill()


def emptied(registries: list[dict]) -> Callable[[], None]:
    """Empty each hook registry in place (whoever holds it, autograd or a module, then finds it empty); return
    how to put its entries back (after any added meanwhile)."""
    held = [list(r.items()) for r in registries]
    for registry in registries:
        registry.clear()

    def refill() -> None:
        for registry, items in zip(registries, held):
            registry.update(items)

    return refill


@contextmanager
def _overridden(owners: list[object], attribute: str, value: object) -> Iterator[None]:
    """Within the block, ``owner.attribute = value`` for each of ``owners``; what each held before, after."""
    before = [getattr(o, attribute) for o in owners]
    for owner in owners:
        setattr(owner, attribute, value)
    try:
        yield
    finally:
        for owner, held in zip(owners, before):
            setattr(owner, attribute, held)


def _refuse_max_norm(name: str, module: nn.Module) -> None:
    """Refuse an embedding whose forward rescales rows of its trainable weight in place (``max_norm``:
    torchfim's check that no training step changes the weights during a computation would refuse each of
    its forwards, blaming another thread)."""
    if module.max_norm is not None and module.weight.requires_grad:
        raise TorchfimError(
            f"module {name or type(module).__name__!r} is an embedding with max_norm={module.max_norm}, "
            "whose every forward rescales the rows it looks up in place, so its weight changes during "
            "the computation; rescale them once yourself (with torch.no_grad(): "
            "torch.embedding_renorm_(emb.weight, ids, max_norm, norm_type) for the ids you use) and set "
            "emb.max_norm = None while torchfim computes"
        )
