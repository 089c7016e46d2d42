"""Any other module with trainable parameters: per-sample vector–Jacobian products of it alone.

``torch.func`` differentiates the module's own forward on its recorded inputs, one sample at a
time under ``vmap``, against the recorded output sensitivities, for the parameters the call's outputs
depend on (the others, unused by this forward, get zeros without a run). Calls of its sub-modules whose outputs
do not depend on the rule's parameters are not run again: they return their recorded outputs
(:mod:`.constant_children`). A module that ``vmap`` cannot batch (a recurrent layer, say) is computed
one sample at a time with plain autograd, with a one-time warning that names it: correct first, then
fast. A module that reads state from its own attributes runs again on the state its call found
(:mod:`.attribute_state`).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from ...errors import TorchfimError, warn_user
from ..attention_kernel import math_attention
from ..function_forwards import function_forwards
from .attribute_state import KEY as STATE
from .attribute_state import attribute_state, attributes_set, state_to_keep
from .base import Call, Grads, Rule, rounding_tolerance, zero_grads
from .batch_free import Shapes, without_batch
from .constant_children import (
    KEY,
    REACHED,
    ReplayMismatch,
    capturing_children,
    constant_outputs,
    parts_of,
    reached_parameters,
    replaying,
    unchanged,
    with_parts,
)


def tensors_of(out: object) -> list[Tensor]:
    """The tensors of a module's output, in a fixed order (a tensor, or nested tuples/lists/dicts)."""
    if isinstance(out, Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in tensors_of(item)]
    if isinstance(out, dict):
        return [t for item in out.values() for t in tensors_of(item)]
    return []


def batch_dim(module: nn.Module, t: object, size: int) -> int | None:
    """Which dim of ``t`` is the batch: 1 for sequence-first modules (``batch_first=False``), else 0."""
    if not isinstance(t, Tensor) or t.dim() == 0:
        return None
    if getattr(module, "batch_first", True) is False and t.dim() >= 3 and t.shape[1] == size:
        return 1
    return 0 if t.shape[0] == size else None


def folded_rows(t: object, size: int) -> int | None:
    """``k`` where ``t`` leads with ``size·k`` rows, ``k > 1``: the batch folded with ``k`` rows per sample, sample
    by sample (an attention bias ``(B·H, T, T)``); else None."""
    if not isinstance(t, Tensor) or t.dim() == 0 or size < 2:
        return None
    rows = t.shape[0]
    return rows // size if rows > size and rows % size == 0 else None


#: The key of :attr:`.base.Call.cache` under which the recording notes a generic call's inputs that are another
#: generic call's folded outputs (:func:`folded_rows`): argument position or keyword → ``k``.
FOLDED_INPUTS = "folded_inputs"


def nested_batch_dims(module: nn.Module, value: object, size: int) -> object:
    """:func:`batch_dim` of a tensor argument; of a tuple or list holding tensors (an LSTM cell's ``(h, c)``),
    the same structure of dims, as ``vmap``'s ``in_dims`` takes for a nested argument (None for one without,
    such as a ``torch.Size``)."""
    if isinstance(value, (tuple, list)) and tensors_of(value):
        return rebuilt(value, [nested_batch_dims(module, v, size) for v in value])
    return batch_dim(module, value, size)


def argument_batch_dims(module: nn.Module, key: int | str, value: object, size: int) -> object:
    """:func:`nested_batch_dims` of the argument at position or keyword ``key`` of a call, except that a recurrent
    layer's initial states ``hx`` (a tensor, or an LSTM's ``(h_0, c_0)``) come ``(layers·directions, batch,
    hidden)`` whatever its ``batch_first`` says."""
    if isinstance(module, nn.RNNBase) and key in (1, "hx"):
        if isinstance(value, (tuple, list)):
            return rebuilt(value, [argument_batch_dims(module, key, v, size) for v in value])
        if isinstance(value, Tensor) and value.dim() == 3:
            return _state_dim(value, size)
    return nested_batch_dims(module, value, size)


