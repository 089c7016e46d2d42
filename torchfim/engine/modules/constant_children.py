"""Sub-module calls a generic rule need not run again: those whose outputs do not depend on its parameters.

A generic rule differentiates its module's forward again (``torch.func`` over the recorded inputs).
Of that forward, a call of a direct sub-module whose output does not depend on the rule's parameters
(the layers before a layer scale ``γ ⊙ h``, a patch embedding beside a class token) is a constant of the
differentiation: its recorded output. Running it again costs a forward and a backward of that
sub-module per group of vectors, which for a block with a layer scale is the whole block.

While the engine records, :func:`capturing_children` keeps the output of each direct sub-module call in
call order; :func:`constant_outputs` keeps those whose autograd history, walked back to the module's
inputs, reaches none of the rule's parameters; while the rule differentiates, :func:`replaying` returns
the kept outputs in place of those calls (and runs the others), after checking that the forward makes the
same calls in the same order (:class:`ReplayMismatch` otherwise: the rule then runs everything again).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

#: The key of :attr:`.base.Call.cache` under which a generic rule keeps a call's sub-module calls.
KEY = "constant_children"

#: Autograd nodes one walk may visit before it gives up and calls the output dependent (a history that
#: leaves the module through a tensor other than its inputs may reach back through the whole model).
_WALK_LIMIT = 4096

#: One sub-module call: the sub-module, its output where constant (else None), and that output's version.
Entry = tuple[nn.Module, Tensor | None, int]


class ReplayMismatch(RuntimeError):
    """The forward called its sub-modules otherwise than when it was recorded."""


@contextmanager
def _forwards_replaced(module: nn.Module, make) -> Iterator[None]:
    """Within the block, each direct sub-module of ``module`` runs ``make(child, its forward)`` instead
    (set on the instance, as the engine's recording does; the one it had is put back afterwards)."""
    children = list(module.children())
    saved = [(child, child.__dict__.get("forward")) for child in children]
    for child in children:
        child.__dict__["forward"] = make(child, child.forward)
    try:
        yield
    finally:
        for child, own in saved:
            if own is None:
                del child.__dict__["forward"]
            else:
                child.__dict__["forward"] = own


@contextmanager
def capturing_children(module: nn.Module) -> Iterator[list[tuple[nn.Module, object, int]]]:
    """The calls of ``module``'s direct sub-modules made within the block, as ``(child, output, version)``
    (the output's version counter as the call returned it: the forward may modify it in place later)."""
    captured: list[tuple[nn.Module, object, int]] = []

    def make(child: nn.Module, forward):
        def forward_and_keep(*args: object, **kwargs: object) -> object:
            out = forward(*args, **kwargs)
            captured.append((child, out, out._version if isinstance(out, Tensor) else 0))
            return out

        return forward_and_keep

    with _forwards_replaced(module, make):
        yield captured


def constant_outputs(captured: list[tuple[nn.Module, object, int]], params: list[Tensor], inputs: list[Tensor],
                     has_batch) -> list[Entry]:
    """Per captured call, its output (detached) where it is a tensor with a batch dim (``has_batch(child,
    t)``) whose history reaches none of ``params`` without passing through ``inputs`` (the module's
    inputs), else None; with the version it had when its call returned (:func:`unchanged`)."""
    targets = {id(p) for p in params}
    stop = {t.grad_fn for t in inputs if t.grad_fn is not None}
    clean: set = set()  # nodes a finished walk found free of the parameters
    entries: list[Entry] = []
    for child, out, version in captured:
        constant = (isinstance(out, Tensor) and has_batch(child, out) and id(out) not in targets
                    and not _reaches(out.grad_fn, targets, stop, clean))
        entries.append((child, out.detach(), version) if constant else (child, None, 0))
    return entries


def _reaches(root, targets: set[int], stop: set, clean: set) -> bool:
    """Whether the autograd graph below ``root`` reaches a leaf in ``targets`` (ids) before ``stop``;
    the nodes of a walk that finds none join ``clean``."""
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in stop or node in clean or node in seen:
            continue
        seen.add(node)
        if len(seen) > _WALK_LIMIT or id(getattr(node, "variable", None)) in targets:
            return True
        stack.extend(fn for fn, _ in node.next_functions)
    clean.update(seen)
    return False


def unchanged(entries: list[Entry]) -> bool:
    """Whether no kept output was modified in place since its call returned (in the forward or after)."""
    return all(out is None or out._version == version for _, out, version in entries)


@contextmanager
def replaying(module: nn.Module, entries: list[tuple[nn.Module, Tensor | None]]) -> Iterator[None]:
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

    with _forwards_replaced(module, make):
        yield
    if position[0] != len(entries):
        raise ReplayMismatch(f"{position[0]} of the {len(entries)} recorded sub-module calls were made")
