"""The Fisher penalty's gradient by a finite difference of gradients (``grad_method="finite_difference"``).

With ``g = ∇_θ L`` the gradient of a loss ``L`` whose sampled labels are held fixed and ``H = ∇²_θ L``,
the penalty ``α‖g‖²`` has gradient ``2α H g``. Instead of differentiating through the gradient
(double backprop), :func:`batch_gradient_fd` takes the **forward difference** along ``ĝ = g/‖g‖``::

    H g ≈ (∇L(θ + ε ĝ) − ∇L(θ)) · ‖g‖ / ε

reusing ``∇L(θ)`` (already computed for the value): one extra forward and backward, no
higher-order graph. The step is ``ε = 0.1 · √eps_dtype · (1 + ‖θ‖)`` unless given: the rounding
error of forming ``θ + ε ĝ`` is about ``eps_dtype·‖θ‖``, so ε must be large against that, while
the truncation error of a forward difference grows like ε (over c = 0.03…10 the float32 error
was smallest near c = 0.3 on the small test models and near c = 0.05 on the benchmark MLP
64-256-256-10; 0.1 is within a factor 3 of both). On all of them the relative error of the
gradient is below 1e-6 in float64 and 2e-3 in float32 (re-measured: 2e-8 to 4e-8 and 2e-4 to 9e-4 on tanh and
GELU/LayerNorm MLPs). On networks with kinks the float32 step moves units across them, where the gradient jumps:
the difference came out 1.9 to 9.4 times the gradient's size off on that MLP with ReLU (digits, 256 inputs) and
1.5-9.6 times on the benchmark CNN (``batch_gradient``, in 5 of 6 seeds and batches of 32 and 256 digits; ``trace``
0.21), where float64's smaller step stays within 4e-8. So the batch-gradient passes run the second pass on the first
pass's side of every kink of a ReLU, LeakyReLU, ReLU6, Hardtanh, Hardswish, Hardsigmoid or MaxPool1d/2d/3d module
(:mod:`.kink_replay`): 6e-4 to 1.4e-3 on such MLPs and CNNs in float32. Kinks a forward takes by a function
(``F.relu``, ``torch.clamp``) and ``kind="trace"``'s per-input passes are not replayed (4.5 times the gradient's size
off on the ReLU MLP, 0.29 on a ReLU/max-pooling CNN; a warning names it): take ``grad_method="exact"`` there in
float32. ``eps_dtype`` is that of the least precise dtype the passes compute in
(:func:`working_dtype`: the parameters', the outputs', and autocast's where
the caller runs the penalty under ``torch.autocast`` or the forward turns it on), since the difference of two gradients must stand
above their rounding: with the float32 step under bfloat16 autocast the gradient was 3.7-9 times its own
size off. In half precision the forward difference is coarse whatever the step: measured against float32
double backprop on a GELU/LayerNorm MLP, 6-8 % (``kind="batch_gradient"``) and 13-17 % (``"trace"``) off
in bfloat16, 3-5 % in float16, and on a one-layer GPT-2 language model 100-120 % in bfloat16 (its parameters, or
under autocast) and 61-81 % in float16, where double backprop in the same precision is within 1 %. A central difference,
``(∇L(θ + ε ĝ) − ∇L(θ − ε ĝ))‖g‖/(2ε)``, was 1.7-7 times more accurate at the same step on those
MLPs (rounding, not truncation, sets the error there) but needs a second extra pass (1.4 times the penalty's
cost); the forward difference is far inside 1 % (float64) and 5 % (float32), so the cheaper one is used.

The difference assumes that the gradient torch computes is the gradient of ``L``, so that its Jacobian ``H`` is
symmetric: double backprop differentiates ``α‖g‖²`` and gives ``2α Hᵀg``, the difference gives ``2α H g``.
``nn.Embedding(padding_idx=...)`` breaks that: torch zeroes the padding row's gradient although the row is
used in the forward. Where padding tokens reach the model unmasked, the two then differ, by 1e-3 to 4e-3
relative in float64 on a small GRU language model with the embedding tied to its output layer (2e-8 without
``padding_idx``). A ``mask`` that drops the padding positions brings them back together wherever no kept
output depends on the padding row (padding after the tokens of a causal model).

The perturbed pass runs the model with shifted copies of the parameters in their slots (as
``torch.func.functional_call`` does), so the parameters themselves are never modified (nothing to
restore, no drift, and no in-place change of a tensor an outer graph saved). It sees the same
inputs and the same labels; in training mode it also sees the same random numbers as the first
pass (torch's RNG state is replayed, so a Dropout mask is the same), and it sees the state the
first pass left and updates none of it: BatchNorm running statistics are updated once, by the first
pass, as by any forward, and spectral norm's power iteration, which the first pass moves by a step,
is paused (:mod:`torchfim.engine.derivative_settings`), so both passes divide by the same ``σ``.

In a training step, :func:`batch_gradient_fd_shared` (behind
:meth:`~torchfim.train.FisherPenalty.penalised_loss`) makes the perturbed pass the step's only
differentiated forward: the task loss is taken at ``θ' = θ + ε ĝ`` too, and one backward of
``task(θ') + c·L(θ') − c⟨g, θ⟩`` (``c = 2α‖g‖/ε``, ``g`` held constant) gives
``∇task(θ') + 2α (∇L(θ') − ∇L(θ))‖g‖/ε``: two forwards and two backwards in all, against
``2F + 3B`` for the separate term. The task gradient is then off by ``ε H_task ĝ + O(ε²)``, with
``ε = 0.1·√eps·(1 + ‖θ‖)`` (about ``1.5e-9·(1 + ‖θ‖)`` in float64, ``3.5e-5·(1 + ‖θ‖)`` in
float32); on the test models the whole gradient is within ``4e-8`` (float64) and ``1e-3`` (float32) of
double backprop at θ. There too the first pass updates the buffers (once) and the perturbed pass
runs on clones of them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from ..engine.batch import Batch
from ..engine.derivative_settings import kept_hook_weights, paused_power_iterations, per_input_passes
from ..engine.native_dtype import autocast_dtypes
from ..engine.plain_forwards import eager_compiled
from ..engine.private_tree import SLOTS_LOCK
from ..errors import TorchfimError, real_number
from ..families import Family
from .kink_replay import KinkReplay
from .model_io import ModelIO
from .position_outputs import PositionOutputs
from .squared_gradients import per_input_squares, widest_dtype
from .step_draws import set_torch_rng_state, torch_rng_state

GRAD_METHODS = ("exact", "finite_difference")


#: The constant c of the default step ``ε = c·√eps_dtype·(1 + ‖θ‖)`` (chosen by measurement, see above).
FD_STEP_SCALE = 0.1


def check_fd_step(fd_step: object, grad_method: str) -> float | None:
    """``fd_step`` as a float, or None for the default step; only valid with finite differences."""
    if fd_step is None:
        return None
    if grad_method != "finite_difference":
        raise TorchfimError(
            f"fd_step={fd_step!r} only applies to grad_method='finite_difference'; drop it or switch the method"
        )
    step = real_number(fd_step)
    if step is None or not 0 < step < math.inf:
        raise TorchfimError(
            f"fd_step must be a finite number > 0 (the step length along ĝ in parameter space), got {fd_step!r}; "
            "pass None for the default 0.1·√eps·(1 + ‖θ‖)"
        )
    return step


def working_dtype(first: Tensor, *outputs: Tensor) -> torch.dtype:
    """The least precise of the dtypes the passes compute in: the parameters' (``first``), the ``outputs``',
    and those ``torch.autocast`` runs in on the parameters' device, where the caller has it on or a region of the
    forward turned it on (``accelerate``'s mixed precision, whose outputs come back in float32; seen within
    :func:`~torchfim.engine.native_dtype.autocast_observed`). The caller's counts only below float64 parameters: torch's
    autocast never casts a float64 tensor, so a float64 model computes in float64 inside it."""
    autocast = autocast_dtypes(first.device.type, ambient=first.dtype != torch.float64)
    dtypes = [first.dtype, *(o.dtype for o in outputs if o.is_floating_point()), *autocast]
    return max(dtypes, key=lambda d: torch.finfo(d).eps)


def fd_step_for(params: list[Tensor], fd_step: float | None, theta_norm: Tensor | None = None,
                compute: torch.dtype | None = None) -> Tensor:
    """The step ε as a 0-dim tensor: ``fd_step``, or ``0.1 · √eps · (1 + ‖θ‖)`` (θ: ``params``;
    ``theta_norm`` when ‖θ‖ is already known; ``eps`` of ``compute``, by default :func:`working_dtype`).

    A tensor, so that no value goes back to the host (no device synchronisation).
    """
    first = params[0]
    if fd_step is not None:
        return torch.tensor(fd_step, dtype=first.dtype, device=first.device)
    if theta_norm is None:
        theta_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.detach() for p in params])))
    return _default_step(theta_norm, compute or working_dtype(first))


def _fd_scalars(
    grads: list[Tensor], params: list[Tensor], fd_step: float | None, alpha: float, compute: torch.dtype,
    host: bool | None = None,
) -> tuple[float | Tensor, float | Tensor, Tensor]:
    """``(ε/‖g‖, 2α‖g‖/ε, α‖g‖²)`` for the gradient ``g = grads`` (None for a parameter not reached; the shift is
    0 when ``g = 0``).

    ``ε`` as in :func:`fd_step_for`, for passes computing in ``compute``; the norms of ``g`` and θ come
    from one pass over the tensors.
    With ``host`` (by default: on CPU) the first two are Python numbers (reading values back costs
    nothing there, and the dozen 0-dim tensor operations it replaces cost about 100 µs per step);
    otherwise 0-dim tensors, so that no value goes back to the host. The value is a 0-dim tensor.
    """
    first = params[0]
    detached = [] if fd_step is not None else [p.detach() for p in params]
    grads = [g for g in grads if g is not None] or [torch.zeros((), dtype=first.dtype, device=first.device)]
    norms = torch.stack(torch._foreach_norm(grads + detached))
    if not (first.device.type == "cpu" if host is None else host):
        norm = torch.linalg.vector_norm(norms[: len(grads)])
        step = fd_step_for(params, fd_step, torch.linalg.vector_norm(norms[len(grads) :]) if fd_step is None else None,
                           compute)
        return _ratio_or_zero(step, norm), (2.0 * alpha) * norm / step, alpha * norm.square()
    values = norms.tolist()
    norm = math.hypot(*values[: len(grads)])
    step = fd_step if fd_step is not None else _default_step(math.hypot(*values[len(grads) :]), compute)
    value = torch.tensor(alpha * norm * norm, dtype=first.dtype, device=first.device)
    return (step / norm if norm > 0 else 0.0), 2.0 * alpha * norm / step, value


def _default_step(theta_norm: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    """``0.1 · √eps_dtype · (1 + ‖θ‖)``, for passes that compute in ``dtype``."""
    return FD_STEP_SCALE * math.sqrt(torch.finfo(dtype).eps) * (1.0 + theta_norm)


def _ratio_or_zero(num: Tensor, den: Tensor) -> Tensor:
    """``num/den`` where ``den > 0``, else 0 (a zero gradient has no direction, and H·0 = 0)."""
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(den))


class _Replay:
    """For a model in training mode: torch's RNG state before the first pass, replayed for the second
    pass (the same Dropout masks) and then restored to where the first pass left it."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        self.device = device
        self.active = any(m.training for m in model.modules())
        self.before = torch_rng_state(device) if self.active else None

    @contextmanager
    def second_pass(self) -> Iterator[None]:
        """Run the enclosed pass on the first pass's random numbers."""
        if not self.active:
            yield
            return
        after = torch_rng_state(self.device)
        set_torch_rng_state(self.device, self.before)
        try:
            yield
        finally:
            set_torch_rng_state(self.device, after)


