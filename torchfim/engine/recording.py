"""The per-module backend's recorded forward: every call of a module that has a rule, with its taps.

:func:`record_calls` runs the model once, each ruled module of the private view with a forward
that records its call. Each call keeps its inputs (detached) and its outputs with their autograd
history (the taps, to which output vectors are later pulled back), in the order the forward made
them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .attention_kernel import math_attention
from .backend import Recording
from .batch import Batch
from .modules import Call, GenericRule, Rule, tensors_of
from .modules.base import LAYOUTS, forwards_replaced, rounding_tolerance
from .modules.generic import FOLDED_INPUTS, output_batch_dims, output_folds, rebuilt
from .output_compare import outputs_agree
from .shared_inputs import rows_layout, spread, spread_output
from .view import ModelView

#: The key of :attr:`.modules.Call.cache` that marks a call of a forward set on the instance whose outputs are not the
#: class forward's (:func:`strays`): its module gets the generic rule (:meth:`.coverage_check.CoverageCheck._record`).
STRAYED = "strayed"

#: torch.nn's modules whose forward may call ``scaled_dot_product_attention``.
_ATTENTION_MODULES = (nn.MultiheadAttention, nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder,
                      nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


class ModuleRecording(Recording):
    """A recorded forward with every hooked module's calls."""

    def __init__(self, batch: Batch, output: Tensor, shape: torch.Size, calls: list[tuple[Rule, Call]]) -> None:
        super().__init__(batch, output, shape)
        self.calls = calls
        #: Numbers one vector's pull-back records: the taps of every call.
        self.tap_elements = sum(t.numel() for _, call in calls for t in call.taps)
        #: Whether its last pull-back has freed the forward (:meth:`release`): no product can be asked of it.
        self.released = False

    def release(self) -> None:
        """Free what the calls hold; later use is refused (:meth:`.per_module.PerModuleBackend._sensitivities`)."""
        for _, call in self.calls:
            call.release()
        self.released = True

    def holds_storage_of(self, t: Tensor, sens: list) -> bool:
        """Whether ``t`` shares its storage with an input of a call or with one of the calls' sensitivities
        ``sens`` (so must not be written in place)."""
        mine = t.untyped_storage().data_ptr()
        held = [x for (_, call), s in zip(self.calls, sens) for x in (*call.args, *(s or ())) if isinstance(x, Tensor)]
        return any(x.untyped_storage().data_ptr() == mine for x in held)


def may_attend(model: nn.Module) -> bool:
    """Whether a forward of ``model`` may call ``scaled_dot_product_attention``: it has a module that
    is not one of torch.nn's own (whose forward could do anything) or one of torch.nn's attention or
    transformer modules."""
    return any(not type(m).__module__.startswith("torch.nn.modules.") or isinstance(m, _ATTENTION_MODULES)
               for m in model.modules())


def record_calls(view: ModelView, rules: dict[nn.Module, Rule], batch: Batch, clone: bool,
                 attends: bool, shared: frozenset[nn.Module] = frozenset(),
                 layouts: Callable[[nn.Module], frozenset[str]] = lambda module: LAYOUTS) -> ModuleRecording:
    """One forward of ``batch`` through ``view``'s model, recording every call of a module in ``rules``.

    ``clone``: the layers downstream of a call get a copy of its output, so that in-place operations
    there leave the taps intact. ``attends`` (:func:`may_attend`): run attention on the math kernel,
    whose backward has batching rules, so that output vectors are pulled back through it in one
    batched pass (the fused CPU kernels go vector by vector); entering that setting costs about as
    much as a small layer's forward, so models without attention skip it. ``shared``: modules whose
    inputs leading with 1 (shared by every sample) are expanded to the batch (:mod:`.shared_inputs`).
    The calls of a rule that reads a folded batch (:attr:`.modules.Rule.reads_regrouped_rows`) whose rows are ``k``
    per sample, or which come sequence first, are recorded so (:attr:`.modules.Call.fold`,
    :attr:`.modules.Call.sequence_first`) where ``layouts(module)`` holds that layout or the batch has one
    sample (whose rows are all its own).
    """
    calls: list[tuple[Rule, Call]] = []
    kernel = math_attention() if attends else nullcontext()
    with torch.enable_grad(), _recording(rules, calls, batch.size, clone, shared, layouts), kernel:
        raw = view.to_tensor(batch.call(view.model), batch)
    return ModuleRecording(batch, view.flat(raw), raw.shape, calls)


