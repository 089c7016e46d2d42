"""The Fisher penalty's family over outputs as the model returns them, position dimensions included.

A model may return ``(B, *pos, C)``: a language model's ``(B, T, V)`` logits, say. As in
:func:`torchfim.fisher`, each position is then an independent observation of the base family given
the input (:class:`~torchfim.families.Positions`): the penalty draws one label per position, and the
NLL of an input is the sum over its observed positions, averaged over the inputs, so
``g = ∇_θ (1/B) Σᵢ Σₜ −log p(ŷᵢₜ|xᵢ)``. A per-token mean instead divides ``g`` by the number of
positions ``T``, that is ``α`` by ``T²`` for the batch gradient's ``α‖g‖²`` (and by ``T`` for the
trace's ``α·Tr``). Outputs ``(B, C)`` go to the base family unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from ..errors import TorchfimError, tensor_fields
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

    def __repr__(self) -> str:
        return repr(self.base)

    @contextmanager
    def masked(self, mask: Tensor | None, rows: int) -> Iterator[None]:
        """Within the block, positions where ``mask[:rows]`` is False are not observed."""
        self.mask = None if mask is None else mask[:rows]
        try:
            yield
        finally:
            self.mask = None

    def log_prob_of_one(self, out: Tensor, y: Tensor, mask_row: Tensor | None) -> Tensor:
        """``log p(y|x)`` of one input's outputs ``out`` ``(1, ...)``, summed over the positions that
        ``mask_row`` (its row of the call's mask, or None) marks observed: for ``vmap`` over inputs."""
        whole, self.mask = self.mask, None if mask_row is None else mask_row.unsqueeze(0)
        try:
            return self.log_prob(out, y).sum()
        finally:
            self.mask = whole

    def _family(self, o: Tensor) -> tuple[Family, Tensor]:
        if not isinstance(o, Tensor):
            raise TorchfimError(
                f"the model returned a {type(o).__name__}{tensor_fields(o)}, but FisherPenalty needs its outputs as one tensor of "
                "the family's natural parameters; pass output= a function that picks it (e.g. output=lambda out: "
                "out[0])"
            )
        if o.dim() <= 2:
            if self.mask is not None:
                raise TorchfimError(
                    f"mask= marks observed positions, but the model's outputs {tuple(o.shape)} have none "
                    "(they would be (batch, *positions, C)); drop mask="
                )
            return self.base, o
        mask = self.mask
        if mask is not None and mask.device != o.device:
            mask = mask.to(o.device)
        return Positions(self.base, tuple(o.shape[1:-1]), mask), o.reshape(o.shape[0], -1)

    def check_output(self, o: Tensor) -> None:
        family, flat = self._family(o)
        family.check_output(flat)

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
    """``mask`` as a bool tensor with one row per input (``size`` of them); refuses anything else."""
    if is_position_mask(mask) and mask.dim() == 1 and mask.shape[0] == size:
        raise TorchfimError(
            f"mask has one value per input, shape {tuple(mask.shape)}: a mask drops positions within an input "
            "(padding tokens), shape (batch, *positions), for outputs (batch, *positions, ...); to leave out whole "
            "inputs, pass only the inputs to keep, e.g. x[mask]"
        )
    if not is_position_mask(mask) or mask.dim() < 2 or mask.shape[0] != size:
        shape = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        fractions = isinstance(mask, Tensor) and mask.is_floating_point() and not is_position_mask(mask)
        raise TorchfimError(
            f"mask must be a bool tensor (batch, *positions) (or 0/1 numbers), True where a position is observed, "
            f"with one row per input ({size}), got {shape}" + (" holding values other than 0 and 1" if fractions else "")
        )
    return mask.bool()