def _gradients(loss: Tensor, params: list[Tensor], seed: Tensor | None = None,
               retain_graph: bool = False) -> list[Tensor | None]:
    """``seed · ∇loss`` w.r.t. ``params``: None for a parameter the loss's graph does not reach, which then gets no
    gradient from the penalty, as in plain training (and as ``DistributedDataParallel(find_unused_parameters=True)``
    requires of a parameter its forward did not use)."""
    return list(torch.autograd.grad(loss, params, seed, retain_graph=retain_graph, allow_unused=True))


def _reached(params: list[Tensor], grads: list[Tensor | None]) -> tuple[list[Tensor], list[Tensor]]:
    """The parameters whose gradient is not None, and those gradients."""
    pairs = [(p, g) for p, g in zip(params, grads) if g is not None]
    return [p for p, _ in pairs], [g for _, g in pairs]


def _difference(after: list[Tensor | None], before: list[Tensor | None], scale: float | Tensor) -> list[Tensor | None]:
    """``scale·(a − b)`` per parameter, a missing side counting as 0 (None where both are)."""
    return [None if b is None and a is None else (-b if a is None else a if b is None else a - b).mul_(scale)
            for a, b in zip(after, before)]


def batch_gradient_fd(
    model: nn.Module,
    io: ModelIO,
    family: Family | PositionOutputs,
    named: list[tuple[str, Tensor]],
    x: Batch,
    draw_labels: Callable[[Tensor], Tensor],
    alpha: float,
    fd_step: float | None,
) -> tuple[Tensor, list[Tensor | None]]:
    """Value ``α‖g‖²`` and its gradient ``2α H g`` by a forward difference (see the module docstring); None for a
    parameter the first pass's graph does not reach.

    ``g = ∇_θ (1/B) Σᵢ −log p(ŷᵢ|xᵢ)`` with the labels ``ŷ = draw_labels(o)`` drawn from the first
    pass's outputs ``o``; ``named`` are the trainable ``(name, parameter)`` pairs.
    """
    params = [p for _, p in named]
    replay, kinks = _Replay(model, params[0].device), KinkReplay(model)
    with kinks.recording():
        o = io.outputs(model, x)
    y = draw_labels(o)
    nll = family.nll(o, y)
    if not nll.requires_grad:  # the outputs do not depend on the trainable parameters
        return torch.zeros((), dtype=o.dtype, device=o.device), [None] * len(params)
    g = _gradients(nll, params)
    shift, scale, value = _fd_scalars(g, params, fd_step, alpha, working_dtype(params[0], o))  # θ + ε ĝ
    if alpha == 0.0:
        return value, [None if t is None else torch.zeros_like(t) for t in g]
    # Of the parameters, not detached copies: DistributedDataParallel(find_unused_parameters=True) reads the last
    # forward's graph (this pass's) for the parameters it uses, and marks the ones it cannot reach ready at once.
    reached, directions = _reached(params, g)
    shifted = _shifted(reached, directions, shift)
    with _perturbed(model, replay, dict(zip(reached, shifted))), kinks.replaying():
        g_plus = iter(_gradients(family.nll(io.outputs(model, x), y), shifted))
    return value, _difference([None if t is None else next(g_plus) for t in g], g, scale)


