"""The Fisher penalty's family over outputs as the model returns them, position dimensions included.

A model may return ``(B, *pos, C)``: a language model's ``(B, T, V)`` logits, say. As in
:func:`torchfim.fisher`, each position is then an independent observation of the base family given
the input (:class:`~torchfim.families.Positions`): the penalty draws one label per position, and the
NLL of an input is the sum over its observed positions, averaged over the inputs, so
``g = ∇_θ (1/B) Σᵢ Σₜ −log p(ŷᵢₜ|xᵢ)``. A per-token mean instead divides ``g`` by the number of
positions ``T``, that is ``α`` by ``T²`` for the batch gradient's ``α‖g‖²`` (and by ``T`` for the
trace's ``α·Tr``). Outputs ``(B, C)`` go to the base family unchanged, or, with a ``(B,)`` mask, to
:class:`~torchfim.families.Positions` of one position per input (an input marked False observes nothing).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from .._words import a_or_an, counted
from ..engine.labels import IGNORE_INDEX, PADDING_COUNTED, counted_padding, unread_targets_note
from ..errors import TorchfimError, output_hint, tensor_fields, warn_user
from ..families import Family, Positions
from ..families.positions import is_position_mask

__all__ = ["PositionOutputs"]


class PositionOutputs:
    """``base`` on outputs ``(B, C)``, and :class:`~torchfim.families.Positions` of ``base`` on outputs
    ``(B, *pos, C)`` (flattened to ``(B, L·C)``), with the position mask of the call in progress.

    It answers what the penalty asks of a family (``check_output``, ``sample``, ``nll``,
    ``log_prob``), each on the outputs as the model returns them.
    """

    def __init__(self, base: Family) -> None:
        self.base = base
        self.name = base.name
        self.mask: Tensor | None = None  # (rows, *pos) bool for the call in progress (None: every position)
        self.from_labels = False  # whether the mask is the labels' alone (-100 left out), not the caller's
        self.padding: Tensor | None = None  # the call's attention_mask where no mask was given (see masked)
        self.labelled: Tensor | None = None  # (rows, ...) bool of the call's class labels, False at -100 (see masked)
        self._padding_named = False  # whether padding counted as observed was warned of (once per penalty)
        self._unread_named = False  # whether labels that do not fit the outputs were warned of (once per penalty)

    def __repr__(self) -> str:
        return repr(self.base)

    @contextmanager
    def masked(self, mask: Tensor | None, rows: int, labelled: Tensor | None = None,
               padding: Tensor | None = None) -> Iterator[None]:
        """Within the block, positions where ``mask[:rows]`` is False are not observed, nor, for class labels,
        those where ``labelled[:rows]`` is False (a label -100, :meth:`.model_io.ModelIO.labelled`), where its
        shape is that of the mask, or of the outputs' positions when there is no mask. ``padding``: the batch's
        ``attention_mask`` where no mask was given, whose padding counted as observed is warned of once, as
        :func:`torchfim.fisher` does."""
        self.padding = None if padding is None else padding[:rows]
        mask = None if mask is None else mask[:rows]
        labelled = None if labelled is None or self.base.name != "categorical" else labelled[:rows]
        self.from_labels = mask is None and labelled is not None
        if labelled is not None and (mask is None or mask.shape == labelled.shape):
            mask = labelled if mask is None else mask & labelled.to(mask.device)
        self.mask, self.labelled = mask, labelled
        try:
            yield
        finally:
            self.mask, self.from_labels, self.padding, self.labelled = None, False, None, None

    def log_prob_of_one(self, out: Tensor, y: Tensor, mask_row: Tensor | None) -> Tensor:
        """``log p(y|x)`` of one input's outputs ``out`` ``(1, ...)``, summed over the positions that
        ``mask_row`` (its row of the call's mask, or None) marks observed: for ``vmap`` over inputs."""
        whole = self.mask, self.padding
        self.mask, self.padding = None if mask_row is None else mask_row.unsqueeze(0), None  # checked on the batch
        try:
            return self.log_prob(out, y).sum()
        finally:
            self.mask, self.padding = whole

    def _family(self, o: Tensor) -> tuple[Family, Tensor]:
        if not isinstance(o, Tensor):
            raise TorchfimError(
                f"the model returned {a_or_an(type(o).__name__)}{tensor_fields(o)}, but FisherPenalty needs its outputs as one tensor of "
                f"the family's natural parameters; pass output= a function that picks it (e.g. {output_hint(o)})"
            )
        mask = self.mask
        if self.from_labels and tuple(mask.shape[1:]) != tuple(o.shape[1:-1] if o.dim() > 2 else ()):
            mask = None  # labels of another shape than the outputs' positions (an output= of other positions)
        if o.dim() <= 2:
            if mask is None:
                return self.base, o
            if mask.dim() > 1:
                raise TorchfimError(
                    f"mask= of shape {tuple(mask.shape)} marks positions, but the model's outputs {tuple(o.shape)} "
                    "have none (they would be (batch, *positions, C)); pass a (batch,) mask or drop mask="
                )
            mask = mask.reshape(-1, 1)  # one position per input, as fisher() reads a (batch,) mask
            return Positions(self.base, 1, mask.to(o.device)), o.reshape(o.shape[0], -1)
        if mask is not None and mask.device != o.device:
            mask = mask.to(o.device)
        if self.padding is not None and not self._padding_named:
            # once per call: the family is asked for several times per call (check, draws, log-likelihoods)
            padding, self.padding = self.padding, None
            count = counted_padding(padding.to(o.device), tuple(o.shape[:-1]), mask)
            if count:
                self._padding_named = True
                warn_user(PADDING_COUNTED.format(positions=counted(count, "padding position")))
        return Positions(self.base, tuple(o.shape[1:-1]), mask), o.reshape(o.shape[0], -1)

    def check_output(self, o: Tensor) -> None:
        family, flat = self._family(o)
        family.check_output(flat)
        self._name_unread(o)

    def _name_unread(self, o: Tensor) -> None:
        """Warn, once per penalty, where the call's class labels do not fit the outputs ``o`` of its rows (an
        ``output=`` of other positions, ``out.logits[:, :-1]``): their -100s are then not read and every position
        counts, as :func:`torchfim.fisher` and the monitor warn."""
        if self.labelled is None or self._unread_named:
            return
        labels = torch.where(self.labelled, 0, IGNORE_INDEX)  # the labels' -100s where they lie: all the note reads
        note = unread_targets_note(labels, tuple(o.shape), -1, True)  # classes last, as the penalty reads them
        if note is not None:
            self._unread_named = True
            warn_user(note)

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        family, flat = self._family(o)
        return family.sample(flat, k, generator)

    def nll(self, o: Tensor, y: Tensor) -> Tensor:
        family, flat = self._family(o)
        return family.nll(flat, y)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        family, flat = self._family(o)
        return family.log_prob(flat, y)


def check_mask(mask: object, size: int) -> Tensor:
    """``mask`` as a bool tensor with one row per input (``size`` of them); refuses anything else.

    A ``(batch,)`` mask is one position per input, for outputs without position dims, as in
    :func:`torchfim.fisher`: an input marked False observes nothing (its NLL is 0) and still counts in the
    mean over inputs.
    """
    if not is_position_mask(mask) or mask.dim() < 1 or mask.shape[0] != size:
        shape = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        fractions = isinstance(mask, Tensor) and not mask.is_complex() and not is_position_mask(mask)
        raise TorchfimError(
            f"mask must be a bool tensor (batch, *positions) (or 0/1 numbers), True where a position is observed, "
            f"with one row per input ({size}), got {shape}" + (" holding values other than 0 and 1" if fractions else "")
        )
    return mask.bool()
