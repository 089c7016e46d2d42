"""The data a report analyses: :class:`Data`, and :func:`as_data` for what a data factory returns.

A data factory's mistakes (a wrong kind of object, empty data, targets that do not match the
inputs) raise a one-line :class:`~torchfim.TorchfimError` that names the fix.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .._batches import refuse_packed
from .._words import a_or_an, counted
from ..engine.labels import ignored_labels
from ..errors import TorchfimError
from . import wording
from .load import one_line

__all__ = ["Data", "Inputs", "as_data"]

#: What a report's inputs are: a tensor (first dimension = batch), or a dict of keyword inputs.
Inputs = Tensor | dict[str, object]


@dataclass
class Data:
    """Inputs (first dimension = batch; a tensor, or a dict of keyword inputs as a tokenizer returns them)
    and, when the data carries them, the true targets."""

    inputs: Inputs
    targets: Tensor | None
    source: str

    @property
    def n(self) -> int:
        """The number of inputs."""
        return int(_first_tensor(self.inputs).shape[0])

    def rows(self, index: slice | Tensor) -> Inputs:
        """The inputs ``index`` (a slice or indices); of a dict, every tensor whose first dim is the batch."""
        from ..engine.batch import Batch

        if isinstance(self.inputs, Tensor):
            return self.inputs[index]
        return Batch((), dict(self.inputs), self.n).rows(index).kwargs

    def given(self, index: slice | Tensor | None = None) -> Inputs | list[tuple[Tensor, Tensor]]:
        """The inputs ``index`` (all by default) as the report's library calls take them, so that every
        estimator observes the positions the model's loss scores (a class label -100 none, a causal language
        model's labels shifted: :mod:`torchfim.engine.labels`): a dict's with its targets back as ``labels``; a
        tensor's, where a target is -100, as one ``(inputs, targets)`` mini-batch. Calls of the model itself take
        :meth:`rows`, without the labels."""
        x = self.inputs if index is None else self.rows(index)
        if self.targets is None:
            return x
        y = self.targets if index is None else self.targets[index]
        if isinstance(x, dict):
            return {**x, "labels": y}
        return [(x, y)] if ignored_labels(y) is not None else x

    def input_shape(self) -> list[int] | dict[str, list[int]]:
        """The shape of one input: a tensor's less the batch dim, or that of each tensor of a dict."""
        if isinstance(self.inputs, Tensor):
            return list(self.inputs.shape[1:])
        return {k: list(v.shape[1:]) for k, v in self.inputs.items() if isinstance(v, Tensor) and v.dim() > 0}


def _first_tensor(inputs: Inputs) -> Tensor:
    if isinstance(inputs, Tensor):
        return inputs
    return next(v for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0)


