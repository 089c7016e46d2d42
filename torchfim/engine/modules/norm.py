"""Normalisation layers with an elementwise affine map: ``z = x̂ ⊙ γ + β``.

``x̂`` is the normalised input (LayerNorm, RMSNorm: over the trailing ``normalized_shape``;
GroupNorm: per group of channels; InstanceNorm with ``affine``: per channel of each sample, or with the
running statistics where it tracks them in eval mode; BatchNorm in eval mode: with the running statistics), so the
per-sample gradients are ``∂/∂γ = Σ g ⊙ x̂`` and ``∂/∂β = Σ g``, summed over the dims that share the
parameter (positions, or the spatial dims of a channel) (docs/math.md §6.3c). Eval-mode BatchNorm
is one affine map per channel: :class:`BatchNormRule` records it in that form and takes its
per-sample products from torch's fused batch-norm backward; a subclass with a forward of its own keeps that forward
and gets :class:`NormRule` on probation. BatchNorm without running statistics
normalises with the batch's own statistics and is left to the generic rule (the independence check
then refuses it).

A norm of a class of its own (Hugging Face's ``LlamaRMSNorm``, ``T5LayerNorm``, ``CohereLayerNorm``)
gets the rule on probation (:func:`own_norm`); which ``x̂`` it computes, over the last dim, the first call
says (:func:`own_norm_kind`): the one whose affine map ``x̂ ⊙ γ + β`` (or ``x̂ ⊙ (1 + γ) + β``, as Gemma's,
whose gradients are the same) gives the call's output. Its ``x̂`` is then its own forward's, with the identity
affine map (:func:`own_normalised`), so that it is computed as the model computes it (T5's variance is taken in
float32 inside a float64 model).
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Grads, Rule, as_float
from .generic import tensors_of

#: torch's RMSNorm (torch >= 2.4; an older torch has none, and its models have only their own classes).
_RMS_NORM: tuple[type, ...] = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
_TRAILING = (nn.LayerNorm, *_RMS_NORM)
_INSTANCE = nn.modules.instancenorm._InstanceNorm
_CHANNEL = (nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, _INSTANCE)


#: The ``x̂`` a norm of its own class may compute over the last dim (:func:`own_norm_kind`).
OWN_KINDS = ("rms", "layer")
#: Per class of its own, the kind its first call showed and whether it scales by ``1 + γ``: a property of its
#: forward, found once (the check costs a norm and two comparisons, about 0.7 ms a call on T5's, which has 12).
_KIND_OF_CLASS: dict[type, tuple[str, bool]] = {}


def norm_supported(module: nn.Module) -> bool:
    """LayerNorm, RMSNorm, GroupNorm, and BatchNorm in eval mode with running statistics; and a module
    that looks like a norm of its own class (:func:`own_norm`)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return not module.training and module.running_mean is not None and isinstance(module, _CHANNEL)
    if isinstance(module, _INSTANCE):
        return module.affine
    return isinstance(module, _TRAILING + (nn.GroupNorm,)) or own_norm(module)


def own_norm(module: nn.Module) -> bool:
    """A class of its own named ``…Norm`` with a trainable vector ``weight`` (and a ``bias``), a float ``eps``
    or ``variance_epsilon`` and no sub-modules, as Hugging Face models define them (Llama, Mistral, T5,
    Cohere). Only its name says it normalises, so its rule is on probation: the coverage check keeps it
    where its per-sample gradients hold."""
    if isinstance(module, _TRAILING + _CHANNEL + (nn.modules.batchnorm._BatchNorm,)):
        return False
    if not type(module).__name__.endswith("Norm"):
        return False
    params = dict(module.named_parameters(recurse=False))
    return ("weight" in params and set(params) <= {"weight", "bias"} and params["weight"].dim() == 1
            and not list(module.children()) and isinstance(_eps(module), float))


def own_norm_kind(module: nn.Module, call: Call) -> tuple[str, bool] | None:
    """Which of :data:`OWN_KINDS` the call of a norm of its own class computed, and whether it scales by ``1 + γ``:
    its output is ``x̂ ⊙ γ + β`` or ``x̂ ⊙ (1 + γ) + β`` (to float32's precision at least: such norms often compute
    in float32); None if neither."""
    x, weight = call.args[0] if call.args else None, module.weight
    out = call.batch_first(call.taps[0].detach()) if call.taps else None  # in the layout x is kept in (folded rows)
    if not isinstance(x, Tensor) or out is None or out.shape != x.shape or x.shape[-1] != weight.numel():
        return None
    for kind in OWN_KINDS:
        x_hat = normalised(module, x.to(out.dtype), kind)
        for shifted in (False, True):
            if _gives(module, x_hat, shifted, out):
                return kind, shifted
    return None