def trace_fd(
    model: nn.Module,
    io: ModelIO,
    family: Family | PositionOutputs,
    named: list[tuple[str, Tensor]],
    x: Batch,
    y: Tensor,
    alpha: float,
    fd_step: float | None,
    reached: list[bool],
) -> tuple[Tensor, list[Tensor | None]]:
    """Value ``α (1/B) Σᵢ ‖gᵢ‖²`` and its gradient ``(2α/B) Σᵢ Hᵢ gᵢ`` by forward differences; None for a parameter
    whose ``reached`` is False (one the model's graph does not reach: torch.func gives it zero gradients).

    ``gᵢ = ∇_θ log p(yᵢ|xᵢ)`` and ``Hᵢ = ∇²_θ log p(yᵢ|xᵢ)``; each input has its own direction
    ``ĝᵢ``, so the perturbed pass evaluates every input at its own parameters ``θ + ε ĝᵢ``
    (``vmap`` over per-input parameter copies, ``B·P`` numbers): ``Hᵢ gᵢ ≈ (gᵢ(θ + ε ĝᵢ) − gᵢ(θ))·‖gᵢ‖/ε``.
    The model must treat samples independently (checked by the caller).
    """

    log_p, masks = io.input_log_prob(model, family, x), family.mask
    base = {n: p.detach() for n, p in named}
    with per_input_passes(model):  # both passes see σ and the buffers as the labels' forward left them
        value, grads = _trace_difference(io, log_p, base, x, y, masks, alpha, fd_step)
    return value, [g if used else None for g, used in zip(grads, reached, strict=True)]


