"""How :class:`~torchfim.train.FisherPenalty` calls the model: mini-batches in, one tensor of outputs out.

A mini-batch is one tensor ``(B, ...)``, called as ``model(x)``, or a dict of keyword inputs (a Hugging
Face mini-batch such as ``{"input_ids": ..., "attention_mask": ...}``), called as ``model(**x)``: its
tensors with ``B`` rows are per input, the others shared by the batch (e.g. position ids ``(1, T)``); its
target keys (``labels``) are passed to the model too, unlike :func:`torchfim.fisher`. Either becomes the
engine's :class:`~torchfim.engine.batch.Batch`.
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

from .._batches import refuse_packed
from ..engine.attention_kernel import math_attention
from ..engine.batch import Batch, input_dtype, make_batch
from ..engine.composites import reverse_mode_forms
from ..engine.eager_attention import eager_attention, refuse_non_finite, switchable_attention
from ..engine.function_forwards import attention_fast_path_off
from ..engine.labels import ModelLabels, check_mask_key, ignored_labels, is_encoder_decoder
from ..engine.model_checks import check_forward_takes, forward_error, inputs_unwritten
from ..engine.modules.recurrent import stepwise_candidates, stepwise_recurrent
from ..engine.output_reading import ClassDim, as_columns, check_batch_rows, check_output_map, mapped_output, read_logits
from ..errors import TorchfimError, warn_user
from .position_outputs import PositionOutputs, check_mask

__all__ = ["Inputs", "ModelIO"]

#: One tensor of inputs, or a dict of keyword inputs.
Inputs = Tensor | Mapping[str, Tensor]


class ModelIO:
    """The model's calls on a mini-batch, and the tensor of outputs the penalty reads (``output``).

    With ``composite``, the model's forwards run with layer norms and attention as compositions of
    elementary operations (:mod:`torchfim.engine.composites`): double backprop needs it, since torch
    has no double backward for its CPU flash attention and gets the one of ``layer_norm`` wrong under
    ``vmap``. Only the forwards: the mode costs a Python call per torch function while it is on.
    """

    def __init__(self, output: Callable[[object], Tensor] | None = None, composite: bool = False,
                 defaults: Mapping[str, object] | None = None, class_dim: int | None = None,
                 labels: ModelLabels | None = None) -> None:
        check_output_map(output)
        self.labels = labels  # how the model's loss reads a dict batch's labels (None: as given)
        self.output = output
        self.classes = ClassDim(class_dim)
        #: Keyword inputs every mini-batch gets unless it sets them (:func:`.engine.view.forward_defaults`).
        self.defaults = dict(defaults or {})
        self.forms: Callable[[], AbstractContextManager] = reverse_mode_forms if composite else nullcontext
        #: The forms of the per-input passes under ``vmap``: :attr:`forms`, or the composite ones from the first
        #: time the model's own could not be batched (:meth:`per_input_gradients`).
        self.vmapped_forms = self.forms
        self.looped = False  # whether per-input gradients are taken one input at a time (vmap failed)
        #: Whether the per-input passes run Hugging Face attention eagerly (:mod:`.engine.eager_attention`): from the
        #: first time ``vmap`` could not batch the model's own, where it has attention to switch.
        self.eager = False
        self._recurrent: tuple[nn.Module, list[nn.Module]] | None = None  # a model and its stepwise layers
        self._call_checked = False  # see call

    @property
    def vmapped_model(self) -> nn.Module | None:
        """The model of the last :meth:`input_log_prob` (None before the first)."""
        return None if self._recurrent is None else self._recurrent[0]

    # ------------------------------------------------------------ inputs
    def batch(self, inputs: object) -> Batch:
        """The mini-batch as the engine's :class:`Batch`, where it lies (targets kept as inputs, and the
        :attr:`defaults` it does not set); refuses what is neither a tensor nor a dict of tensors with a
        non-empty batch dim."""
        if isinstance(inputs, Tensor):
            if inputs.dim() == 0 or inputs.shape[0] == 0:
                raise TorchfimError(
                    f"inputs must be a non-empty batch (first dimension ≥ 1), got shape {tuple(inputs.shape)}")
        elif isinstance(inputs, Mapping):
            batched = [v for v in inputs.values() if isinstance(v, Tensor) and v.dim() > 0]
            if not batched or batched[0].shape[0] == 0:
                raise TorchfimError(
                    "a dict mini-batch needs tensors whose first dim is the batch (e.g. input_ids (B, T)), got "
                    f"keys {list(inputs)}"
                )
        else:
            refuse_packed(inputs)
            raise TorchfimError(
                f"FisherPenalty takes the mini-batch as a torch.Tensor (model(x)) or a dict of keyword inputs "
                f"(model(**batch)), got {type(inputs).__name__}"
            )
        return make_batch(inputs, None, None, None, keep_targets=True).with_defaults(self.defaults)

    @staticmethod
    def moved(batch: Batch, model: nn.Module, first: Tensor, rows: int | None = None) -> Batch:
        """The first ``rows`` inputs of ``batch`` (all when None) on ``first``'s device, floating tensors in
        its dtype, or as given where they are of a dtype of another of ``model``'s parameters
        (:func:`~torchfim.engine.batch.input_dtype`; cut first, so that only those rows move)."""
        return leading_rows(batch, rows).to(first.device, input_dtype(model, first.dtype))

    def prepare(self, inputs: object, model: nn.Module, first: Tensor, rows: int | None = None) -> Batch:
        """:meth:`batch` then :meth:`moved`."""
        return self.moved(self.batch(inputs), model, first, rows)

    def mask(self, mask: object, x: Batch) -> Tensor | None:
        """The position mask of a call: a bool tensor with one row per input, from a tensor or a key of the
        dict mini-batch ``x`` (None: every position); an encoder-decoder's ``attention_mask`` (its source's) refused."""
        if mask is None:
            return None
        if self.labels is not None:
            check_mask_key(self.labels.model, mask)
        return check_mask(x.get(mask) if isinstance(mask, str) else mask, x.size)

    def labelled(self, x: Batch) -> Tensor | None:
        """Where the batch's class labels (a dict's ``labels``, aligned as the model's loss aligns them) hold one:
        False at -100, which the loss leaves out, so the penalty's draws leave those positions out too, as
        :func:`torchfim.fisher` does; None where no label is -100 (or the batch brings none)."""
        ignored = ignored_labels(x.targets if self.labels is None else self.labels.aligned(x.targets))
        return None if ignored is None else ~ignored

    def padding(self, x: Batch, mask: Tensor | None) -> Tensor | None:
        """The batch's ``attention_mask`` where no ``mask`` was given and the model is not an encoder-decoder (whose
        mask is its source's), for the warning of padding counted as observed; else None."""
        if mask is not None or (self.labels is not None and is_encoder_decoder(self.labels.model)):
            return None
        padding = x.kwargs.get("attention_mask")
        return padding if isinstance(padding, Tensor) else None

    # ------------------------------------------------------------ calls
    def call(self, model: nn.Module, x: Batch, differentiated_twice: bool = True) -> object:
        """The model's output on the mini-batch, as the model returns it (in the composite forms where
        it will be ``differentiated_twice`` and they are on); the first call checks that the forward takes
        the mini-batch (:func:`.engine.model_checks.check_forward_takes`); a forward that fails on integer or
        1-D inputs, or on inputs a layer does not take, says so (:func:`.engine.model_checks.forward_error`)."""
        first = not self._call_checked
        if first:
            check_forward_takes(model, x)
            self._call_checked = True
        with self.forms() if differentiated_twice else nullcontext(), \
                inputs_unwritten(model, x.args, x.kwargs) if first else nullcontext():
            try:  # the training forward as it runs (not Batch.call's): its gradient hooks are the task loss's too
                return model(*x.args, **x.kwargs)
            except (RuntimeError, IndexError, ValueError) as err:
                clear = err if isinstance(err, TorchfimError) else forward_error(
                    x, input_dtype(model, next(model.parameters()).dtype), err)
                if clear is err:
                    raise
                raise clear from err

    def tensor(self, out: object, x: Batch) -> Tensor:
        """The tensor of outputs the penalty reads from the mini-batch ``x``: ``output(out)``, or
        ``out`` itself, ``out.logits`` or ``out["logits"]``, ``(batch,)`` as ``(batch, 1)``, classes moved last
        where ``class_dim=1``; refused when its first dim is not the batch (anything else is left to the family
        to refuse, with its fix)."""
        out = mapped_output(self.output, out) if self.output is not None else read_logits(out)
        if isinstance(out, Tensor):
            check_batch_rows(out, x)
        out = as_columns(out)
        return self.classes.last(out) if isinstance(out, Tensor) else out

    def outputs(self, model: nn.Module, x: Batch, differentiated_twice: bool = True) -> Tensor:
        """The tensor of outputs of the model on the mini-batch."""
        return self.tensor(self.call(model, x, differentiated_twice), x)

    def label_outputs(self, model: nn.Module, x: Batch, graph: bool = False) -> Tensor:
        """The outputs to draw labels from, without autograd (with its graph where ``graph``), as the differentiated
        forward computes them: attention takes no fast path there
        (:func:`torchfim.engine.function_forwards.attention_fast_path_off`; a transformer encoder in eval mode would
        give padded positions zeros)."""
        with torch.enable_grad() if graph else torch.no_grad(), attention_fast_path_off():
            return self.outputs(model, x, differentiated_twice=False)

    def input_log_prob(self, model: nn.Module, family: PositionOutputs, x: Batch
                       ) -> Callable[[dict[str, Tensor], tuple, Tensor, Tensor | None], Tensor]:
        """``(params, (args₁, kwargs₁), y₁, m₁) ↦ log p(y₁|x₁)`` of one input of ``x`` at the parameters
        ``params``, summed over its observed positions (``m₁`` its row of the mask, or None), under
        ``vmap`` over the inputs (as :meth:`per_input_gradients` calls it): what ``kind="trace"``
        differentiates per input."""

        if self._recurrent is None or self._recurrent[0] is not model:  # found once per model, not per step
            self._recurrent = (model, stepwise_candidates(model))
        recurrent = self._recurrent[1]  # step by step: vmap has no rules for the fused kernels

        module, prefix = inner_module(model)

        def log_p(params: dict[str, Tensor], sample: tuple, y1: Tensor, m1: Tensor | None) -> Tensor:
            single = x.one_sample(*sample)
            params = {k.removeprefix(prefix): v for k, v in params.items()}
            with self.vmapped_forms(), stepwise_recurrent(recurrent), attention_fast_path_off():
                out = self.tensor(functional_call(module, params, single.args, single.kwargs), single)
            return family.log_prob_of_one(out, y1.unsqueeze(0), m1)

        return log_p

    def per_input_gradients(self, log_p: Callable, params: dict[str, Tensor], params_dim: int | None, x: Batch,
                            y: Tensor, masks: Tensor | None) -> dict[str, Tensor]:
        """``vmap(grad(log_p))`` over the inputs of ``x``, their labels ``y`` and mask rows ``masks``, at
        ``params`` (per input too where ``params_dim`` is 0): per-input gradients. Where torch.func cannot
        batch the model's own forms, it tries the composite ones (:func:`.engine.composites.reverse_mode_forms`;
        ``layer_norm`` under autocast has no batched backward), and where it cannot batch those either (BERT's
        padding mask, a custom autograd function without ``setup_context``), they are taken one input at a
        time by autograd from then on, with a one-time warning: differentiable in ``params`` where those
        require grad (double backprop)."""
        dims = x.sample_dims()
        while not self.looped:
            in_dims = (params_dim, dims, 0, None if masks is None else 0)
            eager = eager_attention(self.vmapped_model) if self.eager and self.vmapped_model is not None else nullcontext()
            try:  # the math attention kernel has batching rules; the fused CPU ones run sample by sample, warning
                with math_attention(), eager:
                    grads = vmap(grad(log_p), in_dims=in_dims)(params, (x.args, x.kwargs), y, masks)
                refuse_non_finite(grads, self.eager)
                return grads
            except (RuntimeError, NotImplementedError) as err:
                if self.vmapped_forms is not reverse_mode_forms:  # layer_norm under autocast has no batched backward
                    self.vmapped_forms = reverse_mode_forms
                    continue
                if not self.eager and self.vmapped_model is not None and switchable_attention(self.vmapped_model):
                    self.eager = True  # a Hugging Face SDPA mask asks whether the padding mask is all ones
                    continue
                self.looped = True
                warn_user(
                    f"torchfim: torch.func cannot vmap the model over its inputs ({str(err).splitlines()[0][:120]}); "
                    "kind='trace' takes its per-input gradients one input at a time, which is correct but slower "
                    "(kind='batch_gradient' needs none)"
                )
        rows = []
        for i in range(x.size):
            at = params if params_dim is None else {k: v[i] for k, v in params.items()}
            rows.append(_autograd_gradient(log_p, at, x.sample_at(i, dims), y[i], None if masks is None else masks[i]))
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _autograd_gradient(log_p: Callable, params: dict[str, Tensor], *sample: object) -> dict[str, Tensor]:
    """``∇ log_p(params, *sample)`` by autograd: with a graph where ``params`` require grad (so that the
    penalty's gradient can differentiate it again), else at leaves of their values."""
    twice = any(p.requires_grad for p in params.values())
    leaves = params if twice else {k: p.detach().requires_grad_() for k, p in params.items()}
    with torch.enable_grad():
        value = log_p(leaves, *sample)
        grads = torch.autograd.grad(value, list(leaves.values()), create_graph=twice, allow_unused=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(leaves.items(), grads)}


def inner_module(model: nn.Module) -> tuple[nn.Module, str]:
    """The module inside ``nn.DataParallel`` / ``DistributedDataParallel`` wrappers (through several), and the prefix
    its parameter names lack. The penalty's own passes run it: torch's stateless calls refuse DataParallel, and a
    DistributedDataParallel forward with a graph would hand DDP that pass's outputs as the last forward's, to search
    for the parameters the caller's backward reaches (finding none on the finite difference's detached ones)."""
    module, prefix = model, ""
    while isinstance(module, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        module, prefix = module.module, prefix + "module."
    return module, prefix


def leading_rows(batch: Batch, rows: int | None) -> Batch:
    """The first ``rows`` inputs of ``batch`` (the batch itself where that is all of them or None)."""
    return batch if rows is None or rows >= batch.size else batch.rows(slice(0, rows))