def _gives(module: nn.Module, x_hat: Tensor, shifted: bool, out: Tensor) -> bool:
    """Whether the module's affine map of ``x̂`` gives ``out`` (to float32's precision at least)."""
    weight = module.weight.detach()
    bias = module.bias.detach() if isinstance(getattr(module, "bias", None), Tensor) else 0
    tolerance = max(32 * torch.finfo(out.dtype).eps, 1e-5)
    return torch.allclose(out, x_hat * (1 + weight if shifted else weight) + bias, rtol=tolerance,
                          atol=tolerance * out.abs().max().item())


def own_normalised(module: nn.Module, x: Tensor, shifted: bool, out: Tensor) -> Tensor | None:
    """``x̂`` of a norm of its own class as its forward computes it (in float32 where it does): its output with the
    identity affine map, ``γ = 1`` (``0`` where it scales by ``1 + γ``) and ``β = 0``; None where that output is not
    found.

    The forward runs on a shallow copy of the module whose parameters (and buffers) are new dicts holding the
    identity, called as its class's ``forward``, not through ``__call__``: the user's forward pre-hooks and hooks
    (a steering hook, an activation recorder, accelerate's offload or DeepSpeed's gather hooks) and global hooks
    do not run, and the module's own parameters are never swapped (``torch.func.functional_call`` runs the hooks
    and swaps them). ``x`` is the recorded input, the forward's own: after any forward pre-hook, as the model ran.
    ``out`` is the call's recorded output (its first tap, on which :func:`own_norm_kind` found the kind)."""
    bare, identity = copy.copy(module), {"weight": 0.0 if shifted else 1.0}
    if isinstance(getattr(module, "bias", None), Tensor):
        identity["bias"] = 0.0
    for name, fill in identity.items():  # a parameter, a buffer or a plain attribute: the copy's own dict holds it
        real = getattr(module, name)
        value = torch.full(real.shape, fill, dtype=real.dtype, device=x.device)
        where = next((d for d in ("_parameters", "_buffers") if name in module.__dict__[d]), None)
        if where is None:
            bare.__dict__[name] = value
        else:
            bare.__dict__[where] = {**bare.__dict__[where], name: value}
    with torch.no_grad():
        returned = type(module).forward(bare, x)
        if isinstance(returned, Tensor):
            return returned if returned.shape == x.shape else None
        # Several outputs (a prenorm fused RMSNorm's ``(normed, residual)``): the one at the place of the output
        # the kind was found on, which the affine map takes to it.
        return next((t for t in tensors_of(returned) if t.shape == x.shape and _gives(module, t, shifted, out)),
                    None)


def _eps(module: nn.Module) -> object:
    return getattr(module, "variance_epsilon", getattr(module, "eps", None))


def _rms_normalised(x: Tensor, shape: tuple[int, ...], eps: float | None) -> Tensor:
    """``x / √(mean(x²) + ε)`` over the trailing ``shape`` (``ε`` the dtype's machine epsilon when None), as
    ``F.rms_norm`` computes it; written out where torch has none (torch < 2.4)."""
    if hasattr(F, "rms_norm"):
        return F.rms_norm(x, shape, None, eps)
    eps = torch.finfo(x.dtype).eps if eps is None else eps
    return x * torch.rsqrt(x.pow(2).mean(tuple(range(-len(shape), 0)), keepdim=True) + eps)


def normalised(module: nn.Module, x: Tensor, kind: str | None = None) -> Tensor:
    """``x̂``: the module's output before its affine parameters (of a norm of its own class: ``kind``'s)."""
    if isinstance(module, nn.LayerNorm) or kind == "layer":
        shape = module.normalized_shape if isinstance(module, nn.LayerNorm) else (x.shape[-1],)
        return F.layer_norm(x, shape, None, None, _eps(module))
    if isinstance(module, _RMS_NORM) or kind == "rms":
        shape = module.normalized_shape if isinstance(module, _RMS_NORM) else (x.shape[-1],)
        return _rms_normalised(x, shape, _eps(module))
    if isinstance(module, nn.GroupNorm):
        return F.group_norm(x, module.num_groups, None, None, module.eps)
    if isinstance(module, _INSTANCE) and (module.training or not module.track_running_stats):
        return F.instance_norm(x, use_input_stats=True, eps=module.eps)  # each sample's own statistics
    shape = (1, -1) + (1,) * (x.dim() - 2)
    mean, var = module.running_mean.view(shape), module.running_var.view(shape)
    return (x - mean) / (var + module.eps).sqrt()


