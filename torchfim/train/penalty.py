"""``FisherPenalty``: the Fisher penalty of Jastrzębski et al. (2021) as a term to add to a loss.

Two penalties on a mini-batch ``x_1..x_B`` with labels ``ŷᵢ ~ p(·|xᵢ)`` drawn from the model
(one per input, from detached outputs, so the labels are constants) and per-input scores
``gᵢ = ∇_θ log p(ŷᵢ|xᵢ)``:

* ``kind="batch_gradient"`` (the paper's Eq. 3): ``α ‖(1/B) Σᵢ gᵢ‖²``, the squared norm of the
  gradient of the batch-mean negative log-likelihood on the sampled labels. Because
  ``E_ŷ[gᵢ] = 0`` and the labels are independent, the cross terms vanish in expectation and
  ``E_ŷ[value] = α · (1/B) · (1/B) Σᵢ tr I(θ|xᵢ) = α · Tr(F_batch) / B`` (paper digest §1.5): the
  value is an unbiased estimate of ``α·Tr(F)/B``, so α must be re-tuned when B changes.
* ``kind="trace"``: ``α (1/B) Σᵢ ‖gᵢ‖²``, α times the unbiased estimate of ``Tr(F)`` on the batch
  (the paper's per-example variant, Eq. 6, averaged over the batch). It needs per-sample
  gradients (``torch.func.vmap`` of ``grad``; one input at a time, with a warning, where vmap cannot
  batch the model), so the model must treat samples independently.

The gradient is taken with respect to the model's trainable parameters (``requires_grad=True``,
``model.parameters()`` order), either exactly by double backprop (``grad_method="exact"``) or by
a forward difference of gradients (``grad_method="finite_difference"``, see
:mod:`torchfim.train.finite_difference`), which needs no higher-order graph.

A model compiled by ``torch.compile`` runs compiled in the finite difference of
``kind="batch_gradient"``, which differentiates it once, as a training step does. Double backprop and
per-sample gradients cannot run compiled code (AOTAutograd's backward cannot be differentiated again, and
torch.func cannot transform dynamo's frames), so the other penalties' computing steps run it eagerly (with
a warning; steps that reuse the cached gradient run it compiled). So does the forward at ``θ + ε ĝ`` of
:meth:`~FisherPenalty.penalised_loss`'s computing steps with a cache (``every > 1``): its graph is back-propagated
twice, which a compiled backward that donates its buffers (inductor's) refuses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import ExitStack

import torch
from torch import Tensor, nn

from ..engine.batch import detached
from ..engine.derivative_settings import has_module_backward_hooks
from ..engine.kept_buffers import private_buffers
from ..engine.labels import ModelLabels
from ..engine.model_checks import check_not_scripted
from ..engine.plain_forwards import refuse_func_transforms
from ..engine.private_tree import SLOTS_LOCK
from ..engine.view import forward_defaults
from ..errors import TorchfimError, check_choice
from ..families import Family, get_family
from ..keyword_hints import explains_keywords
from .arguments import check_alpha, check_int, check_step, trainable
from .computing_passes import computing_passes
from .finite_difference import GRAD_METHODS, check_fd_step
from .forward_precision import ForwardPrecision
from .kept_gradient import KeptGradient
from .model_io import Inputs, ModelIO
from .parameter_stamp import stamp
from .penalised_arguments import check_task_loss, penalised_parameters, running_module, scalar_task_loss
from .penalty_schedule import COMPUTE, REUSE, ZERO, Schedule
from .penalty_state import PenaltyState
from .penalty_terms import PenaltyTerms
from .position_outputs import PositionOutputs
from .step_draws import StepDraws
from .surrogate import OnBackward, zero_term

KINDS = ("batch_gradient", "trace")


class FisherPenalty(PenaltyState, PenaltyTerms):
    """A Fisher penalty to add to the task loss in a plain PyTorch training loop.

    ``pen(inputs, step=step)`` returns a 0-dim tensor (on the model's device, in its dtype; for a model of several
    dtypes, in one of them) whose gradient w.r.t. the model's trainable parameters is the penalty's gradient:

    * ``kind="batch_gradient"`` (default; Jastrzębski et al. 2021, Eq. 3):
      ``α ‖∇_θ (1/B) Σᵢ −log p(ŷᵢ|xᵢ)‖²``. Its expectation over the sampled labels is
      ``α·Tr(F)/B``, with ``Tr(F)`` the trace of the mean Fisher over the B inputs used.
    * ``kind="trace"``: ``α (1/B) Σᵢ ‖∇_θ log p(ŷᵢ|xᵢ)‖²``, whose expectation is ``α·Tr(F)``.

    Labels ``ŷᵢ`` are drawn once per computed step, one per input, by a single call
    ``family.sample(o.detach(), 1, generator)`` on the outputs ``o`` of the inputs used (the first
    ``sub_batch`` ones); so a ``torch.Generator`` seeded identically reproduces them.

    Schedule (``every = T``): on steps with ``step % T == 0`` the penalty is computed; its value is
    the returned value and its gradient the returned gradient. On other steps, with
    ``reuse_between=True`` (the paper computes every 10 steps and reuses the most recent gradient),
    the term is the linear surrogate ``Σ_p ⟨c_p, θ_p⟩ − Σ_p ⟨c_p, θ_p⟩|_detached + v`` built from the
    cached gradient ``c`` and value ``v`` of the last computed step (the mean over its calls when several
    micro-batches of gradient accumulation share it, :mod:`.kept_gradient`): its value is ``v`` and its
    gradient w.r.t. each parameter is exactly ``c_p``. Its value is ``v`` at any θ, so a line search that compares
    values (L-BFGS with ``line_search_fn="strong_wolfe"``) sees values that do not move beside slopes that do: use
    ``every=1`` there. Where the model's trainable parameters are no longer the tensors ``c`` was kept for (a layer
    replaced, a parameter frozen or unfrozen since), the penalty is computed afresh instead, with a warning; step
    numbers that keep missing the multiples of ``every`` are named by a warning (:mod:`.penalty_schedule`). The
    gradient goes to the model's own parameters (``model.parameters()``) that its graph reaches (:mod:`.reached`): one
    its forward never uses gets none, as in plain training, nor do tensors trained outside it
    (``torch.func.functional_call`` with a dict of other tensors), nor a graph its inputs carry (the features of a
    trunk outside the penalised module: the task loss of :meth:`penalised_loss` back-propagates into it, the penalty,
    taken then on a forward of its own, does not). Before any step has been computed, and on
    every skipped step with ``reuse_between=False``, the term is exactly 0, which back-propagates and reaches no
    parameter. When ``every > 1`` and ``reuse_between=True``, the gradient of a
    computed step is taken inside the call (to cache it) and the returned tensor is that same
    surrogate: value and parameter gradient are the penalty's, but it carries no higher-order
    graph; the gradient is kept when the term is back-propagated (once, whatever the incoming gradient), so a
    term never back-propagated (the penalty of a validation batch, logged with gradients on: safe, in any mode)
    leaves ``c``, ``v``, ``last_value`` and ``last_step`` as they were. Otherwise the returned tensor is the
    penalty itself, with its double-backprop graph.

    Gradient (``grad_method``): ``"exact"`` differentiates through ``g`` (double backprop), which needs a
    second derivative of every operation of the model; the first computed step takes that gradient once
    (one more backward) to refuse, with the fix, a model with an operation that has none in torch
    (``nn.EmbeddingBag(mode="max")``) before the caller's backward meets it. For
    ``"finite_difference"`` the gradient ``2α H g`` of ``α‖g‖²`` (``g = ∇_θ L`` of the sampled-label
    NLL ``L``, ``H = ∇²_θ L``) is the forward difference ``2α (∇L(θ + ε ĝ) − ∇L(θ))‖g‖/ε`` along
    ``ĝ = g/‖g‖``, with the same inputs and labels, and ``ε = fd_step`` or by default
    ``0.1·√eps_dtype·(1 + ‖θ‖)``; ``kind="trace"`` does the same per input, ``(2α/B) Σᵢ Hᵢgᵢ``
    with ``Hᵢ gᵢ ≈ (gᵢ(θ + ε ĝᵢ) − gᵢ(θ))‖gᵢ‖/ε``; ``eps_dtype`` is that of the precision the passes
    compute in, autocast's included. Its relative error is about ``1e-7`` in float64 (``5e-7`` measured for ``kind="trace"``; up to ``2e-5`` through
    InstanceNorm, BatchNorm in training mode or attention, measured against central differences) and ``1e-3`` in
    float32 with smooth activations, and with ReLU-type and max-pooling modules, whose kinks the second pass
    keeps on the first pass's side (:mod:`.kink_replay`; kinks of functions such as ``F.relu``, and ``kind="trace"``
    on any kink, can leave it off by more than the gradient's size in float32: :mod:`.finite_difference`), and
    coarse in half precision, by a model-dependent amount (on a
    small MLP 7-17 % in bfloat16 and 3-5 % in float16, on a one-layer GPT-2 100-120 % and 61-81 %; named by a
    warning); it
    costs one extra forward and backward and no higher-order graph, and it works where an operation of the
    model has no double-backward formula. With ``kind="batch_gradient"`` as a separate term,
    ``loss + pen(x)``, it is a little cheaper than double backprop (2F + 3B against the plain step's F + B:
    3.0-3.5× a plain SGD step on the benchmark MLP, 3.4-3.7× for double backprop, in docs/performance.md's runs of 2-6
    December); :meth:`penalised_loss` shares the forward at ``θ + ε ĝ`` with the task loss and needs two forwards and two backwards (measured 2.3-3.0×,
    where two plain passes cost 1.8×), so use it in a training loop. With ``kind="trace"`` it is slower (every
    input moves its own copy of the parameters: 1.7× the exact per-input double backprop), so use it there only
    for models without double backward.
    The returned tensor then always has the value ``α‖g‖²`` (resp. the trace value) and exactly that
    gradient, and no graph beyond it. The parameters are never modified in place. Where an optimiser evaluates a
    step again at parameters it moved in place (a closure, as L-BFGS's line search calls it), the calls draw the
    random numbers of the step's first evaluation (:mod:`.step_draws`): within a step the penalty is one function.

    ``pen.penalised_loss(inputs, task_loss, step=step)`` returns ``task_loss(model(inputs))`` plus
    this term from one shared forward pass (see :meth:`penalised_loss`); ``pen(inputs, step=step)``
    runs its own forward pass on the inputs in the model's current mode. With
    ``kind="batch_gradient"`` any model works (in train mode, BatchNorm statistics of that pass
    are those of the batch and its running statistics are updated once, as by any forward pass;
    the finite difference's second pass replays the first one's random numbers, so Dropout masks
    agree, and updates no buffer: spectral norm's power iteration is paused there, so both passes
    divide by the same ``σ``). ``kind="trace"`` needs per-sample gradients, so it refuses
    BatchNorm or Dropout in training mode (call ``model.eval()`` or use ``kind="batch_gradient"``).
    The penalty is computed with gradients enabled even inside ``torch.no_grad()``, so the value it returns is
    right there too. A call with gradients off (``torch.no_grad()``, ``torch.inference_mode()``: no training step
    can back-propagate it) is taken as an evaluation, of a validation batch say: it returns the penalty of its
    inputs and leaves the penalty as it found it (the kept gradient, the step's draws, ``last_value``,
    ``last_step`` and its own generator), so the training run and its checkpoints go on as without it. With gradients
    on, a call whose term is never back-propagated (a penalty logged) leaves the kept gradient, ``last_value`` and
    ``last_step`` alone too, but draws its labels from the generator as any call does. The caller's backward hooks
    (``weight.register_hook``, a module's ``register_full_backward_hook``) do not run in its own differentiations:
    value and gradient are the model's without them, and the hooks act on the gradient the caller back-propagates
    (module hooks on the task loss's; with them, :meth:`penalised_loss` takes the penalty on a forward of its own).

    Outputs with positions, ``(B, *pos, C)`` (a language model's logits): each position is an observation
    of ``family`` given the input, labels are drawn per position and an input's NLL sums over its
    positions (:mod:`torchfim.train.position_outputs`, which also says how to get a per-token mean);
    ``mask`` ``(B, *pos)``, passed to each call, drops padding (both kinds); on outputs ``(B, C)`` a
    ``(B,)`` mask is one position per input, as in :func:`torchfim.fisher`: an input marked False adds
    nothing and still counts in the mean over the ``B`` inputs.

    Mini-batches are one tensor (``model(x)``) or a dict of keyword inputs (``model(**batch)``, a Hugging
    Face batch; ``mask="attention_mask"`` then names the mask in it); the penalty reads the outputs
    through ``output=``, or as the tensor, ``.logits`` or ``["logits"]`` the model returns
    (:mod:`torchfim.train.model_io`).

    Args:
        model: the network, mapping a batch of inputs to outputs ``(B, C)`` or ``(B, *pos, C)``.
        family: output family name or :class:`~torchfim.families.Family`.
        alpha: penalty coefficient α ≥ 0.
        every: compute the penalty on steps ``step % every == 0``.
        reuse_between: on other steps, reuse the cached gradient (True) or add nothing (False).
        sub_batch: use only the first ``sub_batch`` inputs of each batch (all of them when None or
            when the batch is smaller).
        kind: ``"batch_gradient"`` or ``"trace"`` (see above).
        generator: ``torch.Generator`` for the labels (torch's global RNG when None, like dropout).
        grad_method: ``"exact"`` (double backprop) or ``"finite_difference"`` (see above).
        fd_step: the finite-difference step ε (a length in parameter space), or None for
            ``0.1·√eps_dtype·(1 + ‖θ‖)``; only with ``grad_method="finite_difference"``.
        output: a function of the model's output returning the tensor of outputs, e.g.
            ``lambda out: out[0]`` (None: the output itself, its ``.logits`` or ``["logits"]``).
        class_dim: ``-1`` when the classes are last, ``(B, *pos, C)``; ``1`` for ``(B, C, *pos)`` as
            ``F.cross_entropy`` takes them (a segmentation model's); None as in :func:`torchfim.fisher`.

    Attributes:
        last_value: detached 0-dim tensor, the most recently *computed* penalty value (α included; None
            before the first computed step). With a cache (``every > 1``, ``reuse_between=True``) it is the
            value reused between computed steps, the mean over the computed step's back-propagated calls (its
            micro-batches), as ``c``; otherwise the last call's, one micro-batch's under gradient accumulation: log
            the mean of the calls' returned values for the step's. ``float(pen.last_value)`` for a number.
        last_step: the step at which ``last_value`` was computed (None before).

    Example:
        >>> import torch, torchfim.train
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <torch._C.Generator object at ...>
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> pen = torchfim.train.FisherPenalty(model, alpha=0.01, every=10,
        ...                                    generator=torch.Generator().manual_seed(0))
        >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
        >>> for step in range(20):
        ...     opt.zero_grad()
        ...     term = pen(x, step=step)
        ...     loss = torch.nn.functional.cross_entropy(model(x), y) + term
        ...     loss.backward()
        ...     opt.step()
        >>> pen.last_step, pen.last_value.shape, bool(pen.last_value >= 0)
        (10, torch.Size([]), True)
        >>> fd = torchfim.train.FisherPenalty(model, alpha=0.01, grad_method="finite_difference")
        >>> for step in range(3):  # the task loss and the penalty from one shared forward pass
        ...     opt.zero_grad()
        ...     fd.penalised_loss(x, lambda out: torch.nn.functional.cross_entropy(out, y), step=step).backward()
        ...     opt.step()
        >>> fd.last_step
        2
        >>> grads = {}
        >>> for method in ("exact", "finite_difference"):  # the same labels: the same seed
        ...     term = torchfim.train.FisherPenalty(model, alpha=0.01, grad_method=method,
        ...                                         generator=torch.Generator().manual_seed(1))(x, step=0)
        ...     grads[method] = torch.cat([g.flatten() for g in torch.autograd.grad(term, list(model.parameters()))])
        >>> bool((grads["finite_difference"] - grads["exact"]).norm() < 0.05 * grads["exact"].norm())
        True
    """

    @explains_keywords
    def __init__(
        self,
        model: nn.Module,
        family: str | Family = "categorical",
        alpha: float = 0.1,
        every: int = 1,
        reuse_between: bool = True,
        sub_batch: int | None = None,
        kind: str = "batch_gradient",
        generator: torch.Generator | None = None,
        grad_method: str = "exact",
        fd_step: float | None = None,
        output: Callable[[object], Tensor] | None = None,
        class_dim: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TorchfimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.family = PositionOutputs(get_family(family))
        self.alpha = check_alpha(alpha)
        self.every = check_int("every", every, 1, "pass every=1 to compute the penalty on every step")
        if not isinstance(reuse_between, bool):
            raise TorchfimError(f"reuse_between must be True or False, got {reuse_between!r}")
        self.reuse_between = reuse_between
        if sub_batch is not None:
            check_int("sub_batch", sub_batch, 1, "pass the number of leading inputs to use, or None for all")
        self.sub_batch = sub_batch
        self.kind = check_choice("kind", kind, KINDS)
        if self.kind == "trace":  # per-sample gradients call the model with other parameters (torch.func)
            check_not_scripted(model)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TorchfimError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.grad_method = check_choice("grad_method", grad_method, GRAD_METHODS)
        self.fd_step = check_fd_step(fd_step, self.grad_method)
        self.io = ModelIO(output, composite=self.grad_method == "exact", defaults=forward_defaults(model),
                          class_dim=class_dim, labels=ModelLabels(model))
        self.io.classes.categorical = self.family.base.name == "categorical"  # the class_dim warning's concern
        penalised_parameters(model, every_module=True)  # fail early: nothing to penalise, or FSDP's
        self.last_value: Tensor | None = None
        self.last_step: int | None = None
        self._kept, self._draws = KeptGradient(), StepDraws()
        self._schedule = Schedule(self.every, self.reuse_between)
        self._second_derivatives_checked = self._precision_named = self._evaluating = self._kinks_named = False
        self._forward_precision = ForwardPrecision()  # the dtypes its forward casts down to (finite difference)

    def __repr__(self) -> str:
        return (f"FisherPenalty(kind={self.kind!r}, family={self.family!r}, alpha={self.alpha}, every={self.every}, "
                f"reuse_between={self.reuse_between}, sub_batch={self.sub_batch}, grad_method={self.grad_method!r})")

    # ------------------------------------------------------------------ call
    def __call__(self, inputs: Inputs, step: int | None = None, mask: Tensor | str | None = None) -> Tensor:
        """The penalty term for this training step (see the class docstring); ``mask`` ``(B, *pos)``, or
        the key of one in a dict mini-batch, marks the observed positions of outputs with positions
        (padding False); ``(B,)`` on outputs without positions marks the observed inputs."""
        step = check_step(step)
        with self._kept_unless_training():
            decision = self._decide(step)
            if decision == REUSE:
                return self._surrogate(self._kept.params, self._kept.grads, self._kept.value)
            names, params = penalised_parameters(self.model)
            if decision == ZERO:
                return zero_term(params[0].dtype, params[0].device)
            return self._computed_call(inputs, step, mask, names, params)

    def _computed_call(self, inputs: Inputs, step: int, mask: Tensor | str | None, names: list[str],
                       params: list[Tensor]) -> Tensor:
        """A call that computes the penalty on its own forward (:meth:`__call__`)."""
        first = params[0]
        # Detached: the penalty's gradient goes to the model's parameters only, never into a graph the inputs carry.
        whole = self.io.batch(inputs).map(detached)  # checks the inputs, then the mask against them
        mask = self.io.mask(mask, whole)
        x = self.io.moved(whole, self.model, first, self.sub_batch)
        keep = self._keeper(step, params, x.size)
        with self.family.masked(mask, x.size, self.io.labelled(whole), self.io.padding(whole, mask)), \
                self._forwards(step, params):
            if self.grad_method == "finite_difference":
                value, grads = self._finite_difference(x, names, params)
            else:
                if self.kind == "batch_gradient":
                    value = self._batch_gradient(self.io.outputs(self.model, x), params)
                else:
                    value = self._trace(x, names, params)
                grads = self._double_backprop(value, params, keep is not None, retain=False)
            if keep is None:
                self._computed(step, value.detach(), x.size)
            return value if grads is None else self._surrogate(params, grads, value.detach(), keep)

    def penalised_loss(self, inputs: Inputs, task_loss: Callable[[object], Tensor], step: int | None = None,
                       mask: Tensor | str | None = None, model: nn.Module | None = None) -> Tensor:
        """The task loss plus the penalty from one shared forward pass: ``task_loss(outputs) + term``.

        ``task_loss`` maps the model's outputs on the whole batch ``inputs`` to the scalar task
        loss (e.g. ``lambda out: F.cross_entropy(out, y)``); the penalty (with its schedule,
        labels, value and gradient as for ``pen(inputs, step=step)``, see the class docstring) is
        taken on the first ``sub_batch`` rows of those same outputs, so this method runs the model
        instead of the caller, and the caller does ``loss.backward()`` on the result. For a model
        that treats samples independently the penalty is the one ``pen(inputs, step=step)`` gives
        (same labels from the same generator); with BatchNorm in training mode its batch
        statistics are those of the whole batch. ``model`` is the module to run instead of the
        penalty's own: a wrapper holding the same trainable parameters, such as the
        ``DistributedDataParallel`` module (a ``Trainer``'s ``compute_loss`` receives it), whose
        forwards alone make the processes average their gradients (:mod:`.penalised_arguments`). ``mask``
        is that of ``pen(inputs, step=step, mask=mask)``: a ``(B, *pos)`` tensor, or the key of one in a dict
        mini-batch (``"attention_mask"``), True at the observed positions; it leaves padding out of the penalty
        only, and ``task_loss`` handles its own.

        * Steps that compute the penalty, ``grad_method="finite_difference"``,
          ``kind="batch_gradient"``: pass 1 at θ (forward, labels ŷ, ``g = ∇L(θ)`` by one backward
          without a graph); pass 2 is the one forward at ``θ' = θ + ε ĝ`` (the model with the
          parameters ``p + (ε/‖g‖) g_p`` in their slots, differentiable in ``p``), returning
          ``task_loss(o') + c·(L(θ') − L(θ')|detached) + S`` with ``c = 2α‖g‖/ε`` and ``S`` of
          value ``α‖g‖²`` and gradient ``−c·g`` (carried by the node that shifts the parameters,
          and scaled with the loss, e.g. by a gradient scaler). The caller's backward gives
          ``∇task(θ') + 2α (∇L(θ') − ∇L(θ))‖g‖/ε``: the penalty's forward-difference gradient
          (as ``pen(x)``) plus the task gradient taken at θ' instead of θ. That costs
          ``ε‖H_task ĝ‖``, with ``ε = 0.1·√eps·(1 + ‖θ‖)`` tiny: measured relative error of the
          whole gradient against double backprop at θ about 4e-8 in float64 and 1e-3 in float32.
          The value is ``task_loss(o') + α‖g‖²`` (the task loss at θ', an O(ε) difference). Cost:
          two forwards and two backwards (against 2F + 3B for ``loss + pen(x)``); on the benchmark MLP
          64-256-256-10 (batch 256, SGD, two threads) 2.3-3.0× a plain step, where the passes alone cost
          1.8×, the rest Python per call (the model's checks, the label draw, the norms of g and θ, the
          node that shifts the parameters, the second NLL).
          With ``every > 1`` and ``reuse_between=True`` the penalty's gradient is also taken
          on its own (one more backward through pass 2) to be cached, and the returned term is
          the surrogate with that gradient (a computed step costs 2F + 3B; on the benchmark MLP, where a
          plain step took 1.1-2.9 ms on a 2-core machine, every=10 costs 1.2-1.3× a plain step in
          docs/performance.md's runs of 2-6 December and 1.5× on an idle machine, where the plain step is fastest;
          a reusing step is a plain one plus the schedule's Python and the kept gradient's addition into the task
          gradient).
        * ``grad_method="exact"``: one forward; the penalty is taken on its outputs by double
          backprop and added to ``task_loss(outputs)``.
        * ``kind="trace"``: the labels come from the shared outputs (no extra forward); the
          per-sample gradients (``vmap``) still need their own passes.
        * Other steps: ``task_loss(model(inputs))``, plus the cached-gradient surrogate when
          ``reuse_between=True`` and a step was computed (no term otherwise).

        In training mode the model's buffers are updated once per call (with finite differences by
        pass 1, at θ; pass 2 runs on clones of them with spectral norm's power iteration paused), and
        the finite difference replays the Dropout masks of pass 1. On
        computed steps gradients are enabled even inside ``torch.no_grad()``.

        Example:
            >>> import torch, torch.nn.functional as F, torchfim.train
            >>> _ = torch.manual_seed(0)
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
            >>> pen = torchfim.train.FisherPenalty(model, alpha=0.01, grad_method="finite_difference",
            ...                                    generator=torch.Generator().manual_seed(0))
            >>> x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
            >>> loss = pen.penalised_loss(x, lambda out: F.cross_entropy(out, y), step=0)
            >>> loss.backward()  # task gradient + penalty gradient, from two forwards and two backwards
            >>> at_theta = F.cross_entropy(model(x), y) + pen.last_value  # loss has the task term at θ + εĝ
            >>> bool(torch.isclose(loss, at_theta, rtol=1e-4)), bool(torch.isclose(loss, at_theta, rtol=1e-7))
            (True, False)
        """
        step = check_step(step)
        check_task_loss(task_loss)
        own, self.model = self.model, running_module(self.model, model)
        try:
            with self._kept_unless_training():
                return self._penalised_loss(inputs, task_loss, step, mask)
        finally:
            self.model = own

    def _penalised_loss(self, inputs: Inputs, task_loss: Callable[[object], Tensor], step: int,
                        mask: Tensor | str | None) -> Tensor:
        decision = self._decide(step)
        if decision != COMPUTE:
            return self._between(inputs, task_loss, surrogate=decision == REUSE)
        if has_module_backward_hooks(self.model) or _carries_graph(inputs):
            # Hooks see the task's backward only, and a graph the inputs carry (a trunk's features) the task's
            # gradient only: the penalty takes a forward of its own, on detached inputs and on clones of the buffers,
            # so that they are updated once per call (by the task's forward, which meets them as the penalty's did).
            with SLOTS_LOCK, private_buffers(self.model, {}):  # no other thread copies the model with the clones
                term = self(inputs, step=step, mask=mask)
            return self._between(inputs, task_loss, surrogate=False) + term
        names, params = penalised_parameters(self.model)
        x = self.io.prepare(inputs, self.model, params[0])
        rows = min(self.sub_batch or x.size, x.size)
        keep = self._keeper(step, params, rows)
        given = self.io.mask(mask, x)
        with self.family.masked(given, rows, self.io.labelled(x), self.io.padding(x, given)), \
                self._forwards(step, params, module_hooks=False):
            if self.grad_method == "finite_difference" and self.kind == "batch_gradient":
                loss, value = self._shared_fd(x, rows, list(zip(names, params)), task_loss, keep)
            else:
                loss, value = self._shared_forward(x, rows, names, params, task_loss, keep)
        if keep is None:
            self._computed(step, value.detach(), rows)
        return loss

    # -------------------------------------------------------------- helpers
    def _decide(self, step: int) -> str:
        """The schedule's decision for a training call; an evaluation (gradients off, :meth:`_kept_unless_training`)
        computes the penalty of its inputs whatever the step (it returned the training batch's kept value between
        computed steps)."""
        refuse_func_transforms()  # a reused step too: its surrogate is an autograd.Function torch.func cannot run
        if self._evaluating:
            return COMPUTE
        return self._schedule.decide(step, self._kept, self.model, self.last_step)

    def _forwards(self, step: int, params: list[Tensor], module_hooks: bool = True) -> ExitStack:
        """The contexts of a computing step (:mod:`.computing_passes`; a coarse precision is named once), drawing
        as the step's first call did where the parameters moved since (:mod:`.step_draws`)."""
        named, self._precision_named = self._precision_named, True
        stack = computing_passes(self.model, self.kind, self.grad_method, params, not named, module_hooks,
                                 self._forward_precision)
        stack.enter_context(self._draws.replayed(step, params, self.generator))
        return stack

    def _between(self, inputs: Inputs, task_loss: Callable[[object], Tensor], surrogate: bool = True) -> Tensor:
        """The task loss from a forward of the caller's, plus (on a step that does not compute the penalty) the
        cached-gradient surrogate."""
        kept = self._kept
        reuse = surrogate and self.reuse_between and kept.grads is not None
        first = kept.params[0] if reuse else trainable(self.model)[1][0]
        out = self.io.call(self.model, self.io.prepare(inputs, self.model, first), differentiated_twice=False)
        loss = scalar_task_loss(task_loss, out)
        # Built after the forward, so autograd runs its backward first: the task gradients then add in place.
        return loss + self._surrogate(kept.params, kept.grads, kept.value) if reuse else loss

    def _computed(self, step: int, value: Tensor, inputs: int) -> None:
        """Record a computed call on ``inputs`` inputs that keeps no gradient (no cache, or an evaluation): its
        value."""
        self.last_step, self.last_value = step, value
        self._schedule.computed(None if self._evaluating else inputs)  # an evaluation's batch is not counted

    def _keeper(self, step: int, params: list[Tensor], inputs: int) -> OnBackward | None:
        """With a cache, what a training call computing the penalty on ``inputs`` inputs at ``params`` hands its
        gradient and value to when its term is back-propagated: they go into the kept gradient (the mean over the
        calls of this step at these parameters, :mod:`.kept_gradient`), whose value ``last_value`` then is. A term
        never back-propagated (the penalty of a validation batch, logged) changes none of it. None without a cache,
        and in an evaluation (:meth:`_kept_unless_training`)."""
        if self._evaluating or not (self.every > 1 and self.reuse_between):
            return None
        stamped = stamp(params)  # the parameters the gradient is taken at, not those at its backward

        def keep(grads: list[Tensor], value: Tensor) -> None:
            self.last_step = step
            self._schedule.computed(inputs)
            self._kept.keep(step, params, grads, value, stamped)
            self.last_value = self._kept.value

        return keep


def _carries_graph(inputs: Inputs) -> bool:
    """Whether a tensor of the mini-batch (one tensor, or a dict's values) requires gradients."""
    values = inputs.values() if isinstance(inputs, Mapping) else (inputs,)
    return any(isinstance(t, Tensor) and t.requires_grad for t in values)