def _trace_difference(io: ModelIO, log_p: Callable, base: dict[str, Tensor], x: Batch, y: Tensor, masks: Tensor | None,
                      alpha: float, fd_step: float | None) -> tuple[Tensor, list[Tensor]]:
    """:func:`trace_fd`'s two passes of per-input gradients, at θ and at each input's θ + ε ĝᵢ."""
    g = io.per_input_gradients(log_p, base, None, x, y, masks)
    sq = per_input_squares(list(g.values()))  # (B,)
    norms = sq.sqrt()
    value = (alpha * sq.mean()).to(widest_dtype(list(g.values())))
    if alpha == 0.0:
        return value, [torch.zeros_like(p) for p in base.values()]
    step = fd_step_for(list(base.values()), fd_step)
    shift = _ratio_or_zero(step, norms)  # an input with gᵢ = 0 is not moved and contributes Hᵢgᵢ = 0

    def per_input(scalars: Tensor, like: Tensor) -> Tensor:  # (B,) → (B, 1, …, 1) against like (B, *shape)
        return scalars.reshape((-1,) + (1,) * (like.dim() - 1))

    # each tensor moved in its own dtype (the norms of a model of several dtypes are in the widest)
    shifted = {n: base[n] + (per_input(shift, g[n]) * g[n]).to(base[n].dtype) for n in base}
    g_plus = io.per_input_gradients(log_p, shifted, 0, x, y, masks)
    weight = norms * ((2.0 * alpha / x.size) / step)
    return value, [((g_plus[n] - g[n]) * per_input(weight, g[n])).sum(0).to(base[n].dtype) for n in base]


