"""One mini-batch of model inputs: a tensor, or a dict of keyword arguments (Hugging Face style).

The batch dimension is the first dimension of every tensor of the batch. A dict's target keys
(``labels``, ``label``, ``targets``) are taken out as the batch's targets, so that the model is
called with inputs only (unless they are kept, as the Fisher penalty keeps them for the model's own
loss). ``torch.func.vmap`` takes a batch's inputs as ``(args, kwargs)`` with in-dims
:meth:`Batch.sample_dims`, and :meth:`Batch.one_sample` puts one sample's batch dim back.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from .._batches import Inputs, iter_batches
from .._words import a_or_an
from ..errors import TorchfimError, warn_user
from .function_forwards import function_forwards
from .labels import ModelLabels

#: Keys of a dict batch that hold targets, not model inputs.
TARGET_KEYS = ("labels", "label", "targets")
#: Keys by which a dict batch gives an encoder-decoder's decoder its inputs.
_DECODER_KEYS = {"decoder_input_ids", "decoder_inputs_embeds"}
#: Warned where a causal language model's explicit targets are its input_ids as they are.
UNSHIFTED = (
    "torchfim: the targets given are the batch's input_ids, but this causal language model's logits at "
    "position t predict token t + 1; explicit targets are read as given, one per output position. Pass "
    "them shifted (input_ids[:, 1:] with -100 at the end), or as the dict batch's 'labels', which torchfim "
    "shifts as the model's own loss does"
)
#: Inputs on the meta device (a shape without values), which no forward can read.
META_INPUTS = (
    "the {which} on the meta device ({described}): a meta tensor has a shape and a dtype but no values, so "
    "the model cannot be run on it; pass the {what} with their values (your data, or torch.randn(...) of that "
    "shape to try a call), on the model's device"
)
#: ``vmap`` in-dims of a batch's positional and keyword inputs: 0 where the batch dim is first, else None.
SampleDims = tuple[tuple[int | None, ...], dict[str, int | None]]


@dataclass
class Batch:
    """Model inputs of ``size`` samples: ``model(*args, **kwargs)``; ``targets`` may be None."""

    args: tuple[Tensor, ...]
    kwargs: dict[str, object]
    size: int
    targets: object = None

    def call(self, module: torch.nn.Module) -> object:
        """The module's raw output on this batch, as of the function whose Fisher is taken
        (:mod:`.function_forwards`)."""
        with function_forwards():
            return module(*self.args, **self.kwargs)

    @staticmethod
    def raised_in_call(err: BaseException) -> bool:
        """Whether ``err`` came out of a model's forward that :meth:`call` ran (not out of what torchfim did with
        the output after it: an ``output=`` function, a backward pass)."""
        return any(frame.f_code is Batch.call.__code__ for frame, _ in traceback.walk_tb(err.__traceback__))

    def rows(self, rows: slice | Tensor) -> Batch:
        """The samples ``rows`` (a slice or a tensor of indices) of the batch (every tensor whose first
        dim is the batch is indexed)."""

        def cut(t: object) -> object:
            if not (isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.size):
                return t
            # indices made on the model's device cut targets left on the caller's (a tokenizer's labels on the CPU)
            return t[rows.to(t.device) if isinstance(rows, Tensor) and rows.device != t.device else rows]

        size = len(rows) if isinstance(rows, Tensor) else len(range(*rows.indices(self.size)))
        return self.map(cut, size)

    def map(self, fn: Callable[[object], object], size: int | None = None) -> Batch:
        """The batch with ``fn`` applied to each input and to the targets (``size`` samples: by default as many)."""
        return Batch(tuple(fn(a) for a in self.args), {k: fn(v) for k, v in self.kwargs.items()},
                     self.size if size is None else size, fn(self.targets))

    def with_defaults(self, defaults: Mapping[str, object]) -> Batch:
        """The batch with the keyword inputs of ``defaults`` that it does not set itself."""
        if all(k in self.kwargs for k in defaults):
            return self
        return Batch(self.args, {**defaults, **self.kwargs}, self.size, self.targets)

    def to(self, device: torch.device | None, dtype: torch.dtype | InputDtypes | None) -> Batch:
        """The batch with its tensors on ``device``, floating ones in ``dtype`` (:func:`input_dtype`)."""
        return self.map(lambda t: _to(t, device, dtype))

    def signature(self) -> tuple:
        """The shapes (less the batch dim) and dtypes of the batch's tensors: what a sample looks like."""
        tensors = [*self.args, *(v for _, v in sorted(self.kwargs.items()))]
        return tuple((tuple(t.shape[1:]), t.dtype) for t in tensors if isinstance(t, Tensor) and t.dim() > 0)

    def get(self, key: str) -> object:
        """A keyword input by name (for masks named by key)."""
        if key not in self.kwargs:
            # the tensors only: a forward's defaults (transformers' use_cache=False) are no keys of the caller's
            keys = sorted(k for k, v in self.kwargs.items() if isinstance(v, Tensor))
            if not keys:
                raise TorchfimError(f"mask={key!r} names a key of the dict mini-batch, but there is none: the inputs "
                                    "are one tensor; pass the mask itself, a bool tensor (batch, *positions) (to "
                                    "FisherTraceMonitor, a function of a held mini-batch that returns it)")
            raise TorchfimError(
                f"mask={key!r} names a key of the dict mini-batch, whose keys are {keys}; pass the right key "
                "or the mask itself"
            )
        return self.kwargs[key]

    def sample_dims(self) -> SampleDims:
        """``vmap`` in-dims of the positional and keyword inputs: 0 for per-sample tensors (batch dim
        first), None for the others (shared by the batch, e.g. position ids ``(1, T)``)."""

        def dim(t: object) -> int | None:
            return 0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == self.size else None

        return tuple(dim(a) for a in self.args), {k: dim(v) for k, v in self.kwargs.items()}

    def sample_at(self, i: int, dims: SampleDims) -> tuple[tuple, dict]:
        """Sample ``i``'s positional and keyword inputs without their batch dim (what ``vmap`` hands over);
        ``dims`` is :meth:`sample_dims`, which the caller computed once."""
        arg_dims, kw_dims = dims
        args = tuple(a[i] if d == 0 else a for a, d in zip(self.args, arg_dims))
        return args, {k: (v[i] if kw_dims[k] == 0 else v) for k, v in self.kwargs.items()}

    def one_sample(self, args: tuple, kwargs: dict) -> Batch:
        """A batch of one sample from ``vmap``-sliced inputs (the batch dim put back)."""
        arg_dims, kw_dims = self.sample_dims()
        args = tuple(a.unsqueeze(0) if d == 0 else a for a, d in zip(args, arg_dims))
        kwargs = {k: (v.unsqueeze(0) if kw_dims[k] == 0 else v) for k, v in kwargs.items()}
        return Batch(args, kwargs, 1)


