"""Why a parameter failed the per-module backend's coverage check, and the warning that says so.

The check (:meth:`.per_module.PerModuleBackend._verify`) compares, on the first rows of the first batch,
the per-sample gradients the rules sum to with autograd's gradient of each sample's output alone
(:func:`missed`), and moves every parameter whose gradients miss it to the generic rule of a module
above, checking again (and moving on up) until every one adds up. The
result stays exact; the warning tells the user what was moved, where to, and the likely cause of the
first move, which the recorded calls of the parameter's module show:

* the module's forward is set on the instance and computes something else than its class's forward,
  which the module's rule follows (a rule never replaces such a forward while the engine records);
* the per-sample gradients are wrong but sum to the right gradient: the call's output only looked
  batched, its leading dim happening to equal the number of samples (positions shared by the batch);
* the module returns several outputs in a container the recording cannot rebuild with views of them
  (:func:`.recording.own_outputs`), one computed from another: the paths through the later one count twice;
* otherwise, the parameter is used outside its module's forward (tied output weights through
  ``F.linear(h, embedding.weight)``): that use has no rule.

(Calls whose outputs do not carry the batch, such as a lookup shared by every sample, are moved
before the check, silently: nothing is wrong with the model there. So are, after the check, the calls of
a Linear or LayerNorm recorded with the batch folded into their rows (:attr:`.modules.Call.fold`) whose
rows turn out not to come sample by sample.)
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._words import counted
from .modules import Call, Rule
from .modules.base import rounding_tolerance

#: A generic rule whose torch.func products differ from autograd's, sample by sample.
WRONGLY_BATCHED = (
    "torchfim: torch.func's per-sample gradients of module {!r} ({}) differ from autograd's, sample by sample "
    "(a batching rule of this torch build gives wrong numbers); they are computed one sample at a time, which is "
    "correct but slower"
)
#: Warned once per model (by the per-module backend): modules with trainable parameters whose outputs carry
#: no autograd history.
DETACHED = (
    "torchfim: {modules} ran without autograd (inside torch.no_grad, or on detached inputs), so no output "
    "depends on their parameters through autograd and their Fisher is zero, as their gradients in training are; "
    "run them with autograd, or set requires_grad=False on parameters meant to be frozen"
)

#: The likely causes, each with its fix, in the order the warning lists them.
CAUSES = {
    "instance": "their module's forward is set on the instance (module.forward = ...) and computes something "
                "other than its class's forward, which the module's rule follows: nothing to fix, or patch the "
                "class, or compute the change in the module above",
    "rows": "their module's output has one row per sample but its rows do not feed one sample each (a lookup "
            "of T positions shared by the batch, with T equal to the number of samples): nothing to fix",
    "container": "their module returns several outputs in a container that torchfim cannot rebuild (a tuple "
                 "subclass with a constructor of its own), and one is computed from another, so the paths through "
                 "the later one count twice: return them in a tuple, list or dict",
    "outside": "they are used outside their module's forward, e.g. F.linear(h, embedding.weight) for tied output "
               "weights: use them through a module instead (an nn.Linear whose .weight is the same Parameter) so "
               "that every use has a rule; or the forward differentiates through them itself (torch.autograd.grad "
               "in forward, as a force field's −∂E/∂x): nothing to fix",
    "uncalled": "their module is never called: the forward reads them directly (a graph from torch.export, which "
                "inlines its modules, or F.linear(x, layer.weight)), so no rule of theirs sees a use: call the module, "
                "or nothing to fix",
    "layouts": "their module is called on rows in two layouts in one forward (batch first and sequence first, say), "
               "which read either way where a batch has as many positions as inputs: nothing to fix",
    "global": "they are read through a name outside the model (a hook or function that reads model.layer.weight "
              "from the enclosing scope), which only autograd on the parameters themselves follows, one sample at "
              "a time: read them through the module instead (the hook's module argument, or self)",
}


def cause_of(index: int, calls: list[tuple[Rule, Call]]) -> str:
    """The likely cause (a key of :data:`CAUSES`) for the parameter ``index`` of θ, from the recorded calls."""
    own = [call for rule, call in calls if index in rule.params.values()]
    if not own:
        return "uncalled"
    if any("forward" in call.module.__dict__ for call in own):
        return "instance"
    return "container" if any(call.unviewed for call in own) else "outside"


def moved_message(where: dict[str, str], causes: dict[str, str]) -> str:
    """The coverage check's warning: the parameters moved (name → module path), and their causes."""
    moves = "; ".join(f"{name} → {path or 'the whole model'}" for name, path in where.items())
    reasons = "; ".join(
        f"{', '.join(n for n in where if causes[n] == key)}: {text}"
        for key, text in CAUSES.items() if key in causes.values()
    )
    return (
        f"torchfim: the module rules' per-sample gradients of {counted(len(where), 'parameter')} do not add up to "
        f"autograd's gradient, so they go to the generic rule of the module above ({moves}); the result "
        f"stays exact but is slower. Likely cause — {reasons}"
    )


