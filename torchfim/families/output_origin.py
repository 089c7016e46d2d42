"""The operation that made a model's outputs, read off their autograd graph.

A family reads the outputs as its natural parameters; a model that ends in the inverse link instead (a
sigmoid's probabilities for Bernoulli logits, an exponential's rates for Poisson log-rates) gives the
Fisher of another model, with no error anywhere. Where the outputs carry a graph (the engine's recorded
forward, the penalty's), :func:`last_operation` names the operation behind them, looking through
operations that only move or copy values (views, reshapes, permutes, clones, casts, indexing) or bound them
(clamps), and where the family says so constants added (a positive rate plus 1e-6 is a positive rate), so a family
can warn about one it would misread. Outputs without a graph (torch.func's forward) say nothing.
"""

from __future__ import annotations

from torch import Tensor

#: Autograd nodes that only move or copy values (the outputs' flattening, a cast, a padding mask's rows).
_PASS_THROUGH = frozenset({
    "AliasBackward0", "CloneBackward0", "ExpandBackward0", "IndexBackward0", "PermuteBackward0",
    "ReshapeAliasBackward0", "SelectBackward0", "SliceBackward0", "SqueezeBackward0", "SqueezeBackward1",
    "SqueezeBackward2", "ToCopyBackward0", "TransposeBackward0", "TransposeBackward1", "UnsafeViewBackward0",
    "UnsqueezeBackward0", "ViewBackward0",
})


#: Nodes that bound values without making new ones (``exp(x).clamp(max=1e4)`` is still the exponential's).
_CLAMPS = frozenset({"ClampBackward0", "ClampBackward1", "ClampMinBackward0", "ClampMaxBackward0"})
#: Nodes that add or subtract a constant (``softplus(x) + 1e-6`` is still a positive rate, but ``2σ(x) − 1`` is no
#: longer a probability): looked through only where a caller says so.
_SHIFTS = frozenset({"AddBackward0", "SubBackward0"})


def last_operation(o: Tensor, through_shifts: bool = False) -> str | None:
    """The name of the autograd node that computed the values of ``o`` (e.g. ``"SigmoidBackward0"``), looking through
    clamps, and with ``through_shifts`` through constants added or subtracted; None when ``o`` has no graph or
    its values come from several nodes."""
    node = _computing(o.grad_fn, through_shifts)
    return None if node is None else node.name()


def half_operations(o: Tensor, through_shifts: bool = False) -> tuple[str | None, str | None] | None:
    """For outputs made by joining two parts along the last dim (``torch.cat([first, second], -1)``, the
    layout of two-part families, or ``torch.stack([first, second], -1)``, read as one pair per position), the
    last operations of the two parts (None for a part without a graph; ``through_shifts`` as in
    :func:`last_operation`); None for outputs made otherwise."""
    node = _computing(o.grad_fn, through_shifts)
    if node is None or node.name() not in ("CatBackward0", "StackBackward0"):
        return None
    dim = int(node._saved_dim)
    dim = dim - 2**64 if dim >= 2**63 else dim  # autograd keeps the dim as an unsigned 64-bit number
    parts = [part for part, _ in node.next_functions]
    if len(parts) != 2 or dim not in (-1, _joined_dims(node, o) - 1):
        return None
    first, second = (_computing(part, through_shifts) for part in parts)
    return (None if first is None else first.name()), (None if second is None else second.name())


def _joined_dims(node: object, o: Tensor) -> int:
    """The number of dims of the tensor ``node`` made (from autograd's private metadata where it has it)."""
    try:
        return len(node._input_metadata[0].shape)
    except (AttributeError, IndexError, TypeError):
        return o.dim() if node is o.grad_fn else 0


def _computing(node: object, through_shifts: bool = False) -> object:
    """The first node from ``node`` back that is not a pass-through one, a clamp or (``through_shifts``) a shift by a
    constant (None where the values branch: a shift by a tensor that requires grad has two inputs)."""
    passed = _PASS_THROUGH | _CLAMPS | (_SHIFTS if through_shifts else frozenset())
    while node is not None and node.name() in passed:
        inputs = [n for n, _ in node.next_functions if n is not None]
        if len(inputs) != 1:
            return None
        node = inputs[0]
    return node
