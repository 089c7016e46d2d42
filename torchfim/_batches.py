"""Iterating over the inputs (and targets) a user passes: one tensor or mini-batches."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping

from torch import Tensor
from torch.nn.utils.rnn import PackedSequence
from torch.utils.data import Dataset

from .errors import TorchfimError

Inputs = Tensor | Iterable[Tensor] | Iterable[tuple[Tensor, Tensor]]

#: Why a PackedSequence cannot be a mini-batch, and what to pass instead.
PACKED = (
    "a PackedSequence is not a mini-batch torchfim can split by input (its data has the time steps of all "
    "sequences in one dim, and it iterates as its four fields); pass the padded batch and the lengths, e.g. "
    "{{'x': padded, 'lengths': lengths}} for a forward(x, lengths) that packs them with "
    "pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False){where}"
)


def refuse_packed(obj: object, where: str = "") -> None:
    """Refuse a ``PackedSequence`` given as inputs or as a mini-batch, naming the padded form to pass."""
    if isinstance(obj, PackedSequence):
        raise TorchfimError(PACKED.format(where=where))


def iter_batches(inputs: Inputs, targets: object = None) -> Iterator[tuple[object, object]]:
    """Yield ``(x, y)`` mini-batches; ``y`` is None where no target is known.

    ``inputs`` is a tensor (one batch) or an iterable whose items are tensors or
    ``(inputs, targets, ...)`` tuples, as a ``DataLoader`` yields. ``targets`` is a
    tensor aligned with a tensor ``inputs``, or an iterable of mini-batches aligned
    with iterable ``inputs``.
    """
    if isinstance(inputs, Tensor):
        if targets is not None and not isinstance(targets, Tensor):
            raise TorchfimError(
                "targets must be a tensor when inputs is a tensor, got "
                f"{type(targets).__name__}; pass torch.as_tensor(targets)"
            )
        yield inputs, targets
        return
    if hasattr(inputs, "__array__") and hasattr(inputs, "shape"):  # a NumPy (or array-like) array: rows are not batches
        raise TorchfimError(
            f"inputs must be a tensor or an iterable of mini-batches, got {type(inputs).__name__} of shape "
            f"{tuple(inputs.shape)}; pass torch.from_numpy(inputs) (with .float() for a float32 model)"
        )
    if isinstance(inputs, (str, bytes)) or not isinstance(inputs, Iterable):
        fix = (": wrap the dataset in a DataLoader, e.g. torch.utils.data.DataLoader(dataset, batch_size=64)"
               if isinstance(inputs, Dataset) else "")
        raise TorchfimError(
            f"inputs must be a tensor or an iterable of mini-batches, got {type(inputs).__name__}{fix}"
        )
    refuse_packed(inputs)
    _refuse_a_pair(inputs, targets)
    if isinstance(targets, Tensor):
        raise TorchfimError(
            "inputs is an iterable of mini-batches but targets is one tensor; pass targets as an "
            "iterable of mini-batches aligned with the inputs, or yield (inputs, targets) pairs"
        )
    target_iter = None if targets is None else iter(targets)
    for item in inputs:
        refuse_packed(item, " (a DataLoader's collate_fn can yield that pair instead)")
        if isinstance(item, (tuple, list)):
            if not item:
                raise TorchfimError("a mini-batch of inputs is an empty tuple; yield (inputs, targets) pairs")
            x, y = item[0], (item[1] if len(item) > 1 else None)
        else:
            x, y = item, None
        if target_iter is not None:
            try:
                y = next(target_iter)
            except StopIteration:
                raise TorchfimError(
                    "targets has fewer mini-batches than inputs; align the two iterables"
                ) from None
        yield x, y


def _refuse_a_pair(inputs: object, targets: object = None) -> None:
    """Refuse a tuple of two tensors that may be an ``(inputs, targets)`` pair rather than two mini-batches: any two
    with as many rows (an autoencoder's or a denoiser's targets have the inputs' shape, a super-resolution model's
    another image size, so no shape tells the two readings apart, and the command line's ``--data`` reads such a
    tuple as a pair), and two of unequal rows that differ in dims or in the kind of dtype (floating point or not),
    which mini-batches of one model share. A list of mini-batches is never refused, nor a tuple of two alike with as
    many rows beside ``targets`` of their own (then they are not a pair)."""
    if not (isinstance(inputs, tuple) and len(inputs) == 2 and all(isinstance(t, Tensor) and t.dim() for t in inputs)):
        return
    x, y = inputs
    same_rows = x.shape[0] == y.shape[0]
    alike = x.dim() == y.dim() and x.is_floating_point() == y.is_floating_point()
    if alike and (not same_rows or targets is not None):
        return
    reading = ("that may be (inputs, targets) or two mini-batches of the same size" if same_rows else
               f"that looks like (inputs, targets) (but with {x.shape[0]} and {y.shape[0]} rows: a pair needs one "
               "target per input)")
    raise TorchfimError(
        f"inputs is a tuple of two tensors, {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}, {reading}; "
        "a tuple or list is read as mini-batches, so the second would run through the model as inputs. Pass the "
        "inputs alone (with targets=y where the estimator uses true labels), or [(x, y)] for one (inputs, targets) "
        "mini-batch, or the list [x1, x2] for two mini-batches (a model of two inputs takes a dict keyed by its "
        "forward's argument names, e.g. {'x1': x1, 'x2': x2})"
    )


def held_by_caller(inputs: Inputs) -> bool:
    """Whether ``inputs`` are mini-batches the caller holds (a tensor, one dict mini-batch, a list or a tuple), not
    ones a loader or iterator yields, which may refill one buffer from one mini-batch to the next."""
    return isinstance(inputs, (Tensor, Mapping, list, tuple))


def reusable(inputs: Inputs) -> Inputs:
    """``inputs`` in a form that can be iterated more than once: a tensor, one dict mini-batch (any
    mapping, as a tokenizer's ``BatchEncoding``), a list or a tuple as they are; what a loader or a one-shot
    iterator yields as a list of copies (a generator refilling one tensor before each ``yield`` left the list
    holding the last mini-batch N times: standard errors 1.95× the variance, in a review)."""
    return inputs if held_by_caller(inputs) else [copied(batch) for batch in inputs]


def copied(obj: object) -> object:
    """``obj`` with every tensor in it cloned, detached (in tuples, lists and mappings, nested)."""
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, Mapping):
        items = {key: copied(value) for key, value in obj.items()}
        try:
            return type(obj)(items)  # a dict, or a tokenizer's BatchEncoding
        except Exception:  # noqa: BLE001 - a mapping type built otherwise: as a dict, which reads the same
            return items
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(copied(value) for value in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(copied(value) for value in obj)
    return obj
