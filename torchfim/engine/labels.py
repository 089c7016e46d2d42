"""How a model's own loss reads the ``labels`` of a dict mini-batch, so that torchfim reads them the same way.

* A causal language model (Hugging Face's ``ForCausalLMLoss``) pairs its logits at position t with
  ``labels[t + 1]``: the labels are shifted, and the last position, which predicts a token past the
  sequence, gets none (:func:`next_token_labels`).
* An encoder-decoder (T5, BART, ``config.is_encoder_decoder``) pairs its logits with the labels as they
  are, and builds its decoder's inputs from them where a batch brings none
  (``prepare_decoder_input_ids_from_labels``). torchfim takes the labels out of the batch (the model
  would compute its loss), so it builds those decoder inputs itself: without them T5 refused the batch
  and BART decoded from its shifted source instead, a Fisher of another function.
* A class label ``IGNORE_INDEX`` (-100) scores nothing in the loss, so that position observes nothing,
  for every estimator (:func:`labelled_positions`): the exact Fisher and the empirical one cover the
  same positions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .._words import counted
from ..errors import TorchfimError
from ..families.positions import positions_fit
from .private_tree import unwrapped

__all__ = ["ENCODER_MASK", "IGNORE_INDEX", "PADDING_COUNTED", "PROBLEM_FAMILIES", "ModelLabels", "check_mask_key", "counted_padding", "ignored_labels", "is_encoder_decoder",
           "labelled_positions", "unread_targets_note", "next_token_labels", "predicts_next_token"]

#: A class label that marks a position without a target (PyTorch's ``ignore_index``).
IGNORE_INDEX = -100
#: Warned where a dict batch's ``attention_mask`` marks padding that counts as observed (:func:`counted_padding`).
PADDING_COUNTED = (
    "torchfim: the batch's attention_mask marks {positions}, counted as observed since mask= is not set; pass "
    "mask='attention_mask' to leave padding out (or give those positions the label -100)"
)


#: Why an encoder-decoder's ``attention_mask`` is no mask of its outputs.
ENCODER_MASK = (
    "mask='attention_mask' on an encoder-decoder: a batch's attention_mask marks the encoder's (source) padding, "
    "while the outputs are the decoder's positions, so it would drop target tokens the loss scores and keep padding it "
    "drops; pass mask='decoder_attention_mask' where the batch has one, or leave mask out: labels of -100 (as "
    "tokenizers and collators pad them) already leave the decoder's padding out"
)


def check_mask_key(model: nn.Module, mask: object) -> None:
    """Refuse ``mask="attention_mask"`` on an encoder-decoder (:data:`ENCODER_MASK`): its source's padding, not its
    outputs'."""
    if mask == "attention_mask" and is_encoder_decoder(model):
        raise TorchfimError(ENCODER_MASK)


