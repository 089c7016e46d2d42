"""State a module keeps in its attributes, as a call found it, for a generic rule that runs the call again.

Some modules read a tensor attribute that their parent sets before the call, and write it back when they
return: a recurrence's initial state (the real-gated linear recurrent unit of Hugging Face's
RecurrentGemma, ``self.recurrent_states``). A generic rule runs the module again after the whole forward,
when the attribute holds what the last call left (the final state). :func:`attribute_state` takes the
tensor- and None-valued attributes as the call found them; :func:`attributes_set` puts them back while the
rule runs the call again (each sample its own rows, where a tensor has the batch in its first dim) and
restores what was there afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

#: The key of :attr:`.base.Call.cache` under which a generic rule keeps a call's attribute state.
KEY = "attribute_state"


def attribute_state(module: nn.Module) -> dict[str, Tensor | None]:
    """The module's own attributes (not its parameters, buffers or sub-modules, which torch keeps apart)
    that hold a tensor or None, as they are now."""
    return {k: v for k, v in vars(module).items() if not k.startswith("_") and (v is None or isinstance(v, Tensor))}


def state_to_keep(module: nn.Module, state: dict[str, Tensor | None]) -> dict[str, Tensor | None] | None:
    """``state`` (taken before a call) where the call may need it again: it holds a tensor, or the call
    changed one of its attributes (set a tensor where it found None); detached. None where neither."""
    now = vars(module)
    if not any(isinstance(v, Tensor) or now.get(k) is not v for k, v in state.items()):
        return None
    return {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in state.items()}


@contextmanager
def attributes_set(module: nn.Module, values: dict[str, object]) -> Iterator[None]:
    """Within the block, the module's attributes ``values``; afterwards what they held before the block."""
    before = {k: vars(module).get(k) for k in values}
    vars(module).update(values)
    try:
        yield
    finally:
        vars(module).update(before)