class _ShiftedParameters(torch.autograd.Function):
    """``θ' = θ + h·e`` for every parameter at once, plus an anchor of value ``v`` carrying a linear term.

    Forward: the shifted parameters ``p + h·e_p`` (``h`` a number or 0-dim tensor) and a copy of the
    constant ``v``. Backward: each parameter gets its shifted copy's gradient plus ``s·w·e_p``, with
    ``w`` a weight (number or 0-dim tensor) and ``s`` the anchor's incoming gradient (1 for
    ``loss.backward()``; the loss's scale otherwise). So adding the anchor to a loss adds the term
    ``v + w⟨e, θ⟩ − w⟨e, θ⟩|now`` to it without a node of its own: the shift and the term share one
    node and one fused operation per parameter in each direction (neither ``h·e`` nor ``w·e`` is
    formed).
    """

    @staticmethod
    def forward(
        ctx, shift: float | Tensor, extras: list[Tensor], weight: float | Tensor, value: Tensor, *params: Tensor
    ):
        ctx.extras, ctx.weight = extras, weight
        return (*_shifted(params, extras, shift), value.detach().clone())

    @staticmethod
    def backward(ctx, *upstream: Tensor):
        *grads, scale = upstream
        factor = scale * ctx.weight
        return (None, None, None, None, *[torch.addcmul(g, e, factor) for g, e in zip(grads, ctx.extras)])


