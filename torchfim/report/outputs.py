"""How the report reads a model's outputs: one vector per input, or one per position (a language
model's tokens), with an optional mask of the observed positions and the class dimension.

With positions, every number of the report follows the library's normalisation: the Fisher of one
input is the sum over its observed positions of ``Jₜᵀ Λₜ Jₜ``, the mean is over inputs, and the
estimators draw one label per position. :attr:`OutputLayout.observed` (the mean number of observed
positions per input) turns it into a per-token mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .._words import counted
from ..errors import TorchfimError
from ..families.positions import is_position_mask
from .data import Data
from .wording import option, said

__all__ = ["OutputLayout", "classes_last_note", "labelled_of", "mask_of", "observed_per_input", "unobserved_inputs_note",
           "unmasked_padding_note"]


@dataclass(frozen=True)
class OutputLayout:
    """``positions``: the output's position shape, ``()`` for one output vector per input; ``mask``:
    the key of the dict inputs that marks observed positions (None: all observed); ``class_dim``: ``-1``
    (classes last) or ``1`` (``(batch, C, *positions)``); ``observed``: observed positions per input,
    averaged over the inputs (1 without positions)."""

    positions: tuple[int, ...] = ()
    mask: str | None = None
    class_dim: int = -1
    observed: float = 1.0
    #: What the reader should know about the positions (padding counted for want of ``--mask``), or None.
    note: str | None = None

    def options(self, family) -> dict:
        """The keyword arguments of every library call of the report: family, mask and class dim."""
        return {"family": family, "mask": self.mask, "class_dim": self.class_dim}

    def to_json(self) -> dict:
        """The ``outputs`` entry of report.json."""
        return {"positions": list(self.positions), "mask": self.mask, "class_dim": self.class_dim,
                "observed_positions_per_input": self.observed, "note": self.note}


def mask_of(data: Data, key: str | None, positions: tuple[int, ...]) -> Tensor | None:
    """The observed positions ``(n, L)`` named by ``key`` (None without a key); errors name the fix."""
    if key is None:
        return None
    named = option("mask", key)
    if not positions:
        raise TorchfimError(
            f"{named}: the model's outputs have no positions (one output vector per input), so "
            f"there is nothing to mask; drop {option('mask')}"
        )
    if not isinstance(data.inputs, dict):
        raise TorchfimError(
            f"{named} names an entry of a dict of inputs, but the data's inputs are one tensor; "
            f"{said('make --data return', 'pass')} a dict, e.g. {{'input_ids': ids, '{key}': mask}}"
        )
    if key not in data.inputs:
        raise TorchfimError(
            f"{named}: the data has no entry {key!r} (it has {', '.join(map(repr, data.inputs))}); "
            f"pass the key of the padding mask, e.g. {option('mask', 'attention_mask')}"
        )
    m = data.inputs[key]
    want = (data.n, *positions)
    if not is_position_mask(m) or tuple(m.shape) != want:
        got = type(m).__name__ if not isinstance(m, Tensor) else f"shape {tuple(m.shape)}" \
            if tuple(m.shape) != want else f"{m.dtype} values other than 0 and 1"
        raise TorchfimError(
            f"{named}: the mask must hold one 0/1 (or bool) per input and output position, shape "
            f"{want}, got {got}; pass the padding mask of the tokens the outputs are at"
        )
    return m.bool().reshape(data.n, -1)


def labelled_of(model, data: Data, family, positions: tuple[int, ...]) -> Tensor | None:
    """``(n, positions)`` bool: the positions the class targets score, False where they hold -100 (a dict's
    ``labels`` aligned as the model's loss aligns them: a causal language model's shifted, its last position
    unscored; a tensor's targets as they are); None where every position is scored or the targets do not choose
    positions, as the library reads them (:meth:`torchfim.engine.view.ModelView.family_for`, given the labels
    by :meth:`.Data.given`)."""
    from ..engine.labels import ModelLabels, labelled_positions

    if data.targets is None or getattr(family, "name", "") != "categorical":
        return None
    targets = ModelLabels(model).aligned(data.targets) if isinstance(data.inputs, dict) else data.targets
    labelled = labelled_positions(targets, data.n, positions)
    return None if labelled is None else labelled.reshape(data.n, -1)


def observed_per_input(keep: Tensor | None, positions: tuple[int, ...], n: int) -> float:
    """Mean observed positions per input: the count of ``keep`` (the mask and the labelled positions) over
    ``n``, or all positions."""
    if keep is None:
        return float(math.prod(positions))
    return float(keep.sum()) / n


def unobserved_inputs_note(observed: Tensor | None, n: int) -> str | None:
    """The report's note on inputs with no observed position (masked or labelled -100 everywhere), which every
    mean over inputs counts with a Fisher of 0; None where there is none. (The library warns of them per
    mini-batch; the report says it once, of all its inputs.)"""
    if observed is None or not observed.shape[1]:
        return None
    empty = int((~observed.reshape(n, -1).any(1)).sum())
    if not empty:
        return None
    return (f"{empty} of the {counted(n, 'input')} {'has' if empty == 1 else 'have'} no observed position (masked, "
            "or every target -100): each counts in every mean over inputs with a Fisher of 0 (docs/math.md §5.5); "
            "drop them from the data if they should not count")


def unmasked_padding_note(data: Data, positions: tuple[int, ...], labelled: Tensor | None = None) -> str | None:
    """A note when the dict inputs carry an ``attention_mask`` over the output positions with padding in
    it, but no mask was given: the padded positions then count as observed, those ``labelled`` leaves out
    (label -100) apart."""
    m = data.inputs.get("attention_mask") if isinstance(data.inputs, dict) and positions else None
    if not isinstance(m, Tensor) or tuple(m.shape) != (data.n, *positions):
        return None
    padding = (m == 0).reshape(data.n, -1)
    padded = int((padding if labelled is None else padding & labelled.to(padding.device)).sum())
    if not padded:
        return None
    return (f"the data's attention_mask marks {counted(padded, 'padded position')}, counted here as observed; pass "
            f"{option('mask', 'attention_mask')} to leave them out")


def classes_last_note(shape: tuple[int, ...]) -> str | None:
    """A note when the class dim (``--class-dim``, ``class_dim``) was not given and the outputs have two or more
    position dims, where torch's convention (``F.cross_entropy``, convolutions) puts the classes in dim 1: they are
    read last here."""
    if len(shape) < 4:
        return None
    return (f"the outputs (batch, {', '.join(map(str, shape[1:]))}) were read with the classes last, {shape[-1]} "
            f"classes at {'×'.join(map(str, shape[1:-1]))} positions; pass {option('class_dim', 1)} for a "
            f"segmentation model's (batch, C, H, W) logits, or {option('class_dim', -1)} to say the classes are last")
