"""Models the engine refuses before it computes, each with the fix named.

A forward that mixes the samples of a batch or draws random numbers (:func:`check_mode`), parameters
without a shape yet or without values in memory (:func:`check_initialised`, :func:`check_in_memory`),
a mini-batch that the forward's signature cannot take (:func:`check_forward_takes`), forwards that
failed on integer, boolean, complex or 1-D inputs, or on inputs a layer does not take (:func:`forward_error`),
TorchScript modules (:func:`check_not_scripted`), parameters that torch.distributed manages
(:func:`check_not_distributed`), and forwards that write into their inputs (:func:`inputs_unwritten`,
:func:`watch_input_writes`).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._words import agreeing
from ..errors import TorchfimError
from .batch import Batch, InputDtypes

__all__ = ["FORWARD_ARGUMENTS", "INPUT_WRITTEN", "ONE_DIMENSIONAL", "check_forward_takes", "check_in_memory",
           "check_initialised", "check_mode", "check_not_distributed", "check_not_scripted", "describe_call",
           "forward_error", "inputs_unwritten", "one_dimensional", "watch_input_writes"]

#: Why a mini-batch does not fit the model's forward.
FORWARD_ARGUMENTS = (
    "the model's forward cannot take the mini-batch as torchfim passes it, {call}: {why}; the forward "
    "takes {signature}. A pair (x, y) of tensors is read as (inputs, targets); pass a model of several "
    "inputs a dict keyed by its forward's argument names (e.g. {{'x1': x1, 'x2': x2}}, or a loader of such "
    "dicts), or wrap it in a module whose forward takes one tensor"
)

#: Why a forward fails on 1-D inputs: the engine reads their first (only) dimension as the batch.
ONE_DIMENSIONAL = (
    "the model's forward failed on 1-D inputs ({shapes}){where}: their first dimension is the batch; pass "
    "x.unsqueeze(1) for one feature per input, or x.unsqueeze(0) for a single input"
)


#: A forward that writes into the tensors it is given.
INPUT_WRITTEN = (
    "the model's forward writes into its input {names} in place (e.g. x /= 255, x.sub_(mean), x.clamp_(...), or a "
    "forward pre-hook that does); torchfim runs the forward more than once on the same inputs (its passes and "
    "checks, the penalty's finite difference), and each run would see what the last one wrote. Compute out of "
    "place (x = x / 255) or clone the input first (x = x.clone()); your tensor holds its values as before"
)


def _input_tensors(batch: Batch) -> list[Tensor]:
    return [t for t in (*batch.args, *batch.kwargs.values()) if isinstance(t, Tensor)]


def _described(inputs: list[Tensor]) -> str:
    """``(4, 3) torch.int64, …``: the inputs' shapes and dtypes, for a message."""
    return ", ".join(f"{tuple(t.shape)} {t.dtype}" for t in inputs)


def one_dimensional(batch: Batch) -> str | None:
    """The shapes and dtypes of ``batch``'s input tensors (for :data:`ONE_DIMENSIONAL`) where one is 1-D."""
    inputs = _input_tensors(batch)
    return _described(inputs) if any(t.dim() == 1 for t in inputs) else None


#: torch's words for a layer given an input of a shape it does not take: a Linear's width, a convolution's channels
#: or number of dims, a norm's shape.
_SHAPE_WORDS = ("shapes cannot be multiplied", "channels, but got", "input to conv", "expected input with shape")
#: torch's words for an index past the end of an embedding's table (on CPU).
_TABLE_WORDS = "index out of range in self"
#: torch's words for an embedding given indices of a dtype it does not take (floating-point, int16, uint8, …), and
#: for a loss given class targets that are not integers.
_INDEX_WORDS = "'indices' to have one of the following scalar types"
_TARGET_WORDS = "expected target dtype"
#: Inputs of a dtype that a model of floating-point parameters does not take: which inputs are of it, torch's words
#: for it in a dtype error, and the fix.
_NOT_FLOAT = {
    "integer": (lambda t: not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool), ("long", "int"),
                "pass x.float() (integer inputs suit embedding layers only)"),
    "boolean": (lambda t: t.dtype == torch.bool, ("bool",), "pass x.float() (True as 1.0, False as 0.0)"),
    "complex": (Tensor.is_complex, ("complex",),
                ("torchfim's families take real outputs, from a model of real parameters: pass real features, e.g. "
                "torch.view_as_real(x).flatten(1) (real and imaginary parts side by side) or x.abs()")),
}


