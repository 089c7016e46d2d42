"""Buffers of the user's model left as torchfim found them.

The engine's private copy of a model shares its buffer tensors (:mod:`.private_tree`), so that updates the
user makes (BatchNorm's running statistics in a training step) are read live. A forward that writes a buffer
in place (a call counter, a running average kept in eval mode, a quantisation observer) would then carry
torchfim's own forwards into the user's model: measuring would change what is measured next time. So for
the length of a pass the copy holds its own clones of the buffers, taken from their values at its start.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

__all__ = ["private_buffers"]


@contextmanager
def private_buffers(tree: nn.Module, constants: dict[str, Tensor]) -> Iterator[None]:
    """Within the block, every buffer slot of ``tree`` (the engine's copy) and every buffer in ``constants`` (the
    tensors the functional backend passes by name) holds a clone of its tensor: forwards write into the clones,
    never into the user's tensors, which another writer (a training step in another thread) may update meanwhile.
    On leaving it, whether by an error or not, every slot holds its own tensor again.

    A tensor held in several slots gets one clone (tying stays); the clones cost one copy of the buffers per pass,
    small next to the parameters and to what a Fisher computes.
    """
    clones: dict[int, Tensor] = {}

    def clone(t: Tensor) -> Tensor:
        if id(t) not in clones:
            clones[id(t)] = t.detach().clone()
        return clones[id(t)]

    slots = [(m._buffers, name, b) for m in tree.modules() for name, b in m._buffers.items() if b is not None]
    held_ids = {id(b) for _, _, b in slots}
    named = [(name, t) for name, t in constants.items() if id(t) in held_ids]
    try:
        for table, name, held in slots:
            table[name] = clone(held)
        for name, held in named:
            constants[name] = clone(held)
        yield
    finally:
        for table, name, held in slots:
            table[name] = held
        for name, held in named:
            constants[name] = held
