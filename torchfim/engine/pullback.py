"""Output vectors pulled back by autograd to the taps of a recorded forward.

:func:`pull_back` returns ``∂(vᵀo)/∂tap`` for every tap of every recorded call. With ``consumers``
(one vector at a time), the calls named there get their sensitivity handed to a function *during*
the backward, by a hook on their tap, and nothing of it is kept: the pull-back then holds what an
ordinary backward holds, instead of one tensor the size of each tap until it ends (peak memory of
one call: the benchmark ResNet's score diagonal 821 → 645 MB, the transformer's exact diagonal
1124 → 808 MB; the time is unchanged within the noise).

autograd runs only the part of the graph between the output and the tensors it is asked for, so a
consumed tap must still lie on the way to one of them: the taps asked for are the other calls' and
those consumed taps with no other tap below them (found by one walk down the graph).

With ``release`` (the recording's last pull-back), one vector's backward frees the forward's graph
as it goes, and each consumed call drops its inputs and taps once its consumer has run, so the
memory comes back during the backward as in an ordinary one. That matters for time as well as
memory: glibc hands the freed memory of a large forward back to the system, and memory taken again
costs a page fault per 4 KiB. On the benchmark ResNet's score diagonal (128 images, three runs of
15 calls each way) a call took 90-98 k faults kept to the end and 49-65 k released, and 1.58-1.63
times a plain forward and backward against 1.34-1.45.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .modules import Call, Rule

#: A call's sensitivity consumer: gets the tap's gradient ``(B, *tap)`` for the one vector.
Consumer = Callable[[Tensor], None]


def pull_back(output: Tensor, calls: Sequence[Call], v: Tensor, consumers: dict[int, Consumer] | None = None,
              release: bool = False, one_by_one: bool = False) -> list[list[Tensor | None]]:
    """Per call, per tap: ``∂(vᵀo)/∂tap`` as ``(m, B, *tap)``, None where the vectors do not reach it.

    ``v`` is ``(B, m, outputs)``. ``consumers`` (only with ``m == 1``) maps call indices with one tap
    each to a function that receives that tap's gradient as the backward reaches it; those calls
    get ``[None]`` in the result. ``release``: one vector's backward does not keep the graph, and
    consumed calls are released (:meth:`.modules.Call.release`) as their consumers finish; see the
    module docstring. (Several vectors keep it: their batched backward may fail and go again vector
    by vector.) ``one_by_one``: several vectors go back one backward each, not batched
    (:mod:`.vector_batching`).
    """
    consumers = consumers or {}
    taps = [t for call in calls for t in call.taps]
    if not taps:
        return [[None] * len(call.taps) for call in calls]
    if consumers:
        return _consumed(output, calls, v, consumers, release)
    if v.shape[1] == 1:
        grads = torch.autograd.grad(output, taps, v[:, 0], retain_graph=not release, allow_unused=True)
        grads = [None if g is None else g.unsqueeze(0) for g in grads]
    elif one_by_one or torch.is_anomaly_enabled():
        # Anomaly mode reads every gradient's NaN check as a Python bool, which a batched backward cannot do:
        # it would fail, and torch would print that failure as an anomaly of the caller's model.
        grads = _vector_by_vector(output, taps, v)
    else:
        try:
            grads = torch.autograd.grad(output, taps, v.transpose(0, 1).contiguous(),
                                        is_grads_batched=True, retain_graph=True, allow_unused=True)
        except RuntimeError:  # an op without a batching rule: one backward per vector
            grads = _vector_by_vector(output, taps, v)
    return _per_call(calls, grads, set())


def _vector_by_vector(output: Tensor, taps: list[Tensor], v: Tensor) -> list[Tensor | None]:
    """Per tap, ``∂(vⱼᵀo)/∂tap`` stacked over the vectors ``j``: one backward per vector."""
    per_vector = [torch.autograd.grad(output, taps, v[:, j], retain_graph=True, allow_unused=True)
                  for j in range(v.shape[1])]
    return [None if gs[0] is None else torch.stack(gs) for gs in zip(*per_vector)]


def _per_call(calls: Sequence[Call], grads: Sequence[Tensor | None],
              consumed: set[int]) -> list[list[Tensor | None]]:
    """``grads`` (one per tap of the calls not consumed, in order) as a list per call and tap, and ``[None]``
    for consumed calls."""
    out, taken = [], iter(grads)
    for index, call in enumerate(calls):
        if index in consumed:
            out.append([None])
            continue
        out.append([None if g is None else call.batch_first(g, 1) for g in (next(taken) for _ in call.taps)])
    return out


def consumable(calls: Sequence[Call]) -> set[int]:
    """Indices of the calls whose sensitivity a hook can take: one tap, made by an autograd node (a tap
    shared with another call, as a model's output with its last layer's, gets a hook per call)."""
    return {k for k, call in enumerate(calls) if len(call.taps) == 1 and call.taps[0].grad_fn is not None}


def _consumed(output: Tensor, calls: Sequence[Call], v: Tensor, consumers: dict[int, Consumer],
              release: bool) -> list[list[Tensor | None]]:
    if v.shape[1] != 1:
        raise ValueError("sensitivities are handed to consumers one vector at a time")
    kept = [t for k, call in enumerate(calls) if k not in consumers for t in call.taps]
    roots = _without_tap_below([calls[k].taps[0] for k in consumers], {t.grad_fn for call in calls for t in call.taps})
    handles = [calls[k].taps[0].register_hook(_releasing(consumers[k], calls[k]) if release else consumers[k])
               for k in consumers]
    try:
        grads = torch.autograd.grad(output, kept + roots, v[:, 0], retain_graph=not release, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return _per_call(calls, [None if g is None else g.unsqueeze(0) for g in grads[: len(kept)]], set(consumers))


def _releasing(consumer: Consumer, call: Call) -> Consumer:
    """``consumer``, then the call's release: its inputs and taps are not needed again."""

    def consume(g: Tensor) -> None:
        consumer(g)
        call.release()

    return consume


def _without_tap_below(taps: list[Tensor], tap_nodes: set) -> list[Tensor]:
    """The taps from whose node no path down the autograd graph meets another tap's node."""
    below: dict = {}  # node -> whether a tap's node lies strictly below it
    for tap in taps:
        stack = [(tap.grad_fn, False)]
        while stack:
            node, children_done = stack.pop()
            if node in below:
                continue
            children = [f for f, _ in node.next_functions if f is not None]
            if children_done:
                below[node] = any(c in tap_nodes or below[c] for c in children)
            else:
                stack.append((node, True))
                stack.extend((c, False) for c in children if c not in below and c not in tap_nodes)
    roots = {id(t): t for t in taps if not below[t.grad_fn]}  # a tap shared by calls is asked for once
    return list(roots.values())


def handed_to(visit: Callable[[Rule, Call, list], None], rule: Rule, call: Call) -> Consumer:
    """A consumer that gives one vector's tap gradient ``(B, *tap)`` to ``visit`` as the call's sensitivities."""
    return lambda g: visit(rule, call, [call.batch_first(g).unsqueeze(0)])