@contextmanager
def _recording(rules: dict[nn.Module, Rule], calls: list[tuple[Rule, Call]], size: int,
               clone: bool, shared: frozenset[nn.Module], layouts: Callable[[nn.Module], frozenset[str]]
               ) -> Iterator[None]:
    """While the block runs, every module of ``rules`` runs its forward (or its rule's
    ``recording_forward``) and then appends the call to ``calls``.

    The forward is replaced on the private copy rather than wrapped by a forward hook: a module
    with a hook leaves torch's fast call path, which cost 20-25 µs per call on the benchmark MLP
    (for its three layers, a fifth of the forward of a 32-input window). The call is the forward's own: its arguments after
    any forward pre-hook, and its output before any forward hook of the user's (which may replace
    it by a function of it, so the taps stay the module's outputs). A generic call given another generic
    call's output that holds the batch folded (an attention bias ``(B·H, T, T)`` passed on to the next
    layer) notes it (:data:`.modules.generic.FOLDED_INPUTS`): its rule reads it by sample.
    """
    folded: dict[int, int] = {}  # id of a generic call's folded output (kept alive by its call's taps) → k

    def recorder(module: nn.Module, rule: Rule, forward: Callable[..., object], guarded: bool) -> Callable[..., object]:
        signature: list[inspect.Signature] = []  # the forward's, from its first call with keyword arguments

        spreads = module in shared and size > 1
        allowed = (LAYOUTS if size == 1 else layouts(module)) if rule.reads_regrouped_rows else frozenset()

        def forward_and_record(*args: object, **kwargs: object) -> object:
            if spreads:
                args, kwargs = spread(args, kwargs, size)
            output = forward(*args, **kwargs)
            if spreads:
                output = spread_output(output, size)
            strayed = guarded and strays(module, args, kwargs, output, calls)
            if kwargs and not isinstance(rule, GenericRule):  # rules read their inputs by position
                args, kwargs = _positional(forward, signature, args, kwargs)
            output, taps, unviewed = own_outputs(output)
            detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
            kw = {k: (v.detach() if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
            fold, second = rows_layout(detached, taps, size, allowed) if allowed else (1, False)
            call = Call(module, detached, kw, taps, size, fold=fold, sequence_first=second, unviewed=unviewed)
            if strayed:
                call.cache[STRAYED] = True
            if call.regrouped:
                call.args = (call.batch_first(detached[0]), *detached[1:])
            if isinstance(rule, GenericRule) and not call.regrouped:
                _note_folded(call, args, kwargs, taps, folded)
            taps.extend(rule.take_recorded(call))
            call.versions = [t._version for t in taps]
            calls.append((rule, call))
            return output.clone() if clone and isinstance(output, Tensor) else output

        return forward_and_record

    def forward_of(m: nn.Module) -> Callable[..., object]:
        # A rule's recording forward stands in for the class's forward only: one set on the instance runs, and
        # each of its calls is compared with the class's forward, which a rule of the module's own follows.
        own = "forward" in m.__dict__
        return recorder(m, rules[m], (not own and rules[m].recording_forward) or m.forward,
                        own and not isinstance(rules[m], GenericRule) and not moves_devices_only(m))

    with forwards_replaced(rules, forward_of):
        yield


def moves_devices_only(module: nn.Module) -> bool:
    """Whether ``module``'s forward set on the instance is ``accelerate``'s around the class forward with device hooks
    alone (``AlignDevicesHook``, as ``dispatch_model`` and ``device_map`` leave every module): they move inputs and
    outputs between devices and compute nothing, so :func:`strays`' second forward per call (a fifth of a score
    estimate's time on a hooked GPT-2) is left out. Offloaded weights are refused before (meta device)."""
    hook, old = getattr(module, "_hf_hook", None), getattr(module, "_old_forward", None)
    hooks = getattr(hook, "hooks", (hook,)) if type(hook).__name__ == "SequentialHook" else (hook,)
    return (getattr(old, "__self__", None) is module and getattr(old, "__func__", None) is type(module).forward
            and all(type(h).__name__ == "AlignDevicesHook" and type(h).__module__ == "accelerate.hooks" for h in hooks))


def strays(module: nn.Module, args: tuple, kwargs: dict, output: object, calls: list) -> bool:
    """Whether a call of a forward set on ``module``'s instance computed other outputs than the module's class forward
    on the same inputs (to rounding), or the class forward refuses them, or reaches modules with rules of their own
    (whose calls it would record: taken back from ``calls``). The module's rule follows the class forward; the
    coverage check compares it with autograd on the first rows of the first batch only, so a forward that departs
    from the class's on some inputs alone (a clamp that binds on later rows) was 11-130% off, silently
    (:data:`STRAYED`)."""
    recorded = len(calls)
    try:
        with torch.no_grad():
            own = tensors_of(type(module).forward(module, *args, **kwargs))
    except Exception:  # noqa: BLE001 - arguments the class forward does not take: not its computation
        return True
    finally:
        reached = len(calls) > recorded
        del calls[recorded:]
    got = tensors_of(output)
    return reached or len(own) != len(got) or not all(
        a.shape == b.shape and a.dtype == b.dtype and (outputs_agree(a, b, rounding_tolerance(b.dtype)) if
                                                       b.is_floating_point() else torch.equal(a, b))
        for a, b in zip(got, own))


def own_outputs(output: object) -> tuple[object, list[Tensor], bool]:
    """A call's output with each of its tensors that require grad replaced by a view of it, where it has two or
    more (in tuples, lists and dicts, nested; a dict subclass such as a ``ModelOutput`` updated in place); those
    tensors (the call's taps); and whether some of them could not be replaced (:attr:`.modules.Call.unviewed`).

    The views are the call's taps: the model downstream reads them, while the module computed its outputs
    from the tensors under them. So a tap's sensitivity is that of its uses outside the call alone, even
    where the module computed one output from another (a router's scores from its logits, a block's output
    from the hidden state it also returns) or returns one tensor twice. Autograd's sensitivity of the tensor
    itself would also hold the paths through the other outputs, which a product over all the outputs (the
    generic rule's) then counts twice (docs/math.md §6.3e)."""
    returned = [t for t in tensors_of(output) if t.requires_grad]
    if len(returned) < 2:
        return output, returned, False
    output = _viewed(output)
    taps = [t for t in tensors_of(output) if t.requires_grad]
    return output, taps, any(t is r for t, r in zip(taps, returned))


def _viewed(out: object) -> object:
    """:func:`own_outputs` on any output; a container that cannot be rebuilt or assigned to (a tuple subclass
    with a constructor of its own, a mapping that refuses items) keeps the tensors it holds as they are."""
    if isinstance(out, Tensor):
        return out.view_as(out) if out.requires_grad else out
    try:
        if isinstance(out, (tuple, list)):
            return rebuilt(out, [_viewed(item) for item in out])
        if type(out) is dict:
            return {k: _viewed(v) for k, v in out.items()}
        if isinstance(out, dict):
            for k, v in list(out.items()):
                out[k] = _viewed(v)
    except (TypeError, AttributeError, RuntimeError):
        pass
    return out


def _note_folded(call: Call, args: tuple, kwargs: dict, taps: list[Tensor], folded: dict[int, int]) -> None:
    """Note in ``call``'s cache its inputs that are earlier generic calls' folded outputs (``folded``), and add
    its own folded outputs there."""
    given = {**dict(enumerate(args)), **kwargs}
    found = {key: folded[id(v)] for key, v in given.items() if isinstance(v, Tensor) and id(v) in folded}
    if found:
        call.cache[FOLDED_INPUTS] = found
    for t, k in zip(taps, output_folds(call, output_batch_dims(call.module, taps, call.size))):
        if k is not None:
            folded[id(t)] = k


def _positional(forward: Callable[..., object], signature: list[inspect.Signature], args: tuple,
                kwargs: dict) -> tuple[tuple, dict]:
    """The call's arguments with those passed by keyword that have a position (``layer(input=x)``) moved
    to it; ``signature`` caches the forward's (found on the first call)."""
    if not signature:
        signature.append(inspect.signature(forward))
    try:
        bound = signature[0].bind(*args, **kwargs)
    except TypeError:  # the forward accepted the call, so this does not happen; keep the call as it came
        return args, kwargs
    return bound.args, bound.kwargs
