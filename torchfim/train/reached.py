"""Which parameters a tensor's autograd graph reaches: those the model's forward used to compute it.

The Fisher penalty gives a gradient only to the parameters the model's graph reaches, as plain training does: a
parameter the forward never uses keeps ``.grad`` None (optimisers such as Adam skip it, where a zero gradient would
move its moments and apply weight decay), and ``DistributedDataParallel(find_unused_parameters=True)``, which marks
such a parameter ready after the forward, refuses a gradient for it ("marked as ready twice"). Autograd says so
where the penalty differentiates the graph (None from ``torch.autograd.grad(..., allow_unused=True)``); torch.func's
per-input gradients do not (zeros for an unused input), so :func:`reached_parameters` walks the outputs' graph, as
DDP does, to the parameters' gradient accumulators.
"""

from __future__ import annotations

from torch import Tensor


def reached_parameters(outputs: object, params: list[Tensor]) -> list[bool]:
    """For each of ``params`` (leaves), whether ``outputs``' autograd graph reaches it."""
    if not isinstance(outputs, Tensor) or not outputs.requires_grad:
        return [False] * len(params)
    if outputs.grad_fn is None:  # a parameter itself
        return [p is outputs for p in params]
    found, seen, todo = set(), set(), [outputs.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad's leaf
        if variable is not None:
            found.add(id(variable))
        todo.extend(following for following, _ in node.next_functions)
    return [id(p) in found for p in params]