#: ``nn.MultiheadAttention.forward``'s ``attn_mask`` (its position, and its name for a call by keyword).
_ATTENTION_MASK = (5, "attn_mask")


def attention_mask_rows(module: nn.Module, args: tuple, kwargs: dict, size: int) -> dict[int | str, int | None]:
    """For a batched call of ``nn.MultiheadAttention``'s own forward, how its ``attn_mask`` holds the samples (by its
    position or keyword): a 3-D mask ``(B·H, L, S)`` (one per sample and head, as a model builds it) → ``H``, rows
    ``b·H … (b+1)·H`` being sample ``b``'s (read as the batch folded, :data:`FOLDED_INPUTS`); a 2-D one ``(L, S)`` →
    None, every sample's. Read by its shape alone, ``batch_first=False`` took a 3-D mask's dim 1 for the batch where
    ``L`` equalled it, and a 2-D mask's rows for samples where ``L`` did: torch then refused the cut mask. Empty for
    any other module, or a forward set on the instance or a subclass's (whose arguments may mean something else)."""
    if not (isinstance(module, nn.MultiheadAttention) and "forward" not in module.__dict__
            and type(module).forward is nn.MultiheadAttention.forward):
        return {}
    given = {**dict(enumerate(args)), **kwargs}
    query = given.get(0, given.get("query"))
    key = next((k for k in _ATTENTION_MASK if isinstance(given.get(k), Tensor)), None)
    if key is None or not isinstance(query, Tensor) or query.dim() != 3:
        return {}
    mask, heads = given[key], module.num_heads
    if mask.dim() == 2:
        return {key: None}
    return {key: heads} if mask.dim() == 3 and mask.shape[0] == size * heads else {}


def _state_dim(t: Tensor, size: int) -> int | None:
    """The batch dim of a recurrent layer's state ``(layers·directions, batch, hidden)``: 1, where it holds the batch."""
    return 1 if t.dim() == 3 and t.shape[1] == size else None


def output_batch_dims(module: nn.Module, outputs: list[Tensor], size: int) -> list[int | None]:
    """:func:`batch_dim` of each output of a call, in :func:`tensors_of`'s order, except that a recurrent
    layer's final states ``h_n`` (and ``c_n``) come ``(layers·directions, batch, hidden)``, and an attention
    layer's weights ``(batch, L, S)`` or ``(batch, heads, L, S)``, whatever its ``batch_first`` says."""
    if isinstance(module, nn.RNNBase):
        rest = [_state_dim(t, size) for t in outputs[1:]]
    elif isinstance(module, nn.MultiheadAttention):
        rest = [0 if t.dim() >= 3 and t.shape[0] == size else None for t in outputs[1:]]
    else:
        return [batch_dim(module, t, size) for t in outputs]
    return [batch_dim(module, outputs[0], size), *rest] if outputs else []