def forward_error(batch: Batch, dtype: torch.dtype | InputDtypes, err: Exception, in_forward: bool = True) -> Exception:
    """A clear error for a forward (of a model with ``dtype`` parameters) that failed on integer, boolean or complex
    inputs or on 1-D inputs (a RuntimeError), or, where ``err`` came out of the model's forward (``in_forward``),
    with torch's words for a layer given inputs of a shape it does not take, for an embedding given indices of a
    dtype it does not take (floating-point, or integers other than int64 and int32), for a loss of the model's own
    given class targets that are not integers, or for floating-point inputs of a dtype a layer does not take in a
    model of parameters of several dtypes (``dtype`` an :class:`~.batch.InputDtypes`, which passes some inputs as
    given) (RuntimeErrors), or for token ids past an embedding's table (an IndexError, with integer inputs); an
    IndexError or a ValueError out of the forward on 1-D inputs (a single example without its batch dim) says that
    too; else ``err`` itself (raised as it was)."""
    mixed = dtype if isinstance(dtype, InputDtypes) else None
    dtype = dtype.first if isinstance(dtype, InputDtypes) else dtype
    inputs = _input_tensors(batch)
    said = str(err).strip().split("\n")[0]
    integer = any(not (t.is_floating_point() or t.is_complex()) for t in inputs)
    failed = f"the model's forward failed on the mini-batch ({_described(inputs)})"
    if isinstance(err, IndexError):
        if in_forward and integer and _TABLE_WORDS in said:
            return TorchfimError(f"{failed}: an index lies outside an embedding's table; pass token ids in [0, "
                                 f"num_embeddings); torch said: {said}")
        return (_one_dimensional_error(batch) if in_forward else None) or err
    if not isinstance(err, RuntimeError):  # a ValueError of the forward's own (unpacking a 1-D input's shape)
        return (_one_dimensional_error(batch) or err) if in_forward else err
    if in_forward and _INDEX_WORDS in said and any(t.is_floating_point() for t in inputs):
        return TorchfimError(f"{failed}: an embedding was given floating-point indices; pass token ids as integers "
                             f"(ids.long()); torch said: {said}")
    if in_forward and _INDEX_WORDS in said:  # int16, uint8, …: integers, but not of a dtype an embedding takes
        return TorchfimError(f"{failed}: an embedding takes int64 or int32 indices only; pass token ids as ids.long(); "
                             f"torch said: {said}")
    if in_forward and _TARGET_WORDS in said:  # before the integer inputs' check: the targets are what is wrong
        return TorchfimError(f"{failed}: a loss the model computes itself was given class targets of a dtype it does "
                             f"not take (such as a batch's 'labels'); pass them as int64 class indices (labels.long()); "
                             f"torch said: {said}")
    for kind, (holds, words, fix) in _NOT_FLOAT.items():
        if any(holds(t) for t in inputs) and _mixes_types(said, words):
            return TorchfimError(f"the model's forward failed on {kind} inputs ({_described(inputs)}) with {dtype} "
                                 f"parameters; {fix}; torch said: {said}")
    if in_forward and mixed is not None and any(t.is_floating_point() for t in inputs) and _mixes_types(said, _FLOATS):
        return TorchfimError(_MIXED_DTYPES.format(inputs=_described(inputs), dtypes=", ".join(sorted(
            str(d).removeprefix("torch.") for d in mixed.kept)), first=mixed.first, said=said))
    clear = _one_dimensional_error(batch)
    if clear is not None:
        return clear
    if in_forward and any(words in said for words in _SHAPE_WORDS):
        return TorchfimError(f"{failed}: a layer does not take the shape it is given; if these are not the shapes "
                             f"the model takes in training, pass those (the first dimension is the batch); torch "
                             f"said: {said}")
    return err


def _one_dimensional_error(batch: Batch) -> TorchfimError | None:
    """:data:`ONE_DIMENSIONAL` for ``batch`` where one of its input tensors is 1-D (a dict mini-batch's fix named
    too: a tokenizer's single example, ``input_ids`` ``(T,)``, makes transformers raise an IndexError or a ValueError
    of its own), else None."""
    flat = one_dimensional(batch)
    if flat is None:
        return None
    keyed = any(isinstance(v, Tensor) for v in batch.kwargs.values())  # not only the forward's defaults (use_cache)
    single = " ({k: v.unsqueeze(0) for k, v in batch.items()} for a dict mini-batch of one input)" if keyed else ""
    return TorchfimError(ONE_DIMENSIONAL.format(shapes=flat, where="") + single)


