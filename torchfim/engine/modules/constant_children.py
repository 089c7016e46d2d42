"""Sub-module calls a generic rule need not run again: those whose outputs do not depend on its parameters.

A generic rule differentiates its module's forward again (``torch.func`` over the recorded inputs).
Of that forward, a call of a direct sub-module whose output does not depend on the rule's parameters
(the layers before a layer scale ``γ ⊙ h``, a patch embedding beside a class token) is a constant of the
differentiation: its recorded output. Running it again costs a forward and a backward of that
sub-module per group of vectors, which for a block with a layer scale is the whole block.

While the engine records, :func:`reached_parameters` finds which of the rule's parameters the call's
outputs depend on at all (a mask token or a spectrogram mask that only training uses: the others get zero
products without a run); :func:`capturing_children` keeps the output of each direct sub-module call in
call order; :func:`constant_outputs` keeps those whose autograd history, walked back to the module's
inputs, reaches none of the rule's parameters; while the rule differentiates, :func:`replaying` returns
the kept outputs in place of those calls (and runs the others), after checking that the forward makes the
same calls in the same order (:class:`ReplayMismatch` otherwise: the rule then runs everything again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .base import forwards_replaced

#: The key of :attr:`.base.Call.cache` under which a generic rule keeps a call's sub-module calls.
KEY = "constant_children"

#: Autograd nodes one walk may visit before it gives up and calls the output dependent (a history that
#: leaves the module through a tensor other than its inputs may reach back through the whole model).
_WALK_LIMIT = 4096

#: The key of :attr:`.base.Call.cache` under which a generic rule keeps the names of the parameters the
#: call's outputs depend on, where that is not all of them.
REACHED = "reached_parameters"

#: One sub-module call: the sub-module, its output where constant (else None), and its tensors' versions.
Entry = tuple[nn.Module, object, list[int]]


class ReplayMismatch(RuntimeError):
    """The forward called its sub-modules otherwise than when it was recorded."""


@contextmanager
def capturing_children(module: nn.Module) -> Iterator[list[tuple[nn.Module, object, list[int]]]]:
    """The calls of ``module``'s direct sub-modules made within the block, as ``(child, output, versions)``
    (the version counters of the output's tensors as the call returned them: the forward may modify them
    in place later)."""
    captured: list[tuple[nn.Module, object, list[int]]] = []

    def make(child: nn.Module, forward):
        def forward_and_keep(*args: object, **kwargs: object) -> object:
            out = forward(*args, **kwargs)
            captured.append((child, out, [t._version for t in parts_of(out) or ()]))
            return out

        return forward_and_keep

    with forwards_replaced(module.children(), lambda child: make(child, child.forward)):
        yield captured


def parts_of(out: object) -> list[Tensor] | None:
    """The tensors of a sub-module's output that can be kept: a tensor, or a tuple or list of tensors and
    Nones (an attention module's ``(context, weights)``); None for any other output."""
    if isinstance(out, Tensor):
        return [out]
    if type(out) not in (tuple, list) or not all(item is None or isinstance(item, Tensor) for item in out):
        return None
    parts = [item for item in out if item is not None]
    return parts or None


def with_parts(out: object, parts: list[Tensor]) -> object:
    """``out`` with its tensors (:func:`parts_of`'s) replaced by ``parts``, in order."""
    if isinstance(out, Tensor):
        return parts[0]
    rest = iter(parts)
    return type(out)(None if item is None else next(rest) for item in out)


def reached_parameters(outputs: list[Tensor], params: dict[str, Tensor], inputs: list[Tensor]
                       ) -> tuple[frozenset[str] | None, set]:
    """The names of ``params`` that the autograd history of ``outputs`` reaches without passing through
    ``inputs`` (None past :data:`_WALK_LIMIT` nodes: all of them, as far as anyone knows), and the nodes the
    walk visited where it reached none (free of the parameters: :func:`constant_outputs` need not walk
    them again)."""
    targets = {id(p): n for n, p in params.items()}
    stop = {t.grad_fn for t in inputs if t.grad_fn is not None}
    found: set[str] = set()
    seen, queue = set(), deque(t.grad_fn for t in outputs)
    while queue and len(found) < len(targets):
        node = queue.popleft()
        if node is None or node in stop or node in seen:
            continue
        seen.add(node)
        if len(seen) > _WALK_LIMIT:
            return None, set()
        name = targets.get(id(getattr(node, "variable", None)))
        if name is not None:
            found.add(name)
        queue.extend(fn for fn, _ in node.next_functions)
    found.update(n for t in outputs for i, n in targets.items() if id(t) == i)  # a parameter returned as it is
    return frozenset(found), (seen if not found else set())


def constant_outputs(captured: list[tuple[nn.Module, object, list[int]]], params: list[Tensor],
                     inputs: list[Tensor], has_batch, clean: set | None = None) -> list[Entry]:
    """Per captured call, its output (detached) where its tensors (:func:`parts_of`) all have a batch dim
    (``has_batch(child, t)``) and an autograd history that reaches none of ``params`` without passing
    through ``inputs`` (the module's inputs), else None; with their versions when the call returned
    (:func:`unchanged`). ``clean``: autograd nodes known to reach none of ``params``. A tensor without history (a frozen table's lookup, the same for every sample
    whatever its leading dim says) or a parameter itself is not kept: it is run again rather than cut by
    sample. (A trainable one that every sample shares has no batch, so the coverage check gives its
    parameters to a rule above, the module's own at the nearest.)"""
    targets = {id(p) for p in params}
    stop = {t.grad_fn for t in inputs if t.grad_fn is not None}
    clean = set(clean or ())  # nodes a finished walk found free of the parameters
    entries: list[Entry] = []
    for child, out, versions in captured:
        parts = parts_of(out)
        constant = parts is not None and all(has_batch(child, t) and id(t) not in targets
                                             and t.grad_fn is not None
                                             and not _reaches(t.grad_fn, targets, stop, clean) for t in parts)
        entries.append((child, with_parts(out, [t.detach() for t in parts]), versions) if constant
                       else (child, None, []))
    return entries


def _reaches(root, targets: set[int], stop: set, clean: set) -> bool:
    """Whether the autograd graph below ``root`` reaches a leaf in ``targets`` (ids) before ``stop``;
    the nodes of a walk that finds none join ``clean``."""
    seen, queue = set(), deque([root])
    while queue:  # breadth first: a parameter used at every step of a loop is found near the output
        node = queue.popleft()
        if node is None or node in stop or node in clean or node in seen:
            continue
        seen.add(node)
        if len(seen) > _WALK_LIMIT or id(getattr(node, "variable", None)) in targets:
            return True
        queue.extend(fn for fn, _ in node.next_functions)
    clean.update(seen)
    return False


def unchanged(entries: list[Entry]) -> bool:
    """Whether no kept output was modified in place since its call returned (in the forward or after)."""
    return all(out is None or [t._version for t in parts_of(out)] == versions for _, out, versions in entries)


@contextmanager
def replaying(module: nn.Module, entries: list[tuple[nn.Module, object]]) -> Iterator[None]:
    """Within the block, the calls of ``module``'s direct sub-modules return the outputs of ``entries``
    in order (running the sub-module where it is None); :class:`ReplayMismatch` where a call is not the
    next entry's sub-module, or where the block ends before the last."""
    position = [0]

    def make(child: nn.Module, forward):
        def replay(*args: object, **kwargs: object) -> object:
            k = position[0]
            if k >= len(entries) or entries[k][0] is not child:
                raise ReplayMismatch(f"call {k} of a sub-module is not the recorded one")
            position[0] = k + 1
            out = entries[k][1]
            return forward(*args, **kwargs) if out is None else out

        return replay

    with forwards_replaced(module.children(), lambda child: make(child, child.forward)):
        yield
    if position[0] != len(entries):
        raise ReplayMismatch(f"{position[0]} of the {len(entries)} recorded sub-module calls were made")