class GenericRule(Rule):
    """Per-sample gradients of one module's parameters through ``torch.func`` over that module alone."""

    #: A call with its rows regrouped (:attr:`.base.Call.regrouped`): each sample's rows, ``(k, ...)`` or
    #: ``(T, 1, ...)``, are the module's input for that sample.
    reads_regrouped_rows = True

    def __init__(self, module: nn.Module, params: dict[str, int], path: str) -> None:
        super().__init__(module, params)
        self.path = path or type(module).__name__
        self.unbatchable = False
        #: Whether the coverage check compared its products batched over two output vectors with its loop.
        self.vectors_compared = False
        #: Whether the one-sample-at-a-time products differentiate the module's own parameter tensors (plain
        #: autograd) rather than stand-ins in their slots (:func:`torch.func.functional_call`): a forward or
        #: hook that reads a parameter through a name outside the module tree (``model.layer.weight`` from
        #: the enclosing scope) reads the tensor itself, which no stand-in in the engine's copy replaces.
        self.on_own_tensors = False
        #: Whether the caller takes ``backend=``: the refusal of a module that fails when run alone names
        #: ``backend='functional'`` as a way out only then (the monitor takes none).
        self.offers_functional = True
        #: Its inputs' ``(slot, shape)`` found without the batch in the coverage check (:mod:`.batch_free`).
        self.batch_free: Shapes = frozenset()
        #: The sub-module calls, inputs and attribute state :meth:`recording_forward` kept of the call in progress.
        self._pending: tuple[list, list[Tensor], dict] | None = None

    def recording_forward(self, *args: object, **kwargs: object) -> object:
        """The module's class forward, keeping the outputs of its sub-modules' calls (for :meth:`take_recorded`)."""
        module = self.module
        state = attribute_state(module)
        with capturing_children(module) as captured:
            out = type(module).forward(module, *args, **kwargs)
        self._pending = (captured, [t for v in (*args, *kwargs.values()) for t in tensors_of(v)], state)
        return out

    def take_recorded(self, call: Call) -> list[Tensor]:
        """No taps; in the call's cache, the attribute state it found, the parameters its outputs depend on
        where not all, and its sub-module calls whose outputs are constants of its products."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        state = state_to_keep(self.module, pending[2])
        if state is not None:
            call.cache[STATE] = state
        named = dict(self.module.named_parameters())
        reached, clean = reached_parameters(call.taps, {n: named[n] for n in self.params}, pending[1])
        if reached is not None and len(reached) < len(self.params):
            call.cache[REACHED] = reached
        if pending[0] and reached != frozenset():
            entries = constant_outputs(pending[0], [named[n] for n in self.params], pending[1],
                                       lambda child, t: _rows_like_call(call, child, t), clean)
            if any(out is not None for _, out, _ in entries):
                call.cache[KEY] = [(child, None if out is None else with_parts(out, [call.batch_first(t) for t in parts_of(out)]),
                                    versions) for child, out, versions in entries]
        return []

    def input_dims(self, call: Call) -> list[tuple[int | str, object, object]]:
        """``(position or keyword, value, batch dims)`` of each argument of ``call``, read by their shapes alone."""
        args, kwargs, arg_dims, kw_dims, _ = _inputs(call, self.module)
        return [*zip(range(len(args)), args, arg_dims), *((k, v, kw_dims[k]) for k, v in kwargs.items())]

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        used = [i for i, s in enumerate(sens) if s is not None]
        reached = call.cache.get(REACHED)
        if reached is not None:  # zeros for the parameters the outputs do not depend on, the rest as below
            zeros = zero_grads(self, len(range(*rows.indices(call.size))), sens[used[0]].shape[0], sens[used[0]])
            return zeros | (self._products(call, sens, rows, used) if reached else {})
        return self._products(call, sens, rows, used)

    def _products(self, call: Call, sens: list[Tensor | None], rows: slice, used: list[int]) -> Grads:
        if not self.unbatchable:
            try:
                return self._vmapped(call, sens, rows, used)
            except Exception as err:  # noqa: BLE001 - torch.func could not batch this module (it raises several types)
                self.unbatchable = True
                warn_user(
                    f"torchfim: torch.func cannot batch module {self.path!r} ({type(self.module).__name__}: "
                    f"{str(err).splitlines()[0][:120]}); its per-sample gradients are computed one sample at a "
                    "time, which is correct but slower"
                )
        return self._one_at_a_time(call, sens, rows, used)

    def _one_at_a_time(self, call: Call, sens: list[Tensor | None], rows: slice, used: list[int]) -> Grads:
        """:meth:`_looped`, with what the module raises there named, and the ways out."""
        try:
            return self._looped(call, sens, rows, used)
        except Exception as err:  # whatever the module raises: named, with the ways out
            raise TorchfimError(
                f"torchfim: module {self.path!r} ({type(self.module).__name__}) has parameters that only the generic "
                f"rule covers, which runs it again alone, one sample at a time, on its recorded inputs; there it "
                f"raised {type(err).__name__}: {str(err).splitlines()[0][:160]}. {self._ways_out(call)}"
            ) from err

    def _ways_out(self, call: Call) -> str:
        """What the refusal of a call the module raised on says to do: where an input has no row per sample (a packed
        EmbeddingBag's ids) or holds the batch folded with other rows that no rule knows how to cut (an attention
        mask ``(B·H, T, S)`` passed to a module of the user's), that first; then the ways out."""
        size, given = call.size, {**dict(enumerate(call.args)), **call.kwargs}
        packed = next((a for a in call.args if isinstance(a, Tensor) and a.dim() == 1 and a.shape[0] != size),
                      None) if isinstance(self.module, nn.EmbeddingBag) else None
        if packed is not None:
            return (f"Its input of shape {tuple(packed.shape)} has no row per sample of the {size} (a packed layout, such "
                    "as an EmbeddingBag's 1-D ids with offsets), which neither rule nor torch.func can cut by sample: "
                    "give the module one row per sample (for an EmbeddingBag, 2-D ids padded with padding_idx), or "
                    "freeze its parameters (requires_grad_(False))")
        _, _, arg_dims, kw_dims, known = _inputs(call, self.module, self.batch_free)
        dims = {**dict(enumerate(arg_dims)), **kw_dims}
        folded = next((k for k, a in given.items() if dims.get(k) is None and k not in known and k not in
                       attention_mask_rows(self.module, call.args, call.kwargs, size) and folded_rows(a, size)), None)
        way = ("try backend='functional' (the whole model through torch.func), or freeze the module's parameters "
               "(requires_grad_(False))" if self.offers_functional else
               "freeze the module's parameters (requires_grad_(False)) to leave them out of the measurement")
        if folded is None:
            return way[0].upper() + way[1:]
        return (f"Its {'argument' if isinstance(folded, int) else 'keyword'} {folded!r} of shape "
                f"{tuple(given[folded].shape)} holds the call's {size} inputs folded with other rows, "
                f"{folded_rows(given[folded], size)} each (an attention mask (B·H, T, S), say), which the generic rule "
                "cannot cut by sample (it can where that "
                "tensor is another generic call's output, or an nn.MultiheadAttention's attn_mask): pass the module one "
                f"row per sample (a mask (B, H, T, S)), or {way}")

    def batches_correctly(self, call: Call, sens: list[Tensor | None]) -> bool:
        """Whether torch.func's per-sample gradients of ``call`` equal autograd's, one sample at a time
        (to a few units in the last place), or torch.func cannot batch the module at all (it loops then)."""
        used = [i for i, s in enumerate(sens) if s is not None]
        if not used or call.cache.get(REACHED) == frozenset():
            return True
        rows = slice(0, call.size)
        try:
            batched = self._vmapped(call, sens, rows, used)
        except Exception:  # noqa: BLE001 - the module's first products will find it and loop it, with a warning
            return True
        looped = self._one_at_a_time(call, sens, rows, used)
        # to 1e-4 whatever the precision (the two sum in other orders), and in half precision to its rounding
        rtol = max([1e-4, *(rounding_tolerance(g.dtype) for g in looped.values())])
        return all(batched[i].shape == g.shape and torch.allclose(batched[i], g, rtol=rtol, atol=1e-2 * rtol * (1 + g.abs().max()))
                   for i, g in looped.items())

    def _primals(self, call: Call, own: bool = False) -> dict[str, Tensor]:
        """The parameters to differentiate for ``call``: those its outputs depend on, detached (``own``: the
        tensors themselves)."""
        named, reached = dict(self.module.named_parameters()), call.cache.get(REACHED)
        return {n: named[n] if own else named[n].detach() for n in self.params if reached is None or n in reached}

    def _vmapped(self, call: Call, sens: list[Tensor | None], rows: slice, used: list[int]) -> Grads:
        """:meth:`_batched`, with the call's constant sub-module outputs where its forward makes the recorded
        sub-module calls again (else with none)."""
        entries = call.cache.get(KEY)
        if entries is not None and unchanged(entries):
            try:
                return self._batched(call, sens, rows, used, entries)
            except ReplayMismatch:
                del call.cache[KEY]
        return self._batched(call, sens, rows, used, None)

    def _batched(self, call: Call, sens: list[Tensor | None], rows: slice, used: list[int],
                 entries: list | None) -> Grads:
        module, size = self.module, call.size
        given_args, given_kw, arg_dims, kw_dims, as_came = _inputs(call, module, self.batch_free)
        every = output_batch_dims(module, call.taps, size)
        folds = output_folds(call, every)
        out_dims = [0 if call.regrouped or folds[i] else every[i] for i in used]
        lifts, squeezes = _per_sample_dims(call, arg_dims, out_dims)
        lifts = tuple(None if i in as_came else d for i, d in enumerate(lifts))
        kw_lifts = {k: None if k in as_came else d for k, d in kw_dims.items()}
        squeezes = [None if folds[i] else d for i, d in zip(used, squeezes)]
        args = tuple(_cut(a, d, rows) for a, d in zip(given_args, arg_dims))
        kwargs = {k: _cut(v, kw_dims[k], rows) for k, v in given_kw.items()}
        cotangents = tuple(_cut(_by_sample(sens[i], folds[i], size), None if d is None else d + 1, rows).movedim(d + 1, 1)
                           for i, d in zip(used, out_dims))
        kept = [(child, t, 0 if call.regrouped else batch_dim(child, t, size)) for child, out, _ in entries or ()
                if out is not None for t in parts_of(out)]
        constants = tuple(_cut(t, d, rows) for _, t, d in kept)
        primals = self._primals(call)
        state, state_dims = _state_and_dims(call)
        tensors = {k: _cut(v, state_dims[k], rows) for k, v in state.items() if isinstance(v, Tensor)}

        def per_sample(a1: tuple, k1: dict, s1: tuple, c1: tuple, t1: dict) -> dict[str, Tensor]:
            a1 = tuple(_unsqueezed(x, d) for x, d in zip(a1, lifts))
            attributes = state | {k: _unsqueezed(x, state_dims[k]) for k, x in t1.items()}
            k1 = {k: _unsqueezed(x, kw_lifts[k]) for k, x in k1.items()}
            one = iter(_unsqueezed(c, lifts[0] if call.regrouped else d) for c, (_, _, d) in zip(c1, kept))
            replay = [(child, None if out is None else with_parts(out, [next(one) for _ in parts_of(out)]))
                      for child, out, _ in entries or ()]

            def forward(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
                with replaying(module, replay) if replay else nullcontext(), attributes_set(module, attributes), \
                        function_forwards():
                    outs = tensors_of(functional_call(module, p, a1, k1))
                return tuple(outs[i] if d is None else outs[i].squeeze(d) for i, d in zip(used, squeezes))

            _, pullback = vjp(forward, primals)
            (g,) = vmap(pullback)(s1)
            return g

        # torch.func still differentiates under no_grad (no graph to the module's other tensors); the math
        # attention kernel has batching rules, the fused CPU kernels would run sample by sample.
        with torch.no_grad(), math_attention():
            g = vmap(per_sample, in_dims=(arg_dims, kw_dims, tuple(1 for _ in used), tuple(d for *_, d in kept),
                                          {k: state_dims[k] for k in tensors}))(args, kwargs, cotangents, constants, tensors)
        # A parameter the forward leaves unused gets a broadcast zero from vmap, whose entries share one
        # memory location: made contiguous, so that the per-sample products may square it in place.
        return {self.params[n]: t.contiguous().reshape(t.shape[0], t.shape[1], -1) for n, t in g.items()}

    def _looped(self, call: Call, sens: list[Tensor | None], rows: slice, used: list[int]) -> Grads:
        module, size = self.module, call.size
        given_args, given_kw, arg_dims, kw_dims, as_came = _inputs(call, module, self.batch_free)
        every = output_batch_dims(module, call.taps, size)
        folds = output_folds(call, every)
        out_dims = [0 if call.regrouped or folds[i] else every[i] for i in used]
        leaves = (self._primals(call, own=True) if self.on_own_tensors else
                  {n: p.requires_grad_(True) for n, p in self._primals(call).items()})
        names = list(leaves)
        state, state_dims = _state_and_dims(call)
        per_sample = []
        for i in range(*rows.indices(size)):
            one = slice(i, i + 1)
            a1 = tuple(_cut(a, d, one).flatten(0, 1) if i in as_came else _cut(a, d, one)
                       for i, (a, d) in enumerate(zip(given_args, arg_dims)))
            a1 = (_as_came(call, a1[0]), *a1[1:]) if call.regrouped else a1
            k1 = {k: _cut(v, kw_dims[k], one).flatten(0, 1) if k in as_came else _cut(v, kw_dims[k], one)
                  for k, v in given_kw.items()}
            with torch.enable_grad(), attributes_set(module, {k: _cut(v, state_dims[k], one) for k, v in state.items()}):
                with function_forwards():
                    outs = tensors_of(functional_call(module, leaves, a1, k1))
                outs = [outs[j] for j in used]
                vectors = []
                for j in range(sens[used[0]].shape[0]):
                    cots = [_one_cotangent(call, sens[u][j], d, folds[u], one) for u, d in zip(used, out_dims)]
                    # an output that does not depend on the parameters (an input returned as it came) adds nothing
                    live = [(o, c) for o, c in zip(outs, cots) if o.requires_grad]
                    grads = torch.autograd.grad([o for o, _ in live], [leaves[n] for n in names], [c for _, c in live],
                                                retain_graph=True, allow_unused=True) if live else [None] * len(names)
                    vectors.append([torch.zeros_like(leaves[n]) if g is None else g.detach() for n, g in zip(names, grads)])
            per_sample.append([torch.stack([v[k] for v in vectors]) for k in range(len(names))])
        return {
            self.params[n]: torch.stack([s[k] for s in per_sample]).reshape(len(per_sample), -1, leaves[n].numel())
            for k, n in enumerate(names)
        }


def _inputs(call: Call, module: nn.Module, shared: Shapes = frozenset()) -> tuple[tuple, dict, tuple, dict, set]:
    """The call's arguments and keywords, with those that are another generic call's folded outputs
    (:data:`FOLDED_INPUTS`), and for a call read folded (:attr:`.base.Call.fold`) those after its first input that
    lead with as many rows, as ``(size, k, ...)``; their batch dims (none for a tensor whose slot and shape are in
    ``shared``, :mod:`.batch_free`); and which of them (positions, keywords) a sample's forward takes as they came
    for one sample, ``(k, ...)``, without a batch dim put back."""
    size, folded = call.size, dict(call.cache.get(FOLDED_INPUTS, {}))
    if call.fold > 1:  # beside the first input read folded, the others with as many rows (routing for its rows)
        given = {**{i: a for i, a in enumerate(call.args) if i > 0}, **call.kwargs}
        folded.update({key: call.fold for key, a in given.items()
                       if isinstance(a, Tensor) and a.dim() and a.shape[0] == size * call.fold})
    masks = attention_mask_rows(module, call.args, call.kwargs, size)  # an attention's mask: its own layout
    folded.update({key: heads for key, heads in masks.items() if heads is not None})
    args = tuple(a.unflatten(0, (size, folded[i])) if i in folded else a for i, a in enumerate(call.args))
    kwargs = {k: v.unflatten(0, (size, folded[k])) if k in folded else v for k, v in call.kwargs.items()}
    # A regrouped call's first input is kept batch first already: read by the module's batch_first, it lost the
    # batch where as many positions as samples made its dim 1 look like the batch (a review: 3-40% off, silently)
    arg_dims = tuple(0 if i in folded or (i == 0 and call.regrouped) else None if i in masks else
                     without_batch(i, a, argument_batch_dims(module, i, a, size), shared) for i, a in enumerate(call.args))
    kw_dims = {k: 0 if k in folded else None if k in masks else
               without_batch(k, v, argument_batch_dims(module, k, v, size), shared) for k, v in call.kwargs.items()}
    return args, kwargs, arg_dims, kw_dims, set(folded)


def output_folds(call: Call, every: list[int | None]) -> list[int | None]:
    """Per output, ``k`` where it has no batch dim but leads with the batch folded (:func:`folded_rows`)."""
    return [None if d is not None or call.regrouped else folded_rows(t, call.size) for t, d in zip(call.taps, every)]


def _by_sample(s: Tensor, fold: int | None, size: int) -> Tensor:
    """Sensitivities ``(m, size·k, ...)`` of a folded output as ``(m, size, k, ...)`` (as they are otherwise)."""
    return s if fold is None else s.unflatten(1, (size, fold))


def _one_cotangent(call: Call, s: Tensor, dim: int | None, fold: int | None, one: slice) -> Tensor:
    """One vector's sensitivity ``s`` of an output, cut to the sample ``one`` as its module gives that output
    for a batch of that sample alone."""
    if fold is not None:
        return s.unflatten(0, (call.size, fold))[one].flatten(0, 1)
    return _as_came(call, _cut(s, dim, one)) if call.regrouped else _cut(s, dim, one)


def _state_and_dims(call: Call) -> tuple[dict[str, object], dict[str, int | None]]:
    """The attribute state the call found (:mod:`.attribute_state`), and each entry's batch dim: 0 for a
    tensor whose first dim is the batch (each sample its own row), else None."""
    state = call.cache.get(STATE, {})
    return state, {k: 0 if isinstance(v, Tensor) and not call.regrouped and v.dim() and v.shape[0] == call.size else None
                   for k, v in state.items()}


def _rows_like_call(call: Call, child: nn.Module, t: Tensor) -> bool:
    """Whether a sub-module's output holds the batch as the call's input does: regrouped the same way (``B·k``
    rows folded, or ``(T, B, ...)``), else at its batch dim."""
    if call.fold > 1:
        return t.dim() >= 1 and t.shape[0] == call.size * call.fold
    if call.sequence_first:
        return t.dim() >= 2 and t.shape[1] == call.size and t.shape[0] != call.size
    return batch_dim(child, t, call.size) is not None


def _as_came(call: Call, t: Tensor) -> Tensor:
    """One sample's rows ``(1, k, ...)`` of a regrouped call as its module had them: ``(k, ...)`` folded,
    ``(T, 1, ...)`` sequence first."""
    return t.flatten(0, 1) if call.fold > 1 else t.transpose(0, 1)


def _per_sample_dims(call: Call, arg_dims: tuple, out_dims: list) -> tuple[tuple, list]:
    """Where one sample's arguments get their batch dim back, and its outputs lose it: the batch dims, except
    for a call with its rows regrouped, whose first argument and outputs hold a sample's rows as they came
    (``(k, ...)`` folded: nothing to add; ``(T, 1, ...)`` sequence first: the dim after the positions)."""
    if not call.regrouped:
        return arg_dims, out_dims
    dim = None if call.fold > 1 else 1
    return (dim, *arg_dims[1:]), [dim] * len(out_dims)


def _cut(t: object, dim: object, rows: slice) -> object:
    """The rows ``rows`` of ``t`` along its batch dim ``dim`` (of each tensor, for a nested argument)."""
    if isinstance(dim, (tuple, list)):
        return rebuilt(t, [_cut(ti, di, rows) for ti, di in zip(t, dim)])
    if dim is None or not isinstance(t, Tensor):
        return t
    return t.narrow(dim, rows.start or 0, len(range(*rows.indices(t.shape[dim]))))


def _unsqueezed(t: object, dim: object) -> object:
    """One sample's ``t`` with its batch dim ``dim`` back, of size 1 (of each tensor, for a nested argument)."""
    if isinstance(dim, (tuple, list)):
        return rebuilt(t, [_unsqueezed(ti, di) for ti, di in zip(t, dim)])
    return t.unsqueeze(dim) if dim is not None else t


def rebuilt(like: tuple | list, parts: list) -> tuple | list:
    """``parts`` in the container type of ``like`` (a tuple, named tuple or list)."""
    return like._make(parts) if hasattr(like, "_make") else type(like)(parts)