#: torch's words for floating-point dtypes in a dtype error ("Float" also in "BFloat16").
_FLOATS = ("float", "double", "half")
#: A model of parameters of several dtypes that failed on floating-point inputs of a dtype a layer does not take.
_MIXED_DTYPES = (
    "the model's forward failed on floating-point inputs ({inputs}) of a dtype a layer does not take; its parameters "
    "are of several dtypes ({dtypes}), so torchfim passes inputs of one of them as given, as the forward takes them "
    "in training, and casts the others to the first trainable parameter's ({first}): pass the inputs in the dtype "
    "of the layer that takes them, or cast them in the forward (x.to(layer.weight.dtype)); torch said: {said}"
)


def _mixes_types(said: str, words: tuple[str, ...]) -> bool:
    """Whether torch's message ``said`` is about a tensor of a dtype named by one of ``words`` meeting floating-point
    ones (as in "mat1 and mat2 must have the same dtype, but got Long and Double")."""
    said = said.lower()
    return any(k in said for k in ("dtype", "scalar type", "type (")) and any(k in said for k in words)


def check_mode(model: nn.Module) -> None:
    """Refuse modules whose forward mixes samples (BatchNorm in training mode, or without running
    statistics) or is random (Dropout in training mode)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.training and module.running_mean is None:
            raise TorchfimError(
                f"module {name or type(module).__name__!r} is a BatchNorm layer without running statistics "
                "(track_running_stats=False), so even in eval mode it normalises with the statistics of the "
                "batch, which mixes its samples, and per-sample Fisher terms are undefined; use a layer that "
                "normalises each sample (nn.GroupNorm, nn.LayerNorm) or BatchNorm with running statistics"
            )
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            raise TorchfimError(
                f"module {name or type(module).__name__!r} is a BatchNorm layer in training mode, whose "
                "forward mixes the samples of a batch, so per-sample Fisher terms are undefined; "
                "call model.eval() before computing the Fisher"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            raise TorchfimError(
                f"module {name or type(module).__name__!r} is a Dropout layer in training mode, which makes "
                "the outputs random; call model.eval() before computing the Fisher"
            )
        if isinstance(module, nn.RReLU) and module.lower != module.upper:
            raise TorchfimError(
                f"module {name or type(module).__name__!r} is an RReLU in training mode, which draws a random "
                "slope for every negative input, so the outputs are random; call model.eval() before computing "
                "the Fisher (its slope is then the mean of lower and upper)"
            )
        inner = isinstance(module, nn.MultiheadAttention) or (isinstance(module, nn.RNNBase) and module.num_layers > 1)
        if inner and module.dropout > 0:
            raise TorchfimError(
                f"module {name or type(module).__name__!r} ({type(module).__name__}) applies its own dropout "
                f"(dropout={module.dropout}) in training mode, which makes the outputs random; call model.eval() "
                "before computing the Fisher"
            )


def _first_names(names: list[str], most: int = 3) -> str:
    """``'a', 'b', 'c' and 4 more``: the first names of a list, for a message."""
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(repr(n) for n in names[:most]) + more


def mixes_samples(model: nn.Module) -> TorchfimError:
    """The error for a model whose output for one sample depends on the others in its batch; where the model holds
    modules that take their batch in dim 1 (``batch_first=False``: recurrent layers, attention and transformer
    layers by default), the likely cause named: torchfim takes dim 0 of every input as the batch."""
    seq_first = [n or type(m).__name__ for n, m in model.named_modules() if getattr(m, "batch_first", True) is False]
    hint = ""
    if seq_first:
        k = len(seq_first)
        hint = (f"; if the inputs are sequence-first, that is the cause: {agreeing(k, 'module')} "
                f"{_first_names(seq_first)} {agreeing(k, 'takes', 'take')} batch_first=False, but torchfim reads dim "
                "0 of every input as the batch, so pass (batch, sequence, ...) inputs to modules built with "
                "batch_first=True, or transpose inside forward")
    return TorchfimError(
        "the model's output for a sample depends on the other samples in its batch "
        "(e.g. BatchNorm in training mode, or an operation across the batch dimension), so per-sample "
        f"Fisher terms are undefined; call model.eval() or remove the cross-sample operation{hint}"
    )


def check_initialised(tree: nn.Module) -> None:
    """Refuse parameters and buffers of lazy modules before their first forward: they have no shape yet."""
    lazy = [n for n, t in [*tree.named_parameters(), *tree.named_buffers()] if nn.parameter.is_lazy(t)]
    if lazy:
        raise TorchfimError(
            f"{_first_names(lazy)} of the model are not initialised yet (a lazy module, such as nn.LazyLinear, takes its "
            "shapes from its first input), so the Fisher has no shape; run one forward first, e.g. "
            "with torch.no_grad(): model(x) on a mini-batch"
        )


def check_not_scripted(model: nn.Module) -> None:
    """Refuse TorchScript modules (``torch.jit.script`` or ``torch.jit.trace``), the model or one inside it:
    they take no forward hooks, and torch.func cannot call them with other parameters."""
    scripted: list[str] = []
    for path, m in model.named_modules():
        if isinstance(m, torch.jit.ScriptModule) and not any(path.startswith(f"{q}.") or not q for q in scripted):
            scripted.append(path)  # the outermost only: a ScriptModule's children are ScriptModules too
    scripted = [path or "the model" for path in scripted]
    if scripted:
        where = ("the model is" if scripted == ["the model"] else
                 f"its module{'s' * (len(scripted) > 1)} {_first_names(scripted)} {'are' if len(scripted) > 1 else 'is'}")
        raise TorchfimError(
            f"{where} TorchScript (torch.jit.script or torch.jit.trace), which torchfim can neither record "
            "(a ScriptModule takes no forward hooks) nor call with other parameters (torch.func); pass the "
            "Python nn.Module it was made from (before torch.jit.script/trace), or torch.compile it instead"
        )


#: Where torch defines what manages a model's parameters across processes: (module, name, what it is).
_DISTRIBUTED = (("torch.distributed.fsdp", "FSDPModule", "fully_shard or replicate"),
                ("torch.distributed._composable.fsdp", "FSDPModule", "fully_shard or replicate"),  # torch 2.4, 2.5
                ("torch.distributed._composable.fsdp", "FSDP", "fully_shard or replicate"),  # torch 2.3
                ("torch.distributed.fsdp", "FullyShardedDataParallel", "FullyShardedDataParallel"),
                ("torch.distributed.fsdp._flat_param", "FlatParameter", "FullyShardedDataParallel"),
                ("torch.distributed.tensor", "DTensor", "DTensor (tensor parallelism, fully_shard or replicate)"),
                ("torch.distributed._tensor", "DTensor", "DTensor (tensor parallelism, fully_shard or replicate)"))


def check_not_distributed(model: nn.Module, what: str = "torchfim", params: list[Tensor] | None = None,
                          modules: bool = True) -> None:
    """Refuse a model whose parameters torch.distributed manages across processes (FSDP's ``fully_shard`` or
    ``FullyShardedDataParallel``, ``replicate``, tensor parallelism): sharded ones are whole in no process, and
    none of them are the plain tensors torchfim differentiates.

    Looked at: the model, with ``modules`` every module in it (an FSDP wrapper inside), and its parameters
    (``params``, where the caller has them already: DTensors, or FSDP's flat parameters). Only the classes torch has
    already imported are looked for: a model they manage imported them.
    """
    kinds = {kind: said for module_name, name, said in _DISTRIBUTED
             if isinstance(kind := getattr(sys.modules.get(module_name), name, None), type)}
    if not kinds:
        return
    types = tuple(kinds)
    tensors = model.parameters() if params is None else params
    looked_at = (*(model.modules() if modules else (model,)), *tensors)
    # FSDP1 with use_orig_params=True (accelerate's default) leaves plain parameters, viewing its flat shards,
    # and marks them
    hit = next((t for t in looked_at if isinstance(t, types) or getattr(t, "_fsdp_flattened", False)), None)
    if hit is not None:
        said = next((said for kind, said in kinds.items() if isinstance(hit, kind)), "FullyShardedDataParallel")
        raise TorchfimError(
            f"the model's parameters are managed by torch.distributed's {said} ({type(hit).__name__}): sharded over "
            f"processes (whole in none of them) or distributed tensors, not the plain tensors {what} differentiates; "
            "measure a plain copy instead (the full state dict, torch.distributed.checkpoint.state_dict."
            "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)), loaded into a model built "
            "without them), or train with DistributedDataParallel, whose processes hold the whole model"
        )


def check_in_memory(tensors: dict[str, Tensor]) -> None:
    """Refuse parameters and buffers on the meta device: their values live elsewhere, if anywhere."""
    on_meta = [n for n, t in tensors.items() if t.is_meta]
    if on_meta:
        raise TorchfimError(
            f"{_first_names(on_meta)} of the model are on the meta device, so their values are not in memory (accelerate's "
            "cpu_offload or disk offload loads weights only inside each module's forward; init_empty_weights "
            "never does), and torchfim cannot differentiate with respect to them; load the model with its "
            "weights in memory, e.g. from_pretrained(..., device_map='cpu') or dispatch_model without offloading"
        )


def check_forward_takes(model: nn.Module, batch: Batch) -> None:
    """Refuse a mini-batch that ``model``'s forward cannot take as the engine calls it
    (:data:`FORWARD_ARGUMENTS`), by binding its arguments to the forward's signature (no forward run)."""
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):  # a forward without a signature: its own call will say
        return
    try:
        signature.bind(*batch.args, **batch.kwargs)
    except TypeError as why:
        raise TorchfimError(FORWARD_ARGUMENTS.format(
            call=describe_call(batch), why=why, signature=_parameter_names(signature))) from None


