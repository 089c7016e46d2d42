"""Inputs of a generic rule's calls that hold no batch, known by their shape on the coverage check's batch.

A generic rule reads the batch dim of each tensor its module is called on from its shape: the first dim, where it
equals the number of inputs. A tensor that every sample shares and whose first dim only happens to equal a later
batch's size was cut as if it held one row per sample, each sample's forward reading another row of it: Funnel's
class-token mask ``(T, S)`` on a batch of ``T`` sequences gave an exact Fisher 1e-3 off, silently, and DeBERTa-v2's
relative position embeddings ``(2k, d)`` on a batch of ``2k`` failed inside the module (a review).

The coverage check keeps, per argument slot of each generic rule's calls (:data:`Slot`), the shapes its tensors had
without a batch dim on the checked batch (:func:`shapes_without_batch`); a tensor that comes in such a slot with the
same shape on a batch of another size did not grow with the batch: it is shared, whatever its first dim
(:func:`without_batch`). A slot that held the batch in some call of the module's is left to its shape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from torch import Tensor

#: Where an argument's tensor sits in a call: its position or keyword, then its indices in nested tuples and lists.
Slot = tuple
#: ``(slot, shape)`` of each tensor found without the batch where its slot never held one.
Shapes = frozenset


def _slots(key: int | str, value: object, dims: object, path: tuple = ()) -> Iterator[tuple[Slot, Tensor, object]]:
    """``(slot, tensor, batch dim)`` of each tensor of an argument (nested in tuples and lists) and its dims."""
    if isinstance(value, (tuple, list)) and isinstance(dims, (tuple, list)):
        for i, (v, d) in enumerate(zip(value, dims)):
            yield from _slots(key, v, d, (*path, i))
    elif isinstance(value, Tensor) and value.dim() > 0:
        yield (key, *path), value, dims


def shapes_without_batch(arguments: Iterable[tuple[int | str, object, object]]) -> Shapes:
    """The ``(slot, shape)`` of the tensors without a batch dim among ``arguments``, ``(position or keyword, value,
    batch dims)`` of every call of one module on the checked batch, leaving out slots that held it in some call."""
    free, batched = set(), set()
    for key, value, dims in arguments:
        for slot, t, d in _slots(key, value, dims):
            if d is None:
                free.add((slot, tuple(t.shape)))
            else:
                batched.add(slot)
    return frozenset((slot, shape) for slot, shape in free if slot not in batched)


def without_batch(key: int | str, value: object, dims: object, shared: Shapes) -> object:
    """``dims`` of the argument ``value`` at ``key`` with None for each tensor whose slot and shape are in
    ``shared``: the shape it had without the batch on the checked batch."""
    if not shared:
        return dims

    def walk(v: object, d: object, path: tuple) -> object:
        if isinstance(v, (tuple, list)) and isinstance(d, (tuple, list)):
            parts = [walk(vi, di, (*path, i)) for i, (vi, di) in enumerate(zip(v, d))]
            return d._make(parts) if hasattr(d, "_make") else type(d)(parts)
        if isinstance(v, Tensor) and d is not None and ((key, *path), tuple(v.shape)) in shared:
            return None
        return d

    return walk(value, dims, ())
