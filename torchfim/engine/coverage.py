"""Why a parameter failed the per-module backend's coverage check, and the warning that says so.

The check (:meth:`.per_module.PerModuleBackend._verify`) compares, on the first batch, the per-sample
gradients the rules sum to with autograd's batch gradient, and moves every parameter whose sums miss
it to the generic rule of a module above, checking again (and moving on up) until every sum adds up. The
result stays exact; the warning tells the user what was moved, where to, and the likely cause of the
first move, which the recorded calls of the parameter's module show:

* the module's forward is set on the instance and computes something else than its class's forward,
  which the module's rule follows (a rule never replaces such a forward while the engine records);
* the module returns several outputs computed one from another inside its forward, and more than one
  is used downstream: its rule is handed each output's whole sensitivity, so the paths from the earlier
  output through the later one are counted twice (a block returning its hidden state and its output);
* otherwise, the parameter is used outside its module's forward (tied output weights through
  ``F.linear(h, embedding.weight)``): that use has no rule.

(Calls whose outputs do not carry the batch, such as a lookup shared by every sample, are moved
before the check, silently: nothing is wrong with the model there.)
"""

from __future__ import annotations

from torch import Tensor

from .modules import Call, Rule

#: The likely causes, each with its fix, in the order the warning lists them.
CAUSES = {
    "instance": "their module's forward is set on the instance (module.forward = ...) and computes something "
                "other than its class's forward, which the module's rule follows: nothing to fix, or patch the "
                "class, or compute the change in the module above",
    "dependent": "their module returns outputs computed one from another, more than one of them used downstream "
                 "(its rule would count the paths through the later ones twice): return only the outputs "
                 "used, or compute the later ones in the module above",
    "outside": "they are used outside their module's forward, e.g. F.linear(h, embedding.weight) for tied output "
               "weights: use them through a module instead (an nn.Linear whose .weight is the same Parameter) so "
               "that every use has a rule",
}
#: Autograd nodes walked per output when looking for another output of the same call below it.
_WALK_LIMIT = 20_000


def cause_of(index: int, calls: list[tuple[Rule, Call]]) -> str:
    """The likely cause (a key of :data:`CAUSES`) for the parameter ``index`` of θ, from the recorded calls."""
    own = [call for rule, call in calls if index in rule.params.values()]
    if any("forward" in call.module.__dict__ for call in own):
        return "instance"
    return "dependent" if any(_dependent(call.taps) for call in own) else "outside"


def moved_message(where: dict[str, str], causes: dict[str, str]) -> str:
    """The coverage check's warning: the parameters moved (name → module path), and their causes."""
    moves = "; ".join(f"{name} → {path or 'the whole model'}" for name, path in where.items())
    reasons = "; ".join(
        f"{', '.join(n for n in where if causes[n] == key)}: {text}"
        for key, text in CAUSES.items() if key in causes.values()
    )
    return (
        f"torchfim: the module rules' per-sample gradients of {len(where)} parameter(s) do not add up to "
        f"autograd's gradient, so they go to the generic rule of the module above ({moves}); the result "
        f"stays exact but is slower. Likely cause — {reasons}"
    )


def _dependent(taps: list[Tensor]) -> bool:
    """Whether one of the call's outputs was computed from another: a walk down the autograd graph from
    each output meets another output's node (bounded by :data:`_WALK_LIMIT` nodes per output)."""
    nodes = {t.grad_fn for t in taps if t.grad_fn is not None}
    if len(nodes) < 2:
        return False
    for start in nodes:
        seen, stack = {start}, [start]
        while stack and len(seen) < _WALK_LIMIT:
            for below, _ in stack.pop().next_functions:
                if below is None or below in seen:
                    continue
                if below in nodes:
                    return True
                seen.add(below)
                stack.append(below)
    return False
