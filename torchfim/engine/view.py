"""The model as the engine sees it: a private module tree, its trainable parameters, its outputs.

:class:`ModelView` makes a structural copy of the user's module tree that shares every parameter,
buffer and attribute with it (:mod:`.private_tree`: only the module objects and their registries are
copied, and forwards set on an instance are rebound to the copy). The engine
records, hooks and swaps parameters (``torch.func.functional_call``) on that copy only, so a
training loop that runs the user's model in another thread never sees them. Each view reads the
parameters afresh.

Outputs are mapped to one flat vector per input: a tensor ``(B, C)``, or with positions
``(B, *positions, C)`` (``class_dim=1`` for ``(B, C, *positions)`` as ``cross_entropy`` takes them),
becomes ``(B, L·C)`` with ``L`` the number of positions, and ``(B,)`` becomes ``(B, 1)``; objects with
``.logits``, dicts with ``"logits"`` and the result of an ``output=`` callable are accepted
(:mod:`.output_reading`).
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from .._words import a_or_an, agreeing, counted
from ..errors import TorchfimError, output_hint, tensor_fields, warn_user
from ..families import Family
from ..families.positions import is_position_mask
from ..structures import Layout
from .batch import Batch, InputDtypes, input_dtype
from .derivative_settings import for_derivatives
from .fast_path_check import check_fast_path_agrees
from .function_forwards import function_forwards
from .labels import (
    PADDING_COUNTED,
    ModelLabels,
    check_mask_key,
    counted_padding,
    is_encoder_decoder,
    labelled_positions,
    problem_type_note,
    unread_targets_note,
)
from .model_checks import (
    ONE_DIMENSIONAL,
    check_forward_takes,
    check_in_memory,
    check_initialised,
    check_mode,
    check_not_distributed,
    check_not_scripted,
    mixes_samples,
    one_dimensional,
    watch_input_writes,
)
from .modules.recurrent import stepwise_candidates, stepwise_recurrent
from .native_dtype import autocast_enabled, native_dtype_forwards
from .output_compare import batching_tolerance, outputs_agree
from .output_reading import (
    ClassDim,
    OutputMap,
    as_columns,
    check_batch_rows,
    check_output_map,
    mapped_output,
    read_logits,
)
from .plain_forwards import differentiated_forwards, eager_compiled
from .private_tree import private_tree, users_modules_called

#: Serialises torchfim's computations: forward-mode AD levels are process-global in torch. A training
#: loop in another thread may hold it around its optimiser step, so that no computation sees the step.
ENGINE_LOCK = threading.RLock()
#: Why a computation stops when the weights move under it.
PARAMETERS_CHANGED = (
    "the model's parameters changed during the computation (an optimiser step in another thread? a forward "
    "that changes the model's own weights in place, as Hugging Face's RWKV rescales its layers on its first "
    "call in eval mode?), so the result would mix two sets of weights; hold torchfim.engine.ENGINE_LOCK "
    "around the training step, or compute between steps; for a model that changes itself once, call it once "
    "before"
)

#: Why outputs differ between forwards when a forward updates the model's buffers.
STATE_UPDATED = (
    "every forward of the model updates its {buffers} in place (a running average, a counter or another "
    "state kept in training mode), so each forward torchfim runs sees another model and per-sample Fisher "
    "terms are undefined; call model.eval() (or turn that update off) while torchfim computes"
)

#: Why outputs differ between two forwards of the same inputs.
RANDOM_FORWARD = (
    "the model's forward is random: two forwards of the same inputs gave different outputs (dropout forced "
    "on, as F.dropout(x, p, training=True) does whatever the mode, or noise drawn in the forward), so the "
    "outputs are not a function of the parameters and the Fisher is undefined; make the forward "
    "deterministic while torchfim computes (F.dropout(x, p, self.training) and model.eval(), or no noise)"
)

#: A forward that reaches the user's modules: their parameters are not the ones torchfim differentiates.
STALE_MODULES = (
    "the model's forward (or the output= function) calls {} of the model you passed, not of torchfim's "
    "private copy of it: the module is reached through an object the copy does not rebuild (something other "
    "than a submodule, a plain list, tuple or dict, a named tuple, a dataclass or a SimpleNamespace), so its "
    "parameters would get a wrong Fisher; hold it as a submodule (self.name = module), in an nn.ModuleList "
    "or nn.ModuleDict, or in one of those containers"
)


#: What :func:`fewer_inputs` adds where a guard failed: a program from torch.export fixes the batch size.
EXPORTED_BATCH = ("; a program from torch.export takes only the batch size it was exported with unless exported "
                  "with a dynamic batch dim, e.g. torch.export.export(model, (x,), dynamic_shapes=({0: "
                  "torch.export.Dim('batch')},))")


def _exported_guard(err: BaseException) -> bool:
    """Whether ``err`` is a program from torch.export refusing another batch size: its guard ("Guard failed"), or
    the input check of torch 2.3-2.4 ("Expected input at *args[0].shape[0] to be equal to 6, but got 2") or of
    torch 2.2 ("Input l_args_0_.shape[0] is specialized at 6")."""
    said = str(err)
    return ("Guard failed" in said or ("Expected input at" in said and "to be equal to" in said)
            or "is specialized at" in said)


@contextmanager
def fewer_inputs(size: int, batch: Batch) -> Iterator[None]:
    """While the block runs a forward on ``size`` of ``batch``'s inputs, a RuntimeError or AssertionError (an
    ``assert`` on the batch size, a guard of a program from ``torch.export``) becomes an error that says the
    forward must take any number of inputs (a batch size fixed in it), or, for 1-D inputs, that their first
    dimension is the batch (a single input passed without one ran as a batch of its entries)."""
    full = batch.size
    try:
        yield
    except (RuntimeError, AssertionError) as err:
        flat = one_dimensional(batch)
        if flat is not None:
            raise TorchfimError(ONE_DIMENSIONAL.format(
                shapes=flat, where=f" when called on {size} of their {full} entries")) from err
        raise TorchfimError(
            f"the model's forward ran on a mini-batch of {full} inputs but failed on {size} of them "
            f"({str(err).splitlines()[0][:160]}); torchfim also calls it on fewer inputs (to check that samples "
            "are independent, and on sub-batches where memory asks), so the forward must take any number of "
            "inputs: look for a batch size fixed in it, such as x.view(16, -1) where x.view(x.shape[0], -1) "
            "or x.flatten(1) is meant" + (EXPORTED_BATCH if _exported_guard(err) else "")
        ) from err


@contextmanager
def engine_session() -> Iterator[None]:
    """Hold :data:`ENGINE_LOCK` with ``torch.autocast`` switched off, the caller's and the forward's own
    (:func:`.native_dtype.native_dtype_forwards`: torchfim computes in the model's dtype, forwards, per-module rules
    and families alike), code compiled by ``torch.compile`` run eagerly (:func:`.eager_compiled`), and in
    :func:`.differentiated_forwards` (autograd whatever the caller's mode, activation checkpointing and
    offloading off, torch's notices of vmap's exact fallbacks off)."""
    with ENGINE_LOCK, differentiated_forwards(), native_dtype_forwards(), eager_compiled(), ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if autocast_enabled(device_type):  # entering a context costs more than asking (a monitor's window)
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield


Mask = Tensor | Callable[[Batch], Tensor] | str | None


def _classes(family: Family) -> bool:
    """Whether ``family`` (or the base of a product over positions) reads class labels, where -100 marks none."""
    return getattr(getattr(family, "base", family), "name", "") == "categorical"


def _buffer_states(tree: nn.Module) -> dict[str, tuple[int, int]]:
    """Each buffer's identity and version counter: a forward that updates one changes them."""
    return {name: (id(b), b._version) for name, b in tree.named_buffers()}