def describe_call(batch: Batch) -> str:
    """How the engine calls the model on ``batch``: ``model(<tensor>)`` or ``model(input_ids=…, …)``."""
    args = ["<tensor>" for _ in batch.args] + [f"{k}=…" for k in batch.kwargs]
    return f"model({', '.join(args)})"


def _parameter_names(signature: inspect.Signature) -> str:
    """A forward's parameters as a call would name them: ``(x1, x2, mask=…, *args, **kwargs)``."""
    kinds = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    names = [kinds.get(p.kind, "") + p.name + ("=…" if p.default is not p.empty else "")
             for p in signature.parameters.values()]
    return f"({', '.join(names)})"


def _snapshot(module: nn.Module, args: tuple, kwargs: dict) -> list[tuple[str, Tensor, int, Tensor]]:
    """Each input tensor of a call of ``module``: its name (the forward's, else its position), itself, its
    version and its values."""
    try:
        params = [p.name for p in inspect.signature(module.forward).parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):  # a forward without a signature to read
        params = []
    named = [(params[i] if i < len(params) else f"#{i}", t) for i, t in enumerate(args)] + list(kwargs.items())
    # Unseen by torch function modes around the forward (the engine's counts of its outputs and its tracing);
    # inference tensors have no version counter, and cannot be written outside inference mode anyway.
    with torch._C.DisableTorchFunction():
        return [(repr(n), t, t._version, t.detach().clone()) for n, t in named
                if isinstance(t, Tensor) and not t.is_inference()]


