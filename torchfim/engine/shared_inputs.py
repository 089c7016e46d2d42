"""Calls whose outputs do not carry the batch, and inputs shared by every sample spread over the batch.

A module called on inputs that every sample shares, such as the position ids ``(1, T)`` that Hugging
Face models build when none are passed, returns one output ``(1, T, d)`` that the layers downstream
broadcast over the batch. Its rule cannot split that output's sensitivity by sample, so the
per-module backend would give its parameters to the generic rule of a module above, at worst the whole
model's, one sample at a time where ``torch.func`` cannot batch it.

Instead, while recording, such a module gets its shared inputs expanded to the batch
(``(1, T) → (B, T)``, a view without copy): its output ``(B, T, d)`` then carries the batch, row ``i``
feeding sample ``i`` only, and its own rule applies. An output that still leads with 1 (computed from
inputs without that dim) is expanded itself, for the module's generic rule. Where a layer downstream
broadcasts the output (``hidden + position_embeds``), the model's output is unchanged; the backend checks
that it is on the first batch, and that the coverage check passes, and moves the module's parameters to
a rule above as before where either fails.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .batch import Batch
from .modules import Call, Rule, tensors_of
from .modules.base import LAYOUTS, PARTS
from .modules.generic import FOLDED_INPUTS, GenericRule, batch_dim, folded_rows, output_batch_dims
from .output_compare import outputs_agree


def carries_batch(call: Call, folded: bool = False) -> bool:
    """Whether every output of the call carries the batch (first, or second for a sequence-first module), or
    it was recorded with its rows regrouped for its rule (:attr:`.modules.Call.regrouped`) or read by sample
    in a layout of its rule's own (:attr:`.modules.Call.own_layout`); with ``folded`` (a
    generic rule's call), outputs that lead with the batch folded, ``B·k`` rows sample by sample, count too."""
    if call.regrouped or call.own_layout:
        return True
    outputs = call.taps[: len(call.taps) - len(call.cache.get(PARTS, ()))]  # a rule's own taps come after
    folded = folded and reads_by_sample(call.module, {**dict(enumerate(call.args)), **call.kwargs}, call.size,
                                        set(call.cache.get(FOLDED_INPUTS, ())))
    return all(d is not None or (folded and folded_rows(t, call.size) is not None)
               for t, d in zip(outputs, output_batch_dims(call.module, outputs, call.size)))


def reads_by_sample(module: nn.Module, inputs: dict, size: int, known: set) -> bool:
    """Whether a generic rule can cut a call with these ``inputs`` (position or keyword → value) by sample
    when its outputs lead with the batch folded: some input holds the batch at its batch dim, and every
    input that leads with ``size·k`` rows is one the recording knows as another call's folded output (its
    key in ``known``; a flattened ``(B·T, d)`` it does not know how to cut)."""
    tensors = {key: t for key, t in inputs.items() if isinstance(t, Tensor)}
    dims = {key: batch_dim(module, t, size) for key, t in tensors.items()}
    return any(d is not None for d in dims.values()) and all(
        dims[key] is not None or folded_rows(t, size) is None or key in known for key, t in tensors.items())


def unbatched_calls(calls: list[tuple[Rule, Call]], size: int) -> list[tuple[Rule, Call]]:
    """The calls of a forward of ``size`` samples whose outputs do not carry the batch. With one sample, only the
    calls of rules that read rows as samples: a generic rule takes any shape of one input's call, and a module's
    rule fed a lookup shared by every sample (``wpe(torch.arange(T))``, T rows) read its T rows as T samples and
    failed inside torch."""
    if size > 1:
        return [(rule, call) for rule, call in calls if not carries_batch(call, isinstance(rule, GenericRule))]
    return [(rule, call) for rule, call in calls if not isinstance(rule, GenericRule) and not carries_batch(call)]


def modules_carrying_batch(model: nn.Module, batch: Batch) -> tuple[set[nn.Module], set[nn.Module]]:
    """The modules of ``model`` that a forward of ``batch`` calls with every differentiable output carrying
    the batch, or with rows a rule may read regrouped (:func:`rows_layout`; a container such as
    ``nn.ModuleList`` is never called): where the parameters of a call that does not carry it (a lookup
    shared by every sample) may go, in a generic rule. And those whose outputs carry it but for some that
    lead with 1, shared by every sample (T5's attention returns its position bias ``(1, H, T, T)`` beside
    its batched output): such a module may take them too, with those outputs spread (:func:`spread_output`)."""
    carrying: dict[nn.Module, bool] = {}
    spreading: dict[nn.Module, bool] = {}
    folded: set[int] = set()  # ids of the folded outputs of modules found carrying (their next readers know them)

    def seen(module: nn.Module, args: tuple, kwargs: dict, output: object) -> None:
        outs = [t for t in tensors_of(output) if t.requires_grad]
        dims = output_batch_dims(module, outs, batch.size)
        inputs = {**dict(enumerate(args)), **kwargs}
        known = {key for key, t in inputs.items() if isinstance(t, Tensor) and id(t) in folded}
        by_sample = reads_by_sample(module, inputs, batch.size, known)
        ok = bool(outs) and (all(d is not None or (by_sample and folded_rows(t, batch.size) is not None)
                                 for t, d in zip(outs, dims))
                             or rows_layout(args, outs, batch.size, LAYOUTS) != (1, False))
        carrying[module] = carrying.get(module, True) and ok
        if ok:
            folded.update(id(t) for t, d in zip(outs, dims) if d is None and folded_rows(t, batch.size) is not None)
        spreads = batch.size > 1 and any(d is not None for d in dims) and all(
            d is not None or (t.dim() > 0 and t.shape[0] == 1) for t, d in zip(outs, dims))
        spreading[module] = spreading.get(module, True) and spreads

    handles = [m.register_forward_hook(seen, with_kwargs=True) for m in model.modules()]
    try:
        with torch.enable_grad():
            batch.call(model)
    finally:
        for handle in handles:
            handle.remove()
    return {m for m, ok in carrying.items() if ok}, {m for m, ok in spreading.items() if ok and not carrying[m]}


