"""A model seen as a pure function of its trainable parameters (the torch.func path).

This is the general path that works for any ``nn.Module`` whose forward treats
samples independently: it produces per-sample vector–Jacobian products
``Jᵢᵀ v`` and Hessian–vector products of ``Σᵢ wᵢᵀ o(xᵢ)`` through
``torch.func`` (``functional_call``, ``vmap``, ``vjp``, ``jvp``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp, vmap

from .errors import TorchfimError

#: Elements allowed in one chunk of per-sample products (bounds peak memory).
CHUNK_ELEMENTS = 2**24


def _check_mode(model: nn.Module) -> None:
    for name, module in model.named_modules():
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


class FunctionalModel:
    """The trainable parameters of ``model`` and per-sample products through ``torch.func``.

    θ is the concatenation, in ``model.parameters()`` order, of every parameter
    with ``requires_grad=True``, each flattened row-major.
    """

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TorchfimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        _check_mode(model)
        self.model = model
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise TorchfimError(
                "the model has no parameters with requires_grad=True, so its Fisher is empty; "
                "enable gradients on the parameters you want (p.requires_grad_(True))"
            )
        self.names = [n for n, _ in named]
        self.params = {n: p.detach() for n, p in named}
        self.constants = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
        self.constants.update(dict(model.named_buffers()))
        self.shapes = [p.shape for _, p in named]
        self.sizes = [p.numel() for _, p in named]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]
        self.num_params = sum(self.sizes)
        first = named[0][1]
        self.dtype = first.dtype
        self.device = first.device

    # ------------------------------------------------------------- forward
    def forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        """Batched outputs ``o`` (B, C) at parameters ``params``."""
        return functional_call(self.model, {**self.constants, **params}, (x,))

    def prepare_inputs(self, x: object) -> Tensor:
        """Move a mini-batch to the model's device (and floating inputs to its dtype)."""
        if not isinstance(x, Tensor):
            raise TorchfimError(
                f"each mini-batch of inputs must be a torch.Tensor, got {type(x).__name__}; "
                "pass a tensor, or an iterable of tensors or of (inputs, targets) pairs"
            )
        if x.dim() == 0:
            raise TorchfimError("inputs must have a batch dimension first, got a 0-dim tensor")
        dtype = self.dtype if x.is_floating_point() else x.dtype
        return x.to(device=self.device, dtype=dtype)

    def outputs(self, x: Tensor) -> Tensor:
        """Batched outputs at the current parameters, without autograd history."""
        with torch.no_grad():
            return self.forward(self.params, x)

    def flatten(self, tensors: dict[str, Tensor] | list[Tensor], lead: int = 0) -> Tensor:
        """Concatenate per-parameter tensors with ``lead`` leading dims into ``(*lead, P)``."""
        values = tensors.values() if isinstance(tensors, dict) else tensors
        parts = [t.reshape(t.shape[:lead] + (-1,)) for t in values]
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat ``(P,)`` vector into a parameter dict."""
        pieces = torch.split(flat, self.sizes)
        return {n: piece.view(shape) for n, piece, shape in zip(self.names, pieces, self.shapes)}

    # ---------------------------------------------------- per-sample products
    def sample_chunks(self, batch: int, vectors_per_sample: int) -> Iterator[slice]:
        """Slices of a batch small enough that ``B·m·P`` stays under :data:`CHUNK_ELEMENTS`."""
        step = max(1, CHUNK_ELEMENTS // max(1, vectors_per_sample * self.num_params))
        for start in range(0, batch, step):
            yield slice(start, min(batch, start + step))

    def vector_jacobian(self, x: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample products ``G[i, j] = Jᵢᵀ v[i, j]``.

        Args:
            x: inputs ``(B, ...)``.
            v: output-space vectors ``(B, m, C)``.

        Returns:
            ``(o, G)`` with per-sample outputs ``o`` (B, C) and ``G`` (B, m, P).
        """

        def per_sample(x1: Tensor, v1: Tensor) -> tuple[Tensor, Tensor]:
            def out(p: dict[str, Tensor]) -> Tensor:
                return self.forward(p, x1.unsqueeze(0)).squeeze(0)

            o1, pullback = vjp(out, self.params)
            (g,) = vmap(pullback)(v1)
            return o1, self.flatten(g, lead=1)

        return vmap(per_sample)(x, v)

    def hessian_columns(self, x: Tensor, w: Tensor, columns: Tensor) -> Tensor:
        """Columns ``∇²_θ (Σᵢ wᵢᵀ o(xᵢ)) e_p`` for the indices ``p`` in ``columns``.

        Args:
            x: inputs ``(B, ...)``.
            w: output weights ``(B, C)``, treated as constants.
            columns: parameter indices ``(m,)``.

        Returns:
            ``(m, P)``: row ``r`` is the Hessian column of index ``columns[r]``.
        """
        theta = self.flatten(self.params)

        def weighted_output(flat: Tensor) -> Tensor:
            return (w * self.forward(self.unflatten(flat), x)).sum()

        gradient = grad(weighted_output)

        def hvp(tangent: Tensor) -> Tensor:
            return jvp(gradient, (theta,), (tangent,))[1]

        return vmap(hvp)(self._basis(columns))

    def column_chunk(self, batch: int, width: int) -> int:
        """How many Hessian columns to compute at once for a batch of ``batch`` inputs."""
        per_column = max(self.num_params, batch * width * 64)
        return max(1, min(256, CHUNK_ELEMENTS // per_column))

    def check_independent(self, x: Tensor, o: Tensor, samples: int = 2) -> None:
        """Raise when the model's batched outputs ``o`` of ``x`` mix samples.

        The first ``samples`` inputs are run one at a time and compared with their batched outputs.
        """
        x, o = x[:samples], o[:samples]
        if x.shape[0] < 2:
            return
        with torch.no_grad():
            alone = torch.cat([self.model(x[i : i + 1]) for i in range(x.shape[0])])
        tol = 1e3 * torch.finfo(o.dtype).eps * o.abs().max().clamp_min(1.0)
        if (o - alone.reshape(o.shape)).abs().max() > tol:
            raise TorchfimError(
                "the model's output for a sample depends on the other samples in its batch "
                "(e.g. BatchNorm in training mode), so per-sample Fisher terms are undefined; "
                "call model.eval() or remove the cross-sample operation"
            )

    # ------------------------------------------------ second-order products
    def _basis(self, columns: Tensor) -> Tensor:
        basis = torch.zeros(len(columns), self.num_params, dtype=self.dtype, device=self.device)
        basis[torch.arange(len(columns)), columns] = 1
        return basis

    def output_hessian_diagonals(self, x: Tensor, columns: Tensor) -> Tensor:
        """Per-sample ``∂²o_a(xᵢ)/∂θ_p²`` for ``p`` in ``columns``: shape ``(m, B, C)``.

        Forward-over-forward: the second directional derivative of the batched
        outputs along ``e_p``; each sample's output depends on its own input only.
        """
        theta = self.flatten(self.params)

        def out(flat: Tensor) -> Tensor:
            return self.forward(self.unflatten(flat), x)

        def second(direction: Tensor) -> Tensor:
            def first(flat: Tensor) -> Tensor:
                return jvp(out, (flat,), (direction,))[1]

            return jvp(first, (theta,), (direction,))[1]

        return vmap(second)(self._basis(columns))

    def output_hessian_columns(self, x: Tensor, columns: Tensor) -> Tensor:
        """Per-sample ``∂²o_a(xᵢ)/∂θ_p∂θ_q`` for ``p`` in ``columns``: shape ``(m, B, C, P)``."""
        theta = self.flatten(self.params)

        def jacobians(flat: Tensor) -> Tensor:
            def single(x1: Tensor) -> Tensor:
                return jacrev(lambda th: self.forward(self.unflatten(th), x1.unsqueeze(0)).squeeze(0))(flat)

            return vmap(single)(x)

        def column(direction: Tensor) -> Tensor:
            return jvp(jacobians, (theta,), (direction,))[1]

        return vmap(column)(self._basis(columns))

    def jacobians(self, x: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """Per-sample outputs ``(B, C)`` and Jacobians ``Jᵢ`` ``(B, C, P)``."""
        eye = torch.eye(width, dtype=self.dtype, device=self.device)
        return self.vector_jacobian(x, eye.expand(x.shape[0], width, width))