def _refuse_written(snapshot: list[tuple[str, Tensor, int, Tensor]]) -> None:
    """Put back the values of the inputs of ``snapshot`` written since (their version moved), and refuse."""
    written = [(n, t, saved) for n, t, version, saved in snapshot if t._version != version]
    if written:
        with torch.no_grad():
            for _, t, saved in written:
                t.copy_(saved)
        raise TorchfimError(INPUT_WRITTEN.format(names=", ".join(n for n, _, _ in written)))


@contextmanager
def inputs_unwritten(model: nn.Module, args: tuple, kwargs: dict) -> Iterator[None]:
    """Refuse a forward of ``model``, run in the block on ``args`` and ``kwargs``, that writes into its input
    tensors in place (:data:`INPUT_WRITTEN`), their values put back first: it would feed each later run what
    the last one wrote, and change the caller's data."""
    snapshot = _snapshot(model, args, kwargs)
    try:
        yield
    finally:  # a write is the cause of whatever else the forward raised on what it wrote
        _refuse_written(snapshot)


def watch_input_writes(model: nn.Module) -> None:
    """Hooks on ``model`` (the engine's private copy) that apply :func:`inputs_unwritten` to its calls until
    one returns without writing into its inputs, then go: first among the forward pre-hooks and last among
    the forward hooks, so that a user's hook that writes into the inputs counts."""
    state: dict[str, list] = {}

    def before(module: nn.Module, args: tuple, kwargs: dict) -> None:
        state["snapshot"] = _snapshot(module, args, kwargs)

    def after(module: nn.Module, args: tuple, kwargs: dict, out: object) -> None:
        _refuse_written(state.pop("snapshot", []))
        for handle in handles:  # not before: a caller that catches the refusal (a probe) meets it again next call
            handle.remove()

    handles = [model.register_forward_pre_hook(before, with_kwargs=True, prepend=True),
               model.register_forward_hook(after, with_kwargs=True)]