class ModelView:
    """A private view of ``model`` with its trainable parameters θ and its output mapping."""

    def __init__(self, model: nn.Module, output: OutputMap | None = None, class_dim: int | None = None,
                 eval_mode: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise TorchfimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        check_output_map(output)
        self.classes = ClassDim(class_dim)
        check_not_scripted(model)
        check_not_distributed(model)
        self.user_model = model
        self.model = private_tree(model)
        watch_input_writes(self.model)
        if eval_mode and self.model is not model:
            self.model.eval()  # the copy only: the user's flags stay (a training step in another thread)
        check_mode(self.model)
        for_derivatives(self.model)  # one weight for every forward (the user's u, v left as they are), dense grads
        check_initialised(self.model)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        if not named:
            raise TorchfimError(
                "the model has no parameters with requires_grad=True, so its Fisher is empty; "
                "enable gradients on the parameters you want (p.requires_grad_(True))"
            )
        first = named[0][1]
        if not first.is_floating_point():
            raise TorchfimError(f"the model's parameters must be floating point, got {first.dtype}")
        empty = [n for n, p in named if p.numel() == 0]
        if empty:
            raise TorchfimError(f"trainable parameters without entries (size 0): {', '.join(empty)}; they add nothing "
                                "to the Fisher: freeze them (p.requires_grad_(False))")
        self.layout = Layout.of(named, self.model)
        #: what floating-point inputs are cast to (as given, in a model of several dtypes, where of one of them)
        self.input_dtype: torch.dtype | InputDtypes = input_dtype(self.model, first.dtype)
        self.params = {n: p.detach() for n, p in named}
        self.index_of = {id(p): i for i, (_, p) in enumerate(named)}
        self.constants = {n: p.detach() for n, p in self.model.named_parameters() if not p.requires_grad}
        self.constants.update(dict(self.model.named_buffers()))
        check_in_memory({**self.params, **self.constants})
        self.output_map = output
        self.labels = ModelLabels(self.user_model)  # how its loss reads a batch's labels (asked when labels come)
        self._reach_checked = False  # whether a forward has been checked for modules of the user's tree
        self._fast_checked = False  # whether the outputs have been compared with torch's fast path's
        self._unobserved_named = False  # whether inputs with no observed position were named (once per view)
        self._padding_named = False  # whether padding counted as observed was named (once per view)
        self._unread_named = False  # whether class labels that do not fit the outputs were named (once per view)
        self._problem_checked = False  # whether an HF classifier's problem_type was compared with the family
        self._defaults: dict[str, object] | None = None  # see call_defaults
        self._call_checked = False  # see check_call
        self._recurrent = stepwise_candidates(self.model)  # computed step by step under torch.func

    def call_defaults(self) -> dict[str, object]:
        """Keyword inputs the engine passes where a batch does not set them (:func:`forward_defaults`)."""
        if self._defaults is None:
            self._defaults = forward_defaults(self.model)
        return self._defaults

    def check_call(self, batch: Batch) -> None:
        """Refuse, before any forward, a mini-batch that the model's forward cannot take as torchfim
        passes it (``model(x)`` for a tensor, ``model(**batch)`` for a dict); once per view."""
        if not self._call_checked:
            check_forward_takes(self.model, batch)
            self._call_checked = True

    def versions(self) -> list[int]:
        """The version counters of the trainable parameters (an in-place update increases them)."""
        return [p._version for p in self.params.values()]

    def check_unchanged(self, versions: list[int]) -> None:
        """Raise when a parameter was updated in place since ``versions`` were read."""
        if self.versions() != versions:
            raise TorchfimError(PARAMETERS_CHANGED)

    def check_independent_unmoved(self, batch: Batch, out: Tensor, checked: int, versions: list[int]) -> int:
        """:meth:`check_independent`, whose refusal first says so where the weights moved since ``versions`` were
        read (an optimiser step in another thread, a forward that rescales its own weights), not "mixes samples"."""
        try:
            return self.check_independent(batch, out, checked)
        except TorchfimError:
            self.check_unchanged(versions)
            raise

    @property
    def dtype(self) -> torch.dtype:
        return self.layout.dtype

    @property
    def device(self) -> torch.device:
        return self.layout.device

    # -------------------------------------------------------------- outputs
    def to_tensor(self, raw: object, batch: Batch | None = None) -> Tensor:
        """The model's raw output as a tensor: through ``output=``, ``.logits`` or ``["logits"]``; with ``batch`` (the
        inputs it came from), refused unless its first dim is their batch."""
        if self.output_map is not None:
            raw = mapped_output(self.output_map, raw)
            what = "the output= function"
        else:
            what = "the model"
        out = read_logits(raw)
        if not isinstance(out, Tensor):
            raise TorchfimError(
                f"{what} returned {a_or_an(type(raw).__name__)}{tensor_fields(raw)}, not a tensor of outputs; pass "
                f"{output_hint(raw)} (or whichever field holds the outputs), or wrap the model in a module that "
                "returns one tensor"
            )
        if not out.is_floating_point():
            raise TorchfimError(
                f"{what} returned a tensor of dtype {out.dtype}; the Fisher needs floating-point outputs "
                "(logits, means or log-rates), not class indices"
            )
        if out.dim() == 0:
            raise TorchfimError(
                f"{what} returned a single number; expected outputs of shape (batch, C), (batch, *positions, C) "
                "or (batch,) for one output per input: give the inputs a batch dimension and return one row "
                "of outputs per input"
            )
        if batch is not None:
            check_batch_rows(out, batch)
        return as_columns(out)

    def flat(self, out: Tensor) -> Tensor:
        """``(B, *positions, C)`` (or ``(B, C, *positions)`` with ``class_dim=1``) → ``(B, L·C)``."""
        out = self.classes.last(out, check=False)  # warned of by family_for, which knows whether it has classes
        return out.reshape(out.shape[0], -1)

    def family_for(self, shape: torch.Size, batch: Batch, family: Family, mask: Mask) -> Family:
        """The family of a batch's flat outputs: ``family`` itself, or its product over positions.

        ``shape`` is the output tensor's shape before flattening. The observed positions are those of
        ``mask`` that a class label does not leave out (-100, as in the loss: :func:`.labels.labelled_positions`).
        """
        if not self._problem_checked:
            self._problem_checked = True
            if (note := problem_type_note(self.user_model, getattr(family, "name", ""))) is not None:
                warn_user(note)
        self.classes.check(shape, _classes(family))
        positions = tuple(shape[2:]) if self.classes.dim == 1 and len(shape) > 2 else tuple(shape[1:-1])
        m = self._mask(batch, mask, positions)
        if _classes(family) and (note := unread_targets_note(batch.targets, tuple(shape), self.classes.dim,
                                                              self.classes.given)) and not self._unread_named:
            self._unread_named = True
            warn_user(note)
        labelled = labelled_positions(batch.targets, batch.size, positions) if _classes(family) else None
        if labelled is not None:
            labelled = labelled.to(self.device).reshape(batch.size, -1)
            m = labelled if m is None else m & labelled
        if m is not None:
            self._name_unobserved(m, batch.size)
        if positions and mask is None:
            self._name_padding(batch, positions, m)
        if not positions and m is None:
            return family
        from ..families.positions import Positions

        return Positions(family, positions or 1, m)  # no positions, a mask: one per input

    def _name_unobserved(self, m: Tensor, size: int) -> None:
        """Warn, once per view, where an input has no observed position at all."""
        if not self._unobserved_named and m.shape[1] and not bool(m.any(1).all()):
            self._unobserved_named = True
            empty = int((~m.any(1)).sum())
            warn_user(f"torchfim: {empty} of the {counted(size, 'input')} of a mini-batch "
                      f"{agreeing(empty, 'has', 'have')} no observed position (their "
                      "mask is False, or their class labels -100, everywhere): each counts in the mean over inputs with a Fisher of 0 (docs/math.md "
                      "§5.5); drop such inputs if they should not count")

    def _name_padding(self, batch: Batch, positions: tuple[int, ...], m: Tensor | None) -> None:
        """Warn, once per view, where a dict batch's ``attention_mask`` marks padding that counts as observed
        (no ``mask=``, and no label -100 there): the Fisher then sums over padding tokens too. An encoder-decoder's
        mask is its source's, not the outputs' positions."""
        if self._padding_named or is_encoder_decoder(self.user_model):
            return
        count = counted_padding(batch.kwargs.get("attention_mask"), (batch.size, *positions), m)
        if count:
            self._padding_named = True
            warn_user(PADDING_COUNTED.format(positions=counted(count, "padding position")))

    def _mask(self, batch: Batch, mask: Mask, positions: tuple[int, ...]) -> Tensor | None:
        if mask is None:
            return None
        if isinstance(mask, str):
            check_mask_key(self.user_model, mask)
            m = batch.get(mask)
        elif callable(mask) and not isinstance(mask, Tensor):
            m = mask(batch.args[0] if batch.args else batch.kwargs)
        else:
            m = mask
        if not is_position_mask(m):
            got = f"{m.dtype} values other than 0 and 1" if isinstance(m, Tensor) else type(m).__name__
            raise TorchfimError(f"the position mask must be a bool tensor (or 0/1 numbers) of shape (batch, *positions), "
                                f"True where a position is observed; got {got}")
        want = (batch.size, *positions)
        if tuple(m.shape) != want:
            fix = ("pass one boolean per input and position (True = observed, False = padding)" if positions else
                   "these outputs have no positions (one per input, as a sequence classifier's, whose model reads "
                   "its attention mask itself): drop mask=, or pass a (batch,) mask to leave out whole inputs")
            raise TorchfimError(
                f"the position mask has shape {tuple(m.shape)} but the outputs have (batch, *positions) = {want}; {fix}"
            )
        return m.to(device=self.device).bool().reshape(batch.size, -1)

    # ------------------------------------------------------------- forwards
    def functional(self, params: dict[str, Tensor], batch: Batch) -> Tensor:
        """Flat outputs ``(B, L·C)`` at parameters ``params`` (``torch.func.functional_call`` on the copy)."""
        from torch.func import functional_call

        with stepwise_recurrent(self._recurrent), function_forwards():
            raw = functional_call(self.model, {**self.constants, **params}, batch.args, batch.kwargs)
        return self.flat(self.to_tensor(raw))

    def outputs(self, batch: Batch) -> Tensor:
        """Outputs as a tensor (before flattening) at the current parameters, without autograd history."""
        with torch.no_grad():
            return self.to_tensor(batch.call(self.model))

    def check_independent(self, batch: Batch, out: Tensor, checked: int) -> int:
        """Raise when the batched outputs ``out`` of ``batch`` mix samples; returns samples checked so far.

        The last ``k`` samples of a batch, in reverse order, are run as a batch of their own and
        compared with their rows of ``out``: an operation across the batch (statistics over it, one
        sample broadcast to the others, a cumulative sum) sees other neighbours, another first row
        and another batch size there. ``k < batch.size`` (a one-sample forward on batches of two)
        and 4 samples in all, from the first batches of size ≥ 2, so one small forward per call.
        The first check also runs the first sample alone: the two groups share no sample, so a
        statistic that one sample decides (a maximum over the batch) differs in at least one of them.
        That forward also raises when it reaches a module of the user's tree instead of its copy
        (:func:`.private_tree.users_modules_called`); with batches of one input, a forward of the
        first is run for that alone.
        """
        self.check_fast_path(batch, out)
        if batch.size < 2 and not self._reach_checked:  # no forward below: one of the single input here
            self._reached(batch)
        if checked >= 4 or batch.size < 2:
            return checked
        take = min(batch.size - 1, 4 - checked)
        groups = [torch.arange(batch.size - 1, batch.size - 1 - take, -1, device=out.device)]
        if checked == 0:
            groups.append(torch.zeros(1, dtype=torch.long, device=out.device))
        for rows in groups:
            self._check_alone(batch, out, rows)
        return checked + take

    def check_fast_path(self, batch: Batch, out: Tensor, observed: Tensor | None = None) -> None:
        """Once per view: whether the outputs ``out`` of ``batch`` in the output numbers ``observed`` (all by default)
        are those of the model as torch runs it outside torchfim (:mod:`.fast_path_check`)."""
        if not self._fast_checked:
            self._fast_checked = True
            check_fast_path_agrees(self.model, batch, out, lambda raw: self.flat(self.to_tensor(raw)), observed)

    def _check_alone(self, batch: Batch, out: Tensor, rows: Tensor) -> None:
        """Raise unless ``batch``'s ``rows``, run as a batch of their own, give their rows of ``out``; the error names
        buffers the forward updated, a forward that is random, or else samples mixed."""
        before = _buffer_states(self.model)
        with fewer_inputs(len(rows), batch):
            alone = self.flat(self._reached(batch.rows(rows)))
        ref, alone = out[rows], alone.reshape(out[rows].shape)
        tol = batching_tolerance(self.model, ref)
        if not outputs_agree(alone, ref, tol, floor=1.0):
            updated = [n for n, state in _buffer_states(self.model).items() if before.get(n) != state]
            if updated:
                raise TorchfimError(STATE_UPDATED.format(
                    buffers=f"{agreeing(len(updated), 'buffer')} {', '.join(map(repr, updated))}"))
            again = self.flat(self._reached(batch.rows(rows))).reshape(alone.shape)
            if not outputs_agree(again, alone, tol, floor=1.0):  # two forwards of the same inputs differ
                raise TorchfimError(RANDOM_FORWARD)
            raise mixes_samples(self.model)

    def _reached(self, batch: Batch) -> object:
        """The copy's outputs on ``batch`` (no autograd), refused where its forward reaches a module of the
        user's tree instead of the copy's (:func:`.private_tree.users_modules_called`)."""
        with torch.no_grad(), users_modules_called(self.user_model) as stale:
            out = self.to_tensor(batch.call(self.model))
        self._reach_checked = True
        if stale:
            raise TorchfimError(STALE_MODULES.format(", ".join(repr(p or "the model") for p in stale)))
        return out

    # ------------------------------------------------------------ θ helpers
    def flatten_params(self, tensors: dict[str, Tensor] | list[Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors with ``lead`` leading dims into ``(*lead, P)``."""
        values = tensors.values() if isinstance(tensors, dict) else tensors
        return torch.cat([t.reshape(t.shape[:lead] + (-1,)) for t in values], dim=-1)


def forward_defaults(model: nn.Module) -> dict[str, object]:
    """``{"use_cache": False}`` for a model whose forward takes ``use_cache`` (Hugging Face's), else none.

    A Fisher needs no key-value cache (a model in eval mode builds one by default: memory for nothing),
    and a layer that a generic rule calls again on its recorded inputs must not find one to extend.
    """
    try:
        takes = "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature: pass nothing
        takes = False
    return {"use_cache": False} if takes else {}