def _tensor(value: object, what: str, option: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) or isinstance(value, (int, float)):
        return torch.as_tensor(np.asarray(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return torch.as_tensor(value)
    raise TorchfimError(
        f"{option}: the {what} must be a torch.Tensor (or numpy array), got {type(value).__name__}; "
        "return a tensor, an (inputs, targets) pair of tensors, or a Dataset yielding (x, y)"
    )


def _concat_batches(batches: Iterable[object], option: str) -> tuple[list[Tensor], list[Tensor] | None]:
    xs: list[Tensor] = []
    ys: list[Tensor] | None = []
    for item in batches:
        if isinstance(item, (tuple, list)):
            if not item:
                raise TorchfimError(f"{option}: the data yielded an empty item; yield x or (x, y)")
            x = _tensor(item[0], "inputs", option)
            y = _tensor(item[1], "targets", option) if len(item) > 1 and item[1] is not None else None
        elif isinstance(item, Mapping):
            raise TorchfimError(
                f"{option}: the data yields dicts; return one dict of tensors (a tokenizer's output, with "
                "'labels' for targets), a tensor, an (inputs, targets) pair, or a Dataset yielding (x, y)"
            )
        else:
            x, y = _tensor(item, "inputs", option), None
        xs.append(x)
        if ys is not None and y is not None:
            ys.append(y)
        else:
            ys = None
    return xs, ys


def as_data(obj: object, source: str, option: str | None = None) -> Data:
    """Normalise what a data factory returned into :class:`Data`; errors start with ``option`` (default: the
    report's data option in the caller's words, ``--data`` or ``data``: :mod:`.wording`).

    Accepts a tensor (or numpy array) of inputs; a dict of keyword inputs (a tokenizer's output,
    ``labels`` taken as the targets); a tuple ``(inputs, targets)`` (or ``(inputs,)``);
    a map-style ``torch.utils.data.Dataset`` whose items are ``x`` or ``(x, y)``; or an iterable of
    mini-batches (a ``DataLoader``) of tensors or ``(x, y)`` pairs.
    """
    from torch.utils.data import DataLoader, Dataset

    targets: Tensor | None = None
    option = wording.option("data") if option is None else option
    refuse_packed(obj, f" ({option})")
    _refuse_numbers(obj, option)
    if isinstance(obj, Mapping):
        return _from_mapping(obj, source, option)
    if isinstance(obj, (Tensor, np.ndarray)):
        inputs = _tensor(obj, "inputs", option)
    elif _is_inputs_and_targets(obj):
        inputs, targets = _from_pair(obj, option)  # type: ignore[arg-type]
    elif isinstance(obj, (Dataset, DataLoader)) or (
        isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, Mapping))
    ):
        inputs, targets = _from_items(obj, option)  # type: ignore[arg-type]
    else:
        raise TorchfimError(
            f"{option}: {wording.said('the factory returned', 'got')} {a_or_an(type(obj).__name__)}; "
            f"{wording.said('return', 'pass')} a tensor of inputs, an (inputs, targets) pair of tensors, or a torch "
            "Dataset yielding (x, y)"
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise TorchfimError(f"{option}: the data is empty (no inputs); {wording.said('return', 'pass')} at least one "
                            "input")
    if targets is not None:
        if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
            raise TorchfimError(
                f"{option}: {counted(inputs.shape[0], 'input')} but targets of shape {tuple(targets.shape)}; "
                f"{wording.said('return', 'pass')} one target per input (or inputs only)"
            )
    return Data(inputs, targets, source)


def _refuse_numbers(obj: object, option: str) -> None:
    """Refuse a list (or tuple) of numbers, or of lists of numbers: read as mini-batches, its numbers would be
    inputs of one number each (or pairs (x, y)), which is seldom what was meant."""
    def numbers(v: object) -> bool:
        return isinstance(v, (list, tuple)) and bool(v) and all(
            isinstance(e, (int, float)) and not isinstance(e, bool) for e in v)

    if not isinstance(obj, (list, tuple)) or not obj:
        return
    kind = ("list of lists of numbers" if all(numbers(row) for row in obj)
            else "list of numbers" if numbers(obj) else None)
    if kind is not None:
        raise TorchfimError(
            f"{option}: {wording.said('the factory returned', 'got')} a {kind} ({counted(len(obj), 'item')}); "
            f"{wording.said('return', 'pass')} a tensor, e.g. torch.tensor(rows, dtype=torch.float32) with the first "
            "dimension the batch, or an (inputs, targets) pair of tensors")


def _from_mapping(obj: Mapping, source: str, option: str) -> Data:
    """A dict of keyword inputs (a tokenizer's ``BatchEncoding``), its ``labels`` (or ``label``,
    ``targets``) entry taken out as the targets, as :func:`torchfim.fisher` reads a dict mini-batch."""
    from ..engine.batch import TARGET_KEYS

    inputs = {str(k): (torch.as_tensor(v) if isinstance(v, np.ndarray) else v) for k, v in obj.items()
              if k not in TARGET_KEYS}
    found = [v for k, v in obj.items() if k in TARGET_KEYS]
    tensors = [v for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0]
    if not tensors or tensors[0].shape[0] == 0:
        raise TorchfimError(f"{option}: the dict holds no inputs; return e.g. {{'input_ids': ids, 'labels': y}}")
    data = Data(inputs, _tensor(found[0], "targets", option) if found else None, source)
    if data.targets is not None and (data.targets.dim() == 0 or data.targets.shape[0] != data.n):
        raise TorchfimError(
            f"{option}: {counted(data.n, 'input')} but 'labels' of shape {tuple(data.targets.shape)}; "
            "give one target per input (or leave the labels out)"
        )
    return data


def _is_inputs_and_targets(obj: object) -> bool:
    """``(inputs,)`` or ``(inputs, targets)``; two same-shaped tensors of different lengths are
    rather two mini-batches (read by :func:`_from_items`)."""
    if not (isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2 and isinstance(obj[0], (Tensor, np.ndarray))):
        return False
    if len(obj) == 2 and not (obj[1] is None or isinstance(obj[1], (Tensor, np.ndarray, list, tuple))):
        return False
    return not (len(obj) == 2 and isinstance(obj[1], (Tensor, np.ndarray)) and isinstance(obj[0], Tensor)
                and obj[0].dim() > 0 and obj[1].shape[:1] != obj[0].shape[:1]
                and obj[1].shape[1:] == obj[0].shape[1:])


def _from_pair(obj: tuple | list, option: str) -> tuple[Tensor, Tensor | None]:
    inputs = _tensor(obj[0], "inputs", option)
    if len(obj) < 2 or obj[1] is None:
        return inputs, None
    try:
        targets = obj[1] if isinstance(obj[1], Tensor) else torch.as_tensor(np.asarray(obj[1]))
    except Exception as exc:
        raise TorchfimError(
            f"{option}: the targets could not be made a tensor ({one_line(exc)}); return "
            "(inputs, targets) with targets a tensor of one target per input"
        ) from exc
    return inputs, targets.detach()


def _from_items(obj: Iterable[object], option: str) -> tuple[Tensor, Tensor | None]:
    """Inputs (and targets) of a Dataset, an IterableDataset or an iterable of mini-batches."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if (isinstance(obj, tuple) and len(obj) > 2 and all(isinstance(t, Tensor) and t.dim() for t in obj)
            and len({t.shape[0] for t in obj}) == 1 < len({t.shape for t in obj})):  # columns, not mini-batches
        raise TorchfimError(
            f"{option}: the data is a tuple of {len(obj)} tensors of {counted(obj[0].shape[0], 'row')} each; return the inputs, "
            "or an (inputs, targets) pair (sample weights and other columns have no place in a Fisher)"
        )
    if isinstance(obj, Dataset) and not isinstance(obj, IterableDataset):
        try:
            length = len(obj)  # type: ignore[arg-type]
        except TypeError:
            length = None
        if length == 0:
            raise TorchfimError(f"{option}: the dataset is empty; return at least one input")
        batches: Iterable[object] = DataLoader(obj, batch_size=512, shuffle=False)
    elif isinstance(obj, IterableDataset):
        batches = DataLoader(obj, batch_size=512)
    else:
        batches = obj  # already mini-batches (a DataLoader or a list of batches)
    try:
        xs, ys = _concat_batches(batches, option)
    except TorchfimError:
        raise
    except Exception as exc:
        raise TorchfimError(
            f"{option}: reading the data failed ({one_line(exc)}); a Dataset must yield tensors "
            "x or tuples (x, y) of tensors (or numbers) of equal shapes"
        ) from exc
    if not xs:
        raise TorchfimError(f"{option}: the data is empty; return at least one input")
    try:
        inputs = torch.cat([x if x.dim() else x.reshape(1) for x in xs])
        targets = torch.cat([y.reshape(-1) if y.dim() == 0 else y for y in ys]) if ys else None
    except RuntimeError as exc:
        raise TorchfimError(
            f"{option}: the data's items have different shapes ({one_line(exc)}); "
            "make every input the same shape"
        ) from exc
    return inputs, targets