def batch_gradient_fd_shared(
    model: nn.Module,
    io: ModelIO,
    family: Family | PositionOutputs,
    named: list[tuple[str, Tensor]],
    x: Batch,
    rows: int,
    draw_labels: Callable[[Tensor], Tensor],
    alpha: float,
    fd_step: float | None,
    cache: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | list[Tensor]]:
    """The two passes of :meth:`~torchfim.train.FisherPenalty.penalised_loss` with finite differences.

    Pass 1, at θ (gradients, no higher-order graph): outputs ``o`` of the whole batch ``x``, labels
    ``ŷ = draw_labels(o[:rows])``, ``g = ∇_θ L(θ)`` with ``L = (1/rows) Σᵢ −log p(ŷᵢ|xᵢ)`` on the
    first ``rows`` outputs. Pass 2, at ``θ' = θ + ε ĝ``: the outputs ``o'`` of the whole batch, with
    the parameters ``p + (ε/‖g‖)·g_p`` in their slots — differentiable in ``p``, so a
    backward through ``o'`` lands on the real parameters' ``.grad``.

    In training mode pass 1 updates the buffers as any forward does (running statistics by the batch
    at θ, a step of spectral norm's power iteration) and pass 2 replays its random numbers (the same
    Dropout masks) on clones of them, with the power iteration paused (:func:`_perturbed`). torch's
    RNG ends where pass 1 and the label draw left it. With ``cache`` pass 2 runs compiled code eagerly.

    Returns ``(o', L(θ') on o', c, α‖g‖², last)`` with ``c = 2α‖g‖/ε`` (a number on CPU, else a 0-dim
    tensor; see :func:`_fd_scalars`) and the value a 0-dim tensor. With
    ``cache=False``, ``last`` is a 0-dim tensor of value ``α‖g‖²`` whose gradient is ``−c·g``, so that
    ``c·L(θ') + last`` has the gradient ``2α (∇L(θ') − ∇L(θ))‖g‖/ε ≈ 2α H g``; with ``cache=True``
    it is the list ``g`` (the caller forms the penalty's gradient with :func:`penalty_gradient`). A parameter that
    pass 1's graph does not reach (None in ``g``) is neither shifted nor given a gradient by ``last``.
    """
    params = [p for _, p in named]
    replay, kinks = _Replay(model, params[0].device), KinkReplay(model)
    with torch.enable_grad(), kinks.recording():
        o = leading(io.outputs(model, x), rows)
        y = draw_labels(o)
        nll = family.nll(o, y)
        g = _gradients(nll, params) if nll.requires_grad else [None] * len(params)
    shift, coef, value = _fd_scalars(g, params, fd_step, alpha, working_dtype(params[0], o))  # g = 0: not moved
    reached, directions = _reached(params, g)  # a parameter the graph does not reach stays in its slot
    if cache:
        shifted, last = _shifted(reached, directions, shift), g
    elif reached:
        *shifted, last = _ShiftedParameters.apply(shift, directions, -coef, value, *reached)
    else:
        shifted, last = [], value
    # With a cache, pass 2's graph is back-propagated twice (the penalty's gradient, then the caller's loss), which a
    # compiled backward that donates its buffers (inductor's) refuses: that pass runs compiled code eagerly.
    with _perturbed(model, replay, dict(zip(reached, shifted))), eager_compiled() if cache else nullcontext(), \
            kinks.replaying():
        out = io.call(model, x)
    return out, family.nll(leading(io.tensor(out, x), rows), y), coef, value, last