def missed(output: Tensor, v: Tensor, params: list[nn.Parameter], got: list[Tensor | None],
           floors: Callable[[set[int]], dict[int, float]] | None = None) -> dict[int, bool]:
    """Which ``params`` (positions in the list) have per-sample gradients ``got`` ``(b, size)`` (None: zero)
    of ``vᵢᵀ oᵢ`` that miss autograd's, taken sample by sample for the flat ``output`` ``(b, out)`` and ``v``;
    each with whether their sum over samples is right all the same. Where some miss, ``floors`` of them gives
    each one's size of rounding noise (:func:`rounding_floors`): one whose two gradients both stay within it is
    noise either way, and does not miss.

    Sample by sample rather than summed over the batch: a rule that hands one sample's gradient to
    another (a call whose leading dim only happens to equal the batch) has the right sum.
    """
    rows = []
    for r in range(output.shape[0]):
        only_r = torch.zeros_like(v)
        only_r[r] = v[r]
        rows.append(torch.autograd.grad(output, params, only_r, retain_graph=True, allow_unused=True))
    want = [None if all(g[k] is None for g in rows) else
            torch.stack([torch.zeros_like(p) if g[k] is None else g[k] for g in rows]).reshape(len(rows), -1)
            for k, p in enumerate(params)]
    # One scale for every parameter: a parameter whose true gradient is zero (a key bias under
    # softmax) has only rounding noise, which its own maximum would not cover.
    scale = max((float(w.abs().max()) for w in want if w is not None), default=0.0)
    tol = rounding_tolerance(output.dtype)
    atol = tol * max(scale, 1e-30)
    out, largest = {}, {}
    for k, (w, g) in enumerate(zip(want, got)):
        if w is None and g is None:
            continue
        w = torch.zeros_like(g) if w is None else w
        g = torch.zeros_like(w) if g is None else g.to(w.dtype)
        if not torch.allclose(g, w, rtol=tol, atol=atol):
            out[k] = torch.allclose(g.sum(0), w.sum(0), rtol=tol, atol=atol)
            largest[k] = max(float(w.abs().max()), float(g.abs().max()))
    if out and floors is not None:
        noise = floors(set(out))
        out = {k: summed for k, summed in out.items() if largest[k] > noise.get(k, 0.0)}
    return out


#: Gradients within this many units in the last place of the sizes of the terms they sum are rounding noise.
NOISE_ULPS = 16


def rounding_floors(calls: list[tuple[Rule, Call]], sensitivities: list[list[Tensor | None]],
                    wanted: set[int]) -> dict[int, float]:
    """Per parameter index in ``wanted``: the size of rounding noise in its per-sample gradients, ``NOISE_ULPS·ε``
    times the size of the terms an entry sums, bounded by its module's output sensitivities ``∂(vᵀo)/∂tap`` summed
    over a sample's positions (all dims but the last, the largest feature's and sample's) times its input's largest
    entry (at least 1: a bias's terms are the sensitivities themselves). A gradient that is exactly zero (a key bias
    under softmax) is such noise in both autograd's and a rule's computation: with no other trainable parameter to
    give the check a scale, it missed (a review). Summed over every feature too, the bound let a half-precision
    weight used outside its module pass."""
    floors: dict[int, float] = {}
    for (rule, call), sens in zip(calls, sensitivities):
        held = wanted & set(rule.params.values())
        present = [s for s in sens if s is not None]
        if not held or not present:
            continue
        x = call.args[0] if call.args and isinstance(call.args[0], Tensor) and call.args[0].is_floating_point() else None
        largest_input = max(1.0, float(x.abs().max())) if x is not None and x.numel() else 1.0
        terms = sum(float(_per_feature(s).amax()) for s in present) * largest_input
        floor = NOISE_ULPS * torch.finfo(present[0].dtype).eps * terms
        for i in held:
            floors[i] = max(floors.get(i, 0.0), floor)
    return floors


def nearest_called(model: nn.Module, name: str, moved: tuple[nn.Module, str] | None,
                   called: set[nn.Module]) -> tuple[nn.Module, str]:
    """The closest module of ``model`` above its parameter ``name`` in ``called`` (the modules the forward
    called with outputs carrying the batch), and the parameter's name below it; for a parameter ``moved``
    before (its holder, local name), the closest above that holder. The model at the top."""
    parts = name.split(".")
    modules = dict(model.named_modules())
    top = len(parts) - 2
    if moved is not None:
        top = len(parts) - len(moved[1].split(".")) - 1  # the holder's depth: the name's length less the local's
    for depth in range(top, -1, -1):
        module = modules[".".join(parts[:depth])]
        if module in called or depth == 0:
            return module, ".".join(parts[depth:])
    return model, name


def names_of(model: nn.Module, calls: list[tuple[Rule, Call]]) -> list[str]:
    """Full names in ``model`` of the parameters that the rules of ``calls`` cover."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for rule, _ in calls for n, p in rule.module.named_parameters() if n in rule.params]


def _per_feature(s: Tensor) -> Tensor:
    """Sensitivities ``(m, B, *tap)`` in absolute value summed over the tap's dims but the last: ``(m, B, features)``
    (``(m, B, 1)`` for a tap without dims)."""
    s = s.abs()
    return s.reshape(*s.shape[:2], 1) if s.dim() == 2 else s.flatten(2, -2).sum(2) if s.dim() > 3 else s