def is_encoder_decoder(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face encoder-decoder (``config.is_encoder_decoder``): its outputs' positions
    are the decoder's, and a batch's ``attention_mask`` is the encoder's."""
    return getattr(getattr(unwrapped(model), "config", None), "is_encoder_decoder", False) is True


#: The family of a Hugging Face classifier's own loss, by its ``config.problem_type``.
PROBLEM_FAMILIES = {"single_label_classification": "categorical", "multi_label_classification": "bernoulli",
                    "regression": "gaussian"}


def problem_type_note(model: nn.Module, family: str) -> str | None:
    """Where ``model`` is a Hugging Face classifier whose ``config.problem_type`` names a loss of another family than
    ``family``: what to say (its loss, the family that matches it); else None."""
    kind = getattr(getattr(unwrapped(model), "config", None), "problem_type", None)
    matching = PROBLEM_FAMILIES.get(kind) if isinstance(kind, str) else None
    if matching is None or matching == family:
        return None
    loss = {"bernoulli": "BCEWithLogitsLoss, one Bernoulli per label", "gaussian": "MSELoss, a unit Gaussian",
            "categorical": "CrossEntropyLoss"}[matching]
    how = " with output=lambda out: out.logits.unsqueeze(-1) (one position per label)" if matching == "bernoulli" else ""
    return (f"torchfim: the model's config.problem_type is {kind!r}: its own loss is {loss}, the {matching!r} "
            f"family, while family={family!r} computes the Fisher of another model; pass family={matching!r}{how}")


def predicts_next_token(model: nn.Module) -> bool:
    """Whether ``model`` is a Hugging Face causal language model: its own loss (``loss_function``,
    ``ForCausalLMLoss``) shifts a batch's ``labels`` so that the logits at position t predict
    ``labels[t + 1]``. transformers falls back to that loss for any model whose loss type it does not
    know, encoder-decoders among them, whose own loss takes the labels unshifted: those are not."""
    if is_encoder_decoder(model):
        return False
    try:
        loss = getattr(unwrapped(model), "loss_function", None)
    except Exception:  # noqa: BLE001 - a property of the user's model that fails: not such a model
        return False
    return getattr(loss, "__name__", "") == "ForCausalLMLoss"


def decoder_inputs_from_labels(model: nn.Module) -> Callable[[Tensor], Tensor] | None:
    """The model's own way from ``labels`` to its decoder's inputs (an encoder-decoder's
    ``prepare_decoder_input_ids_from_labels``), or None for a model without one."""
    if not is_encoder_decoder(model):
        return None
    prepare = getattr(unwrapped(model), "prepare_decoder_input_ids_from_labels", None)
    if not callable(prepare):
        return None
    return lambda labels: prepare(labels=labels)


def next_token_labels(labels: object) -> object:
    """A causal language model's ``labels`` ``(B, T)`` aligned with its logits as its loss aligns them
    (Hugging Face's ``ForCausalLMLoss``): ``labels[:, 1:]`` with ``IGNORE_INDEX`` at the last position,
    which predicts a token past the sequence. Anything else is returned as it is."""
    if not isinstance(labels, Tensor) or labels.dim() < 2 or labels.is_floating_point():
        return labels
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def ignored_labels(targets: object) -> Tensor | None:
    """Where integer class labels ``targets`` hold ``IGNORE_INDEX`` (bool, their shape); None where none does, or
    where ``targets`` are not integer class labels."""
    if not isinstance(targets, Tensor) or targets.is_floating_point() or targets.is_complex():
        return None
    if targets.dtype == torch.bool:
        return None
    ignored = targets == IGNORE_INDEX
    return ignored if bool(ignored.any()) else None


def labelled_positions(targets: object, size: int, positions: tuple[int, ...]) -> Tensor | None:
    """``(size, *positions)`` bool, False where the class labels ``targets`` hold ``IGNORE_INDEX``; None where
    none does, or where ``targets`` are not integer class labels of a shape that fits (:func:`unread_targets_note`
    says so)."""
    if not _fits(targets, size, positions):
        return None
    ignored = ignored_labels(targets)
    return None if ignored is None else ~ignored.reshape(size, *positions)


def _integer(targets: object) -> bool:
    return isinstance(targets, Tensor) and not (targets.is_floating_point() or targets.is_complex()
                                                or targets.dtype == torch.bool)


def _fits(targets: object, size: int, positions: tuple[int, ...]) -> bool:
    """Whether ``targets`` are integer labels of one class per observation: any shape ``(size, ...)`` with one
    entry per position (``(size,)`` or ``(size, 1)`` without positions), as the families' ``check_targets`` read
    them."""
    if not _integer(targets):
        return False
    shape = tuple(targets.shape)
    return shape[:1] == (size,) and positions_fit(shape[1:], positions)


def _one_hot(targets: Tensor, shape: tuple[int, ...]) -> bool:
    """Whether integer ``targets`` of the outputs' ``shape`` (classes last) are one-hot rows: 0s and 1s, one 1 each."""
    if tuple(targets.shape) != shape or targets.numel() == 0:
        return False
    return bool(((targets == 0) | (targets == 1)).all()) and bool((targets.sum(-1) == 1).all())


def unread_targets_note(targets: object, shape: tuple[int, ...], class_dim: int, said: bool) -> str | None:
    """What to say of integer class labels ``targets`` that do not fit outputs of ``shape`` (as the model returns
    them, the classes in ``class_dim``, -1 or 1; ``said``: given by the caller): their -100s, which every estimator
    reads, cannot be placed, so they are not read (a warning; the empirical estimator refuses them itself). Where the
    class dim was not said and the labels fit the outputs read with classes in dim 1 (``F.cross_entropy``'s
    ``(N, C, T)``), the outputs are likely misread: refused, naming ``class_dim=1`` (a porting trial's tagger was 0.41
    off its peer's GGN, silently); labels with another number of rows than the inputs are refused. None where they
    fit, are one-hot rows (no -100 among them: as float one-hot labels, only the empirical estimator reads them, and
    it refuses them naming argmax), or are not integer labels."""
    first = class_dim == 1 and len(shape) > 2
    positions, classes = (tuple(shape[2:]), shape[1]) if first else (tuple(shape[1:-1]), shape[-1])
    size = shape[0]
    if not _integer(targets) or _fits(targets, size, positions):
        return None
    got, dims = tuple(targets.shape), f"{counted(len(positions), 'position dim')} {positions} of " if positions else ""
    if targets.dim() > 0 and got[0] != size:  # no reading of the outputs fits: the targets are another batch's
        per_input = (size, *positions)
        flattened = (f"; labels flattened over the positions go back with labels.reshape{per_input}"
                     if positions and targets.numel() == math.prod(per_input) else "")
        raise TorchfimError(f"class-label targets of shape {got} have {got[0]} rows for a mini-batch of {size} "
                            f"inputs (outputs {tuple(shape)}): pass one row of labels per input, in the inputs' order, "
                            f"of shape {per_input}{flattened}")
    read = f"{dims}{classes} classes"
    if _one_hot(targets, (size, *positions, classes)):  # no -100 to place; the empirical estimator names argmax
        return None
    if not said and len(shape) >= 3 and _fits(targets, size, tuple(shape[2:])):
        raise TorchfimError(
            f"class-label targets of shape {got} do not fit outputs {tuple(shape)} read as {read} (the classes "
            "last, the default), but fit them with the classes in dim 1, as F.cross_entropy takes (N, C, T) "
            "logits: pass class_dim=1"
        )
    return (f"torchfim: class-label targets of shape {got} do not fit outputs {tuple(shape)} read as {read} (one "
            f"label per {'position' if positions else 'input'}, {(size, *positions)}), so their -100s are not read "
            "and every position counts: a CTC transcript, labels at another resolution than the logits, or outputs "
            "mapped to fewer positions; pass mask= for the positions to leave out, or labels that fit (a dict "
            "batch's 'labels' key is its targets)")


def counted_padding(padding: object, shape: tuple[int, ...], observed: Tensor | None) -> int:
    """How many positions a dict batch's ``attention_mask`` (``padding``) marks as padding while they count as
    observed (``observed``: bool of the outputs' ``(batch, *positions)`` ``shape`` or flattened, None: all), for
    outputs of that shape; 0 where the mask is of another shape. The caller leaves out an encoder-decoder, whose
    mask is its source's (:func:`is_encoder_decoder`)."""
    if not isinstance(padding, Tensor) or tuple(padding.shape) != tuple(shape):
        return 0
    counted = (padding == 0).reshape(shape[0], -1)
    if observed is not None:
        counted = counted & observed.to(counted.device).reshape(shape[0], -1)
    return int(counted.sum())


class ModelLabels:
    """How ``model``'s own loss reads a dict batch's labels; asked of the model once, when a batch first
    brings labels (Hugging Face logs which loss it resolved)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._asked: tuple[bool, Callable[[Tensor], Tensor] | None] | None = None

    def _answers(self) -> tuple[bool, Callable[[Tensor], Tensor] | None]:
        if self._asked is None:
            self._asked = (predicts_next_token(self.model), decoder_inputs_from_labels(self.model))
        return self._asked

    def next_token(self) -> bool:
        """Whether the model's loss pairs its outputs at position t with ``labels[t + 1]``."""
        return self._answers()[0]

    def aligned(self, labels: object) -> object:
        """``labels`` one per output position, as the model's loss pairs them."""
        return next_token_labels(labels) if self.next_token() else labels

    def decoder_inputs(self, labels: Tensor) -> Tensor | None:
        """The decoder inputs the model builds from ``labels`` where a batch brings none (None: it builds none)."""
        build = self._answers()[1]
        return None if build is None else build(labels)
