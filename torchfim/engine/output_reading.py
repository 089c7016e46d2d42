"""A model's raw output read as its tensor of outputs, and the checks of the options that say how: ``output=``
(a function of the raw output), ``class_dim`` (where the classes are in outputs with positions), and the batch
rows of what comes back."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ..errors import TorchfimError, tensor_fields, warn_user
from .batch import Batch
from .model_checks import one_dimensional

OutputMap = Callable[[object], Tensor]


def read_logits(raw: object) -> object:
    """A model's raw output as its tensor of outputs: the tensor itself, ``raw["logits"]`` or ``raw.logits``
    (anything else as it is, for the caller to refuse)."""
    if isinstance(raw, Tensor):
        return raw
    if isinstance(raw, dict) and isinstance(raw.get("logits"), Tensor):
        return raw["logits"]
    logits = getattr(raw, "logits", None)
    return logits if isinstance(logits, Tensor) else raw


def mapped_output(output: OutputMap, raw: object) -> object:
    """``output(raw)``; where it fails to find a field the output does not have, an error that names the
    output's type and the tensors it holds."""
    try:
        return output(raw)
    except (TypeError, KeyError, AttributeError, IndexError) as err:
        raise TorchfimError(
            f"the output= function raised {type(err).__name__}: {err}, on the model's output, a "
            f"{type(raw).__name__}{tensor_fields(raw)}; make it return the tensor of outputs"
        ) from err


def as_columns(out: object) -> object:
    """Outputs ``(batch,)``, one number per input (a binary classifier's logits as ``BCEWithLogitsLoss``
    takes them, a regression's means), as the column ``(batch, 1)``; anything else as it is."""
    return out.unsqueeze(-1) if isinstance(out, Tensor) and out.dim() == 1 else out


def check_output_map(output: object) -> None:
    """Refuse an ``output=`` that is neither None nor a function of the model's output."""
    if output is not None and not callable(output):
        raise TorchfimError(f"output must be a function of the model's output, got {type(output).__name__}")


def check_class_dim(class_dim: object) -> int | None:
    """Refuse a ``class_dim`` other than -1 (classes last), 1 (classes in dim 1, as ``F.cross_entropy``
    takes them) or None (not said: last, see :class:`ClassDim`)."""
    if class_dim is None:
        return None
    if isinstance(class_dim, bool) or class_dim not in (-1, 1):
        raise TorchfimError(
            f"class_dim must be -1 (classes last: (batch, *positions, C)) or 1 (classes in dim 1: "
            f"(batch, C, *positions), as F.cross_entropy takes them), got {class_dim!r}"
        )
    return int(class_dim)


CLASSES_LAST = (
    "torchfim: outputs (batch, {shape}) are read with the classes last: {classes} classes at {positions} "
    "positions per input. {kind} (batch, C, {where}), as F.cross_entropy takes them, "
    "have the classes in dim 1: pass class_dim=1; pass class_dim=-1 to say they are last (and silence this)"
)


def _from_convolution(out: Tensor) -> bool:
    """Whether ``out`` is a convolution's output (channels in dim 1), as autograd recorded it."""
    return out.grad_fn is not None and type(out.grad_fn).__name__.startswith("Convolution")


class ClassDim:
    """Where the classes are in outputs with positions: ``-1`` last, ``1`` in dim 1, ``None`` not said.

    Not said reads them last, as language models' ``(batch, tokens, vocabulary)``, but outputs with two or
    more position dims, and a convolution's outputs with one (a Conv1d tagger's ``(batch, C, T)``, seen in the
    autograd record of the outputs as the model returns them: not after a further operation, nor under
    ``backend="functional"``, which records none), are where torch's convention (``cross_entropy``,
    convolutions) puts them in dim 1: there the first outputs seen get a warning that names both choices.
    """

    def __init__(self, class_dim: object) -> None:
        given = check_class_dim(class_dim)
        self.dim = -1 if given is None else given
        #: Whether ``class_dim`` was given.
        self.given = given is not None
        self._unsaid = given is None
        #: Whether the family reads classes (the categorical one); None while not known. Only outputs with
        #: classes are warned of: a Gaussian's or matrix Fisher's (batch, H, W, C) have no class dim to misplace.
        self.categorical: bool | None = None
        #: Whether outputs seen by :meth:`last` came from a convolution (their channels in dim 1).
        self.convolution = False

    def last(self, out: Tensor, check: bool = True) -> Tensor:
        """Outputs ``(B, C, *positions)`` with ``class_dim=1`` as ``(B, *positions, C)``; others as they are.
        ``check=False`` leaves the warning to a later :meth:`check` that knows the family."""
        if self._unsaid and out.dim() == 3:
            self.convolution = self.convolution or _from_convolution(out)
        if check:
            self.check(out.shape)
        return out.movedim(1, -1) if self.dim == 1 and out.dim() > 2 else out

    def check(self, shape: tuple[int, ...], categorical: bool | None = None) -> None:
        """Warn once where the class dim was not said, ``shape`` has two or more position dims (or one, for a
        convolution's outputs) and the family reads classes (``categorical``, else :attr:`categorical`; not known
        counts as reading them)."""
        reads_classes = self.categorical if categorical is None else categorical
        convolution = len(shape) == 3 and self.convolution and shape[1] > 1  # one channel holds no classes
        if self._unsaid and (len(shape) >= 4 or convolution) and reads_classes is not False:
            self._unsaid = False
            kind, where = ("A convolution's outputs", "T") if convolution else ("A segmentation model's logits", "H, W")
            warn_user(CLASSES_LAST.format(shape=", ".join(str(s) for s in shape[1:]), classes=shape[-1],
                                          positions="×".join(str(s) for s in shape[1:-1]), kind=kind, where=where))


def check_batch_rows(out: Tensor, batch: Batch) -> None:
    """Refuse outputs whose first dim is not the batch of ``batch``'s inputs; where an input is 1-D and the outputs
    too, the model read it as one unbatched sample: that is named first, with its fix."""
    size = batch.size
    if out.dim() == 0 or out.shape[0] == size:
        return
    flat = one_dimensional(batch) if out.dim() == 1 else None
    if flat is not None:
        raise TorchfimError(
            f"the model returned outputs of shape {tuple(out.shape)} for 1-D inputs ({flat}): it read them as one "
            f"unbatched sample, while torchfim reads their first dimension as the batch ({size} inputs); pass "
            f"x.unsqueeze(0) for a single input, or x.unsqueeze(1) for {size} inputs of one feature each (else the "
            "model reduces over the batch, .sum(0) or .mean(0): the outputs need one row per input)"
        )
    raise TorchfimError(
        f"the model returned outputs of shape {tuple(out.shape)} for a mini-batch of {size} inputs; their first "
        "dimension must be the batch, one row per input. A reduction over the batch (.sum(0), .mean(0)) or a "
        "layer that read the inputs as one unbatched sample does this: nn.GRU, nn.LSTM and nn.RNN read a 2-D "
        "input as one sequence, so give them (batch, time, features) with batch_first=True; a model that "
        "returns (time, batch, ...) needs output=lambda out: out.transpose(0, 1)"
    )