def penalty_gradient(nll: Tensor, params: list[Tensor], g: list[Tensor | None],
                     coef: float | Tensor) -> list[Tensor | None]:
    """``c·(∇L(θ') − g)``, the forward-difference gradient of ``α‖g‖²``, from ``nll = L(θ')`` on its own.

    One backward seeded with ``c`` (no separate scaling pass) and one fused pass subtracting
    ``c·g`` in place; ``nll``'s graph is kept for the task loss that shares it. None for a parameter that
    neither ``nll`` nor ``g`` reaches (a missing side counts as 0).
    """
    if not nll.requires_grad:  # the outputs do not depend on the trainable parameters
        return [None] * len(params)
    grads = _gradients(nll, params, torch.as_tensor(coef, dtype=nll.dtype, device=nll.device), retain_graph=True)
    grads = [torch.zeros_like(b) if a is None and b is not None else a for a, b in zip(grads, g)]
    into, by = [a for a, b in zip(grads, g) if b is not None], [b for b in g if b is not None]
    if isinstance(coef, Tensor):
        torch._foreach_sub_(into, torch._foreach_mul(by, coef))
    else:
        torch._foreach_add_(into, by, alpha=-coef)
    return grads


@contextmanager
def _perturbed(model: nn.Module, replay: _Replay, shifted: dict[Tensor, Tensor]) -> Iterator[None]:
    """The second pass: the ``shifted`` parameters in their slots, the model's state as the first pass left
    it and untouched by this one, and the first pass's random numbers.

    In training mode the buffers are clones (the BatchNorm statistics this pass would add are thrown
    away) and spectral norm's power iteration is paused, so this pass divides by ``σ`` from the ``u, v``
    the first pass moved and used: a second step of the iteration would change ``σ`` by far more than
    the ``ε`` of the difference. The older reparametrising hooks' weights stay the first pass's.
    """
    buffers = {id(b): b.clone() for b in model.buffers()} if replay.active else {}
    with ExitStack() as stack:
        if replay.active:  # in eval mode nothing moves u, v: no walk over the modules
            stack.enter_context(paused_power_iterations(model))
        stack.enter_context(replay.second_pass())
        stack.enter_context(kept_hook_weights(model))  # the first pass's weight, not the shifted one
        stack.enter_context(_substituted(model, {**buffers, **{id(p): t for p, t in shifted.items()}}))
        yield


@contextmanager
def _substituted(model: nn.Module, replacements: dict[int, Tensor]) -> Iterator[None]:
    """Within the block, every parameter or buffer slot of ``model`` that holds a tensor whose ``id`` is
    a key of ``replacements`` holds that key's tensor instead (a tied tensor in all of its slots).

    What ``torch.func.functional_call`` does, by identity instead of by name: one walk over the
    modules, where resolving and untying names costs it about 60 µs per call on a small network. No other thread
    copies ``model`` meanwhile (:data:`~torchfim.engine.private_tree.SLOTS_LOCK`): its copy would hold the replacements.
    """
    slots = [(table, key, t) for module in model.modules() for table in (module._parameters, module._buffers)
             for key, t in table.items() if t is not None and id(t) in replacements] if replacements else []
    with SLOTS_LOCK:
        for table, key, t in slots:
            table[key] = replacements[id(t)]
        try:
            yield
        finally:
            for table, key, t in slots:
                table[key] = t


def _shifted(params: list[Tensor], directions: list[Tensor], shift: float | Tensor) -> list[Tensor]:
    """``p + shift·d`` for each parameter, one fused operation each (differentiable in ``p``)."""
    if isinstance(shift, Tensor):
        return [torch.addcmul(p, d, shift) for p, d in zip(params, directions)]
    return [torch.add(p, d, alpha=shift) for p, d in zip(params, directions)]


def leading(o: Tensor, rows: int) -> Tensor:
    """The first ``rows`` outputs (the tensor itself when that is all of them: no slice to back-propagate;
    an output that is not a tensor as it is, for the family to refuse with its fix)."""
    return o if not isinstance(o, Tensor) or rows == o.shape[0] else o[:rows]
