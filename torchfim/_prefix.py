"""Names saved under a wrapper's prefix (``module.`` of ``nn.DataParallel`` and ``DistributedDataParallel``,
``_orig_mod.`` of ``torch.compile``, a Lightning module's attribute), read as the names of the bare model, or the
other way round."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

__all__ = ["without_prefix"]

V = TypeVar("V")


def without_prefix(state: dict[str, V], own: Mapping[str, object]) -> tuple[dict[str, V], str]:
    """``state`` without the leading name components that all its keys share, where that makes some of them names
    in ``own`` and none was (else ``state`` as it is, so that a mismatch is reported with the saved names), and
    the prefix removed.

    Example:
        >>> without_prefix({"module.0.weight": 1, "module.0.bias": 2}, {"0.weight": 0, "0.bias": 0})
        ({'0.weight': 1, '0.bias': 2}, 'module.')
    """
    stripped, prefix = state, ""
    while stripped and not any(k in own for k in stripped):
        heads = {k.split(".", 1)[0] for k in stripped}
        if len(heads) != 1 or not all("." in k for k in stripped):
            return state, ""
        stripped, prefix = {k.split(".", 1)[1]: v for k, v in stripped.items()}, prefix + heads.pop() + "."
    return stripped, prefix