class NormRule(Rule):
    """Per-sample products of the affine parameters of a normalisation layer."""

    def __init__(self, module: nn.Module, params: dict[str, int]) -> None:
        super().__init__(module, params)
        #: For a norm of its own class: which ``x̂`` it computes, once its first call said (None before).
        self.kind: str | None = None
        #: For a norm of its own class of a kind: whether it scales by ``1 + γ``; its ``x̂`` is then its own
        #: forward's (:func:`own_normalised`). None otherwise: ``x̂`` from :func:`normalised`.
        self.shifted: bool | None = None

    def take_recorded(self, call: Call) -> list[Tensor]:
        """No taps; the kind of a norm of its own class, from its first call."""
        if self.kind is None and own_norm(self.module):
            cls = type(self.module)
            if cls not in _KIND_OF_CLASS:
                found = own_norm_kind(self.module, call)
                if found is None:
                    self.kind = OWN_KINDS[0]  # neither: the coverage check finds the rule wrong
                    return []
                _KIND_OF_CLASS[cls] = found
            self.kind, self.shifted = _KIND_OF_CLASS[cls]
        return []

    @property
    def reads_regrouped_rows(self) -> bool:  # type: ignore[override]
        """A norm over the trailing dims treats every row alike; one over channels does not."""
        return not isinstance(self.module, _CHANNEL)

    def _fold(self, t: Tensor) -> Tensor:
        """``(m, b, ...)`` summed over the dims that share one parameter entry → ``(b, m, size)``."""
        m, b = t.shape[:2]
        if not isinstance(self.module, _CHANNEL):  # over trailing dims: LayerNorm, RMSNorm (torch's or its own)
            size = self.module.weight.numel()
            return t.reshape(m, b, -1, size).sum(2).transpose(0, 1)
        return t.reshape(m, b, t.shape[2], -1).sum(-1).transpose(0, 1)

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        g = as_float(sens[0][:, rows])
        out: Grads = {}
        if "weight" in self.params:
            if "normalised" not in call.cache:  # once per call, not per chunk and group of vectors
                x = call.args[0]  # the forward's own input, after any forward pre-hook of the user's
                x_hat = None if self.shifted is None else own_normalised(self.module, x, self.shifted,
                                                                         call.batch_first(call.taps[0].detach()))
                call.cache["normalised"] = as_float(normalised(self.module, x, self.kind) if x_hat is None else x_hat)
            out[self.params["weight"]] = self._fold(g * call.cache["normalised"][rows].unsqueeze(0))
        if "bias" in self.params:
            out[self.params["bias"]] = self._fold(g)
        return out


class BatchNormRule(NormRule):
    """BatchNorm in eval mode: ``z = x ⊙ s + t`` per channel, ``s = γ/√(σ² + eps)``, ``t = β − μ s``
    (running mean μ and variance σ²)."""

    def recording_forward(self, input: Tensor) -> Tensor:  # torch's name, for calls by keyword
        """The module's forward while the engine records: ``x ⊙ s + t`` in one operation, whose backward
        to ``x`` is one product (torch's eval-mode batch-norm backward costs about twice as much).
        Equal to the module's own output up to rounding, in the input's dtype as torch's batch norm
        returns it (a float32 layer inside a half-precision model); a module switched to training
        mode runs its own."""
        module, x = self.module, input
        if module.training:
            return type(module).forward(module, x)
        scale = (module.running_var + module.eps).rsqrt()
        if module.weight is not None:
            scale = module.weight * scale
        shift = -module.running_mean * scale
        if module.bias is not None:
            shift = shift + module.bias
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x, scale.view(shape)).to(x.dtype)

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        x = call.args[0]
        if x.dim() < 3:
            return super().grads(call, sens, rows)
        # torch's fused batch-norm backward with a channel per (sample, channel) gives Σ g ⊙ x̂ and Σ g over
        # the spatial dims in one pass over g and x per vector: x̂ is never formed (7 times faster).
        module, g, x = self.module, as_float(sens[0][:, rows]), as_float(x[rows])
        m, b = g.shape[:2]
        mean = module.running_mean.to(x.dtype).repeat(b)
        var = module.running_var.to(x.dtype).repeat(b)
        flat = x.reshape(1, b * x.shape[1], -1)
        mask = ["weight" in self.params, "bias" in self.params]
        parts = [torch.ops.aten.native_batch_norm_backward(g[j].reshape(flat.shape), flat, None, mean, var, None,
                                                           None, False, module.eps, [False, *mask])[1:]
                 for j in range(m)]
        out: Grads = {}
        for k, (name, wanted) in enumerate(zip(("weight", "bias"), mask)):
            if wanted:
                out[self.params[name]] = torch.stack([part[k] for part in parts]).reshape(m, b, -1).transpose(0, 1)
        return out
