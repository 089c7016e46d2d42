"""How :class:`~torchfim.train.FisherPenalty` calls the model: mini-batches in, one tensor of outputs out.

A mini-batch is one tensor ``(B, ...)``, called as ``model(x)``, or a dict of keyword inputs (a Hugging
Face mini-batch such as ``{"input_ids": ..., "attention_mask": ...}``), called as ``model(**x)``: its
tensors with ``B`` rows are per input, the others shared by the batch (e.g. position ids ``(1, T)``).
The penalty reads its outputs through ``output=`` when given, else the model's output itself, or its
``.logits`` / ``["logits"]`` (as :func:`torchfim.fisher` does); the task loss of
:meth:`~torchfim.train.FisherPenalty.penalised_loss` gets the model's output as it is (so
``lambda out: out.loss`` works). A position mask is a bool tensor ``(B, *pos)`` or, for a dict
mini-batch, the key of one (``"attention_mask"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from ..engine.composites import composite_forms
from ..engine.view import check_output_map, read_logits
from ..errors import TorchfimError, warn_user
from .position_outputs import PositionOutputs, check_mask

__all__ = ["Inputs", "ModelIO"]

#: One tensor of inputs, or a dict of keyword inputs.
Inputs = Tensor | Mapping[str, Tensor]


class ModelIO:
    """The model's calls on :data:`Inputs`, and the tensor of outputs the penalty reads (``output``).

    With ``composite``, the model's forwards run with layer norms and attention as compositions of
    elementary operations (:mod:`torchfim.engine.composites`): double backprop needs it, since torch
    has no double backward for its CPU flash attention and gets the one of ``layer_norm`` wrong under
    ``vmap``. Only the forwards: the mode costs a Python call per torch function while it is on.
    """

    def __init__(self, output: Callable[[object], Tensor] | None = None, composite: bool = False) -> None:
        check_output_map(output)
        self.output = output
        self.forms: Callable[[], AbstractContextManager] = composite_forms if composite else nullcontext
        self.looped = False  # whether per-input gradients are taken one input at a time (vmap failed)

    # ------------------------------------------------------------ inputs
    @staticmethod
    def size(x: Inputs) -> int:
        """The number of inputs ``B`` of a checked mini-batch."""
        if isinstance(x, Tensor):
            return x.shape[0]
        return next(v for v in x.values() if isinstance(v, Tensor) and v.dim() > 0).shape[0]

    def prepare(self, inputs: object, first: Tensor, rows: int | None = None) -> Inputs:
        """The first ``rows`` inputs of the mini-batch (all when None) on ``first``'s device, floating tensors
        in its dtype; refuses what is neither a tensor nor a dict of tensors with a batch dim."""
        if isinstance(inputs, Tensor):
            if inputs.dim() == 0 or inputs.shape[0] == 0:
                raise TorchfimError(
                    f"inputs must be a non-empty batch (first dimension ≥ 1), got shape {tuple(inputs.shape)}")
            x: Inputs = _moved(inputs if rows is None else self.rows(inputs, rows), first)
        elif isinstance(inputs, Mapping):
            batched = [v for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0]
            if not batched or batched[0].shape[0] == 0:
                raise TorchfimError(
                    "a dict mini-batch needs tensors whose first dim is the batch (e.g. input_ids (B, T)), got "
                    f"keys {list(inputs)}"
                )
            x = {k: _moved(v, first) for k, v in (inputs if rows is None else self.rows(inputs, rows)).items()}
        else:
            raise TorchfimError(
                f"FisherPenalty takes the mini-batch as a torch.Tensor (model(x)) or a dict of keyword inputs "
                f"(model(**batch)), got {type(inputs).__name__}"
            )
        return x

    def rows(self, x: Inputs, rows: int) -> Inputs:
        """The first ``rows`` inputs (``x`` itself when that is all of them; shared tensors kept whole)."""
        size = self.size(x)
        if rows >= size:
            return x
        if isinstance(x, Tensor):
            return x[:rows]
        return {k: v[:rows] if self._per_input(v, size) else v for k, v in x.items()}

    def in_dims(self, x: Inputs) -> object:
        """``vmap`` in-dims of a mini-batch: 0 for per-input tensors, None for shared ones."""
        if isinstance(x, Tensor):
            return 0
        size = self.size(x)
        return {k: 0 if self._per_input(v, size) else None for k, v in x.items()}

    @staticmethod
    def _per_input(t: object, size: int) -> bool:
        return isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == size

    def mask(self, mask: object, x: object) -> Tensor | None:
        """The position mask of a call: a bool tensor with one row per input, from a tensor or a key of ``x``
        (None: every position)."""
        if mask is None:
            return None
        if isinstance(mask, str):
            if not isinstance(x, Mapping) or mask not in x:
                keys = list(x) if isinstance(x, Mapping) else "none: the inputs are one tensor"
                raise TorchfimError(f"mask={mask!r} names a key of the dict mini-batch, whose keys are {keys}")
            mask = x[mask]
        return check_mask(mask, self.size(x))

    # ------------------------------------------------------------ calls
    def call(self, model: nn.Module, x: Inputs, differentiated_twice: bool = True) -> object:
        """The model's output on the mini-batch, as the model returns it (in the composite forms where
        it will be ``differentiated_twice`` and they are on)."""
        with self.forms() if differentiated_twice else nullcontext():
            return model(x) if isinstance(x, Tensor) else model(**x)

    def tensor(self, out: object) -> Tensor:
        """The tensor of outputs the penalty reads: ``output(out)``, or ``out`` itself, ``out.logits`` or
        ``out["logits"]`` (anything else is left to the family to refuse, with its fix)."""
        return self.output(out) if self.output is not None else read_logits(out)

    def outputs(self, model: nn.Module, x: Inputs, differentiated_twice: bool = True) -> Tensor:
        """The tensor of outputs of the model on the mini-batch."""
        return self.tensor(self.call(model, x, differentiated_twice))

    def input_log_prob(self, model: nn.Module, family: PositionOutputs, x: Inputs
                       ) -> Callable[[dict[str, Tensor], object, Tensor, Tensor | None], Tensor]:
        """``(params, x₁, y₁, m₁) ↦ log p(y₁|x₁)`` of one input of ``x`` at the parameters ``params``,
        summed over its observed positions (``m₁`` its row of the mask, or None), under ``vmap`` over
        the inputs (``x₁`` sliced by :meth:`in_dims`): what ``kind="trace"`` differentiates per input."""
        dims = self.in_dims(x)

        def one(x1: object) -> Inputs:  # the input with its batch dim back (shared tensors as they are)
            if isinstance(x1, Tensor):
                return x1.unsqueeze(0)
            return {k: v.unsqueeze(0) if dims[k] == 0 else v for k, v in x1.items()}

        def log_p(params: dict[str, Tensor], x1: object, y1: Tensor, m1: Tensor | None) -> Tensor:
            single = one(x1)
            args, kwargs = ((single,), {}) if isinstance(single, Tensor) else ((), single)
            with self.forms():
                out = self.tensor(functional_call(model, params, args, kwargs))
            return family.log_prob_of_one(out, y1.unsqueeze(0), m1)

        return log_p

    def per_input_gradients(self, log_p: Callable, in_dims: tuple, *args: object) -> dict[str, Tensor]:
        """``vmap(grad(log_p), in_dims)(*args)``: per-input gradients. Where torch.func cannot batch the model
        over its inputs (a recurrent layer, BERT's padding mask), they are taken one input at a time from
        then on, with a one-time warning."""
        if not self.looped:
            try:
                return vmap(grad(log_p), in_dims=in_dims)(*args)
            except (RuntimeError, NotImplementedError) as err:
                self.looped = True
                warn_user(
                    f"torchfim: torch.func cannot vmap the model over its inputs ({str(err).splitlines()[0][:120]}); "
                    "kind='trace' takes its per-input gradients one input at a time, which is correct but slower "
                    "(kind='batch_gradient' needs none)"
                )
        size = next(_leading(a, d) for a, d in zip(args, in_dims) if d is not None)
        rows = [grad(log_p)(*(_row(a, d, i) for a, d in zip(args, in_dims))) for i in range(size)]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

def _moved(t: object, first: Tensor) -> object:
    """``t`` on ``first``'s device, in its dtype if floating (anything but a tensor as it is)."""
    if not isinstance(t, Tensor):
        return t
    return t.to(device=first.device, dtype=first.dtype if t.is_floating_point() else t.dtype)


def _row(a: object, dim: object, i: int) -> object:
    """Input ``i`` of ``a`` as ``vmap`` with in-dim ``dim`` (0, None, or a dict of them) would hand it over."""
    if dim is None:
        return a
    if isinstance(a, Mapping):
        dims = dim if isinstance(dim, Mapping) else dict.fromkeys(a, dim)
        return {k: _row(v, dims[k], i) for k, v in a.items()}
    return a[i]


def _leading(a: object, dim: object) -> int:
    """The number of inputs along in-dim ``dim`` of ``a``."""
    if isinstance(a, Mapping):
        dims = dim if isinstance(dim, Mapping) else dict.fromkeys(a, dim)
        return next(_leading(v, dims[k]) for k, v in a.items() if dims[k] is not None)
    return a.shape[0]