def shares_inputs(call: Call) -> bool:
    """Whether some of the call's tensor inputs, or its one output, lead with a dim of 1: shared by the batch
    (a lookup of position ids ``(1, T)``; BART's decoder positions, looked up from ids ``(T,)`` next to the
    token ids ``(B, T)``, come out as ``(1, T, d)``)."""
    leading_one = [t for t in (*call.args, *call.kwargs.values(), *call.taps[:1]) if isinstance(t, Tensor)]
    return any(t.dim() > 0 and t.shape[0] == 1 for t in leading_one)


def spread(args: tuple, kwargs: dict, size: int) -> tuple[tuple, dict]:
    """The call's tensor inputs that lead with 1 expanded (without copy) to ``size`` along that dim."""

    def one(t: object) -> object:
        if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == 1:
            return t.expand(size, *t.shape[1:])
        return t

    return tuple(one(a) for a in args), {k: one(v) for k, v in kwargs.items()}


def spread_output(output: object, size: int) -> object:
    """A tensor output that still leads with 1 after its inputs were spread, expanded to ``size`` (a view),
    and so each such tensor of a tuple or list output: each sample's rows then carry that sample's
    sensitivity, which a generic rule reads per sample."""
    if isinstance(output, Tensor) and output.dim() > 0 and output.shape[0] == 1:
        return output.expand(size, *output.shape[1:])
    if type(output) in (tuple, list):
        return type(output)(spread_output(item, size) for item in output)
    return output


def same_output(spread_out: Tensor, shared_out: Tensor) -> bool:
    """Whether the model's output with shared inputs spread is the one without (rounding aside)."""
    if spread_out.shape != shared_out.shape:
        return False
    if not (spread_out.is_floating_point() or spread_out.is_complex()):
        return torch.equal(spread_out, shared_out)
    tol = 1e-10 if spread_out.dtype == torch.float64 else 1e-4
    return outputs_agree(spread_out, shared_out, tol, floor=1e-30)


def check_size(calls: list[tuple[Rule, Call]], size: int) -> int:
    """How many of a batch's ``size`` inputs the coverage check records: 2, or where a call of the batch's forward
    came sequence first with 2 positions, the fewest from 3 on that no such call has as many (its rows would read
    either way, :func:`rows_layout`); at most ``size``."""
    positions = {call.taps[0].shape[0] for _, call in calls if call.sequence_first and call.taps}
    return min(next((k for k in range(2, size + 2) if k not in positions), size), size)


def reads_either_way(call: Call) -> bool:
    """Whether the call's rows, read as they came (batch first), could as well come sequence first: its first input
    and every output lead with ``(size, size)``, ``size > 1`` (:func:`rows_layout` reads them batch first unless that
    layout was found wrong)."""
    a = call.args[0] if call.args else None
    return (call.layout is None and call.size > 1 and isinstance(a, Tensor) and a.dim() >= 3
            and a.shape[0] == a.shape[1] == call.size and bool(call.taps)
            and all(t.dim() >= 3 and t.shape[:2] == a.shape[:2] for t in call.taps))


def rows_layout(args: tuple, taps: list[Tensor], size: int, allowed: frozenset[str]) -> tuple[int, bool]:
    """How the call's first input and every output hold the batch's rows, among the ``allowed`` layouts:
    ``(1, True)`` where they come ``(T, size, ...)`` with ``T ≠ size`` (``"sequence_first"``), ``(k, False)``
    where they lead with ``size·k`` rows (``"folded"``, ``k > 1``), else ``(1, False)``.

    With ``T = size`` the shapes read either way: such a call is read batch first, unless sequence first is the one
    layout allowed (the layout the coverage check found the module's calls in, on a batch of another size).
    """
    a = args[0] if args else None
    if not isinstance(a, Tensor) or a.dim() < 2 or not taps:
        return 1, False
    sequence_first = ("sequence_first" in allowed and a.dim() >= 3 and a.shape[1] == size
                      and all(t.dim() >= 3 and t.shape[:2] == a.shape[:2] for t in taps))
    if a.shape[0] == size:
        return 1, sequence_first and allowed == {"sequence_first"}
    if sequence_first:
        return 1, True
    if ("folded" in allowed and a.shape[0] > size and a.shape[0] % size == 0
            and all(t.dim() >= 1 and t.shape[0] == a.shape[0] for t in taps)):
        return a.shape[0] // size, False
    return 1, False