class InputDtypes(NamedTuple):
    """The dtypes floating-point inputs reach a model of parameters of several floating dtypes in: an input already of
    one of them (``kept``) as it is, as the forward takes it in training (a float32 body under a float64 head, a
    bfloat16 model with modules kept in float32); one of another dtype in ``first``, its first trainable
    parameter's."""

    first: torch.dtype
    kept: frozenset[torch.dtype]

    def of(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype a floating-point input of ``dtype`` is passed in."""
        return dtype if dtype in self.kept else self.first


def input_dtype(model: nn.Module, first: torch.dtype) -> torch.dtype | InputDtypes:
    """What floating-point inputs to ``model`` are cast to: ``first`` (its first trainable parameter's dtype) where
    its floating parameters, trainable or not, are all of one dtype, else :class:`InputDtypes`."""
    kept = frozenset(p.dtype for p in model.parameters() if p.is_floating_point()) | {first}
    return first if len(kept) == 1 else InputDtypes(first, kept)


def _to(t: object, device: torch.device | None, dtype: torch.dtype | InputDtypes | None) -> object:
    if not isinstance(t, Tensor):
        return t
    if t.is_inference():  # made in inference mode: autograd cannot save it for the backward passes
        with torch.inference_mode(False):
            t = t.clone()
    if not t.is_floating_point():
        return t.to(device=device)
    return t.to(device=device, dtype=dtype.of(t.dtype) if isinstance(dtype, InputDtypes) else dtype)


def make_batch(x: object, y: object, device: torch.device | None, dtype: torch.dtype | InputDtypes | None,
               keep_targets: bool = False, labels: ModelLabels | None = None) -> Batch:
    """A :class:`Batch` from one mini-batch of user inputs, moved to the model's device and float dtype
    (:func:`input_dtype`; None: left where it is). A dict's target keys become the batch's targets, and are also passed to
    the model where ``keep_targets``. With ``labels`` (how the model's own loss reads them, asked only
    when a dict brings targets), they are aligned as its loss aligns them (a causal language model's
    shifted, so that the outputs at position t get ``labels[t + 1]``), and an encoder-decoder whose batch
    brings no decoder inputs gets those the model builds from its labels (:mod:`.labels`)."""
    _refuse_meta(x, y)
    if isinstance(x, Mapping):
        _refuse_outputs(x)
        kwargs = {k: _to(v, device, dtype) for k, v in x.items() if keep_targets or k not in TARGET_KEYS}
        found = [v for k, v in x.items() if k in TARGET_KEYS]
        if y is None and found:
            y = found[0] if labels is None else labels.aligned(found[0])
            if labels is not None and not keep_targets and not _DECODER_KEYS & set(x) and isinstance(found[0], Tensor):
                built = labels.decoder_inputs(found[0])
                if built is not None:
                    kwargs["decoder_input_ids"] = _to(built, device, dtype)
        elif labels is not None and _equal_to_input_ids(x, y) and labels.next_token():
            warn_user(UNSHIFTED)
        tensors = [v for v in kwargs.values() if isinstance(v, Tensor) and v.dim() > 0]
        if not tensors:
            raise TorchfimError("a dict mini-batch holds no tensor inputs; pass e.g. {'input_ids': ids}")
        return Batch((), kwargs, tensors[0].shape[0], y)
    if not isinstance(x, Tensor):
        raise TorchfimError(
            f"each mini-batch of inputs must be a torch.Tensor or a dict of tensors, got {type(x).__name__}; "
            "pass a tensor, or an iterable of tensors or of (inputs, targets) pairs"
        )
    if x.dim() == 0:
        raise TorchfimError("inputs must have a batch dimension first, got a 0-dim tensor")
    return Batch((_to(x, device, dtype),), {}, x.shape[0], y)


def _refuse_outputs(x: Mapping) -> None:
    """Refuse a dict mini-batch that is a model's output (a Hugging Face ``ModelOutput`` is a mapping), not its
    inputs: called as ``model(**outputs)``, it failed inside the model with a message about its inputs."""
    if "logits" in x or (type(x).__module__.startswith("transformers") and type(x).__name__.endswith("Output")):
        raise TorchfimError(
            f"the mini-batch is {a_or_an(type(x).__name__)} with keys {sorted(x)}: it looks like a model's outputs, not its "
            "inputs; pass the batch the model is called on (e.g. {'input_ids': ..., 'attention_mask': ...}), as "
            "torchfim runs the model itself"
        )


def _refuse_meta(x: object, y: object) -> None:
    """Refuse a mini-batch whose inputs (a tensor or a dict's values) or targets lie on the meta device
    (:data:`META_INPUTS`): copying them to the model's device, or running the model on them, fails inside torch."""
    inputs = [t for t in (x.values() if isinstance(x, Mapping) else [x]) if isinstance(t, Tensor) and t.is_meta]
    targets = [y] if isinstance(y, Tensor) and y.is_meta else []
    if inputs or targets:
        which = " and ".join(w for w, ts in (("inputs", inputs), ("targets", targets)) if ts)
        described = ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs + targets)
        raise TorchfimError(META_INPUTS.format(which=which + " are", what=which, described=described))


def _equal_to_input_ids(x: Mapping, y: object) -> bool:
    """Whether explicit targets ``y`` are the dict batch's own ``input_ids`` (a causal LM's labels unshifted)."""
    ids = x.get("input_ids")
    return (isinstance(y, Tensor) and isinstance(ids, Tensor) and y.shape == ids.shape
            and y.device == ids.device and torch.equal(y, ids))


def batches(inputs: Inputs, targets: object, device: torch.device, dtype: torch.dtype | InputDtypes,
            labels: ModelLabels | None = None, defaults: Mapping[str, object] | None = None,
            ) -> Iterator[Batch]:
    """The non-empty mini-batches of ``inputs`` as :class:`Batch` objects (``labels``: see
    :func:`make_batch`), with the keyword inputs of ``defaults`` where a batch does not set them."""
    defaults = defaults or {}
    if isinstance(inputs, Mapping):  # one dict mini-batch, its targets (if given apart) one tensor
        inputs, targets = [inputs], [targets] if isinstance(targets, Tensor) else targets
    if isinstance(inputs, list) and inputs and all(isinstance(b, Batch) for b in inputs):
        yield from (b.with_defaults(defaults) for b in inputs)  # mini-batches an earlier pass prepared
        return
    for x, y in iter_batches(inputs, targets):
        # Detached: the engine differentiates with respect to θ only, and inputs that require grad (a saliency
        # map's) would otherwise hang their graph on a result that torch.func computes through them.
        batch = make_batch(x, y, device, dtype, labels=labels).map(detached)
        if batch.size > 0:
            yield batch.with_defaults(defaults)


def input_count(inputs: Inputs) -> int | None:
    """How many inputs :func:`batches` reads from ``inputs`` where that is known before reading them (a progress
    bar's total): a tensor's rows, a dict's first tensor's rows, the sum over a list or tuple of mini-batches, a
    ``DataLoader``'s sampler's length where it batches them all by ``batch_size``; None where not known."""
    if isinstance(inputs, Tensor):
        return inputs.shape[0] if inputs.dim() else None
    if isinstance(inputs, Mapping):
        rows = [v.shape[0] for v in inputs.values() if isinstance(v, Tensor) and v.dim()]
        return rows[0] if rows else None
    if isinstance(inputs, (list, tuple)):
        counts = [b.size if isinstance(b, Batch) else input_count(b[0] if isinstance(b, (list, tuple)) and b else b)
                  for b in inputs]
        return None if None in counts else sum(counts)
    if isinstance(inputs, DataLoader) and inputs.batch_size is not None and not inputs.drop_last:
        try:
            return len(inputs.sampler)
        except (TypeError, NotImplementedError):  # an IterableDataset's sampler has no length
            return None
    return None


def detached(t: object) -> object:
    """``t`` detached where it is a tensor (for :meth:`Batch.map`): the inputs torchfim differentiates through
    are its own, never the caller's graph."""
    return t.detach() if isinstance(t, Tensor) else t
