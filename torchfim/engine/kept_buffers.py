"""Buffers left as torchfim found them.

The engine's private copy of a model shares its buffer tensors (:mod:`.private_tree`), so that updates the
user makes (BatchNorm's running statistics in a training step) are read live. A forward that writes a buffer
in place (a call counter, a running average kept in eval mode, a quantisation observer) would then carry
torchfim's own forwards into the user's model: measuring would change what is measured next time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["buffers_kept"]


@contextmanager
def buffers_kept(tree: nn.Module) -> Iterator[None]:
    """Within the block, forwards of ``tree`` may update its buffers; on leaving it, whether by an error or not,
    every buffer slot of ``tree`` holds the tensor it held on entry, with the values it held on entry.

    Each buffer is cloned on entry (buffers are small next to the parameters and to what a Fisher computes);
    only those whose version counter moved are written back, and a slot that a forward reassigned
    (``self.count = self.count + 1`` on the copy's own registry) gets its tensor back. Nothing is written back
    where a parameter was written meanwhile: another writer was at work (the engine refuses such a measurement).
    """
    slots = [(m._buffers, name, b) for m in tree.modules() for name, b in m._buffers.items() if b is not None]
    saved = [(b._version, b.detach().clone()) for _, _, b in slots]
    params = _parameter_versions(tree)
    try:
        yield
    finally:
        # Parameters written meanwhile mean another writer (a training step in another thread, which the engine
        # refuses to measure through): its buffer updates are its own, and writing the old values back would undo them.
        unmoved = _parameter_versions(tree) == params
        for (table, name, held), (version, values) in zip(slots, saved):
            if table.get(name) is not held:
                table[name] = held
            if unmoved and held._version != version:
                with torch.no_grad():  # a buffer written under a differentiated forward keeps no graph
                    held.copy_(values)


def _parameter_versions(tree: nn.Module) -> list[int]:
    return [p._version for p in tree.parameters()]
