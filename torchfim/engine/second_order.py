"""Output-Hessian diagonals of dense layers, by unit instead of by parameter (docs/math.md §6).

Inside a dense layer ``z = W a + b`` seen once per sample, ``∂²o/∂W_uk² = a_k² ∂²o/∂z_u²`` and
``∂²o/∂b_u² = ∂²o/∂z_u²``: the diagonal of every output Hessian needs ``∂²o/∂z_u²`` per unit ``u``
only, one forward-over-forward pass per unit (all samples at once) instead of one per parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.func import jvp, vmap

from .backend import CHUNK_ELEMENTS, EntryFn, Pieces
from .batch import Batch
from .composites import composite_forms
from .directions import direction_chunk
from .modules import Call, Rule
from .modules.base import as_float
from .view import ModelView


class UnitHessians:
    """The factorable layers of one batch and, computed on first use, their unit Hessian diagonals.

    ``layers`` are the dense layers with a curved parameter (see :meth:`.Backend.curved`).
    """

    def __init__(self, view: ModelView, batch: Batch, layers: list[tuple[Rule, Call]], curved: list[int]) -> None:
        self.view = view
        self.batch = batch
        self.layers = layers
        self.curved = curved  # the parameters whose own second derivatives may be nonzero
        self.inputs = [as_float(rule.unit_input(call).detach()) for rule, call in self.layers]  # a⁴, float16
        self.factored = {i for rule, _ in self.layers for i in rule.params.values()}
        self._diagonals: list[Tensor] | None = None

    def unfactored(self) -> list[int]:
        """The curved parameters outside the factorable layers."""
        return [i for i in self.curved if i not in self.factored]

    def diagonals(self) -> list[Tensor]:
        """Per layer ``∂²o_c(xᵢ)/∂z_u²``: ``(B, C, out)``."""
        if self._diagonals is None:
            self._diagonals = [self._layer(rule.module) for rule, _ in self.layers]
        return self._diagonals

    def _layer(self, module: torch.nn.Module) -> Tensor:
        view, batch = self.view, self.batch
        units = module.out_features
        # δ in the layer's own dtype: a float32 δ added to a bfloat16 layer's output would lift the rest of the forward
        # to float32, and a float64 one below a float32 layer to float64 (a model of several dtypes)
        dtype, device = module.weight.dtype, view.device
        zero = torch.zeros(batch.size, units, dtype=dtype, device=device)

        def out(delta: Tensor) -> Tensor:
            # first among the module's forward hooks: δ moves the layer's own output, which the user's
            # hooks (a scale, a steering shift) then see
            handle = module.register_forward_hook(lambda m, a, o: o + delta, prepend=True)
            try:
                return view.flat(view.to_tensor(batch.call(view.model)))
            finally:
                handle.remove()

        def second(direction: Tensor) -> Tensor:
            def first(delta: Tensor) -> Tensor:
                return jvp(out, (delta,), (direction,))[1]

            return jvp(first, (zero,), (direction,))[1]

        # The size tuned on dense networks (16 directions of 256 units over 256 inputs), capped where
        # the activations that every direction carries would not fit (convolutional bodies).
        step = min(direction_chunk(view, batch), max(1, CHUNK_ELEMENTS // max(1, batch.size * units * 16)))
        cols = []
        for start in range(0, units, step):
            idx = torch.arange(start, min(units, start + step), device=device)
            directions = torch.zeros(len(idx), batch.size, units, dtype=dtype, device=device)
            directions[torch.arange(len(idx)), :, idx] = 1
            with torch.no_grad(), composite_forms():  # forms of layer norms and attention that jvp gets right
                cols.append(vmap(second)(directions))  # (m, B, C)
        return torch.cat(cols).permute(1, 2, 0)

    def terms(self, fn: EntryFn, power: int) -> Pieces:
        """Per entry: ``Σᵢ fn(D_iu) a_ik^power`` for weights, ``Σᵢ fn(D_iu)`` for biases."""
        total: Pieces = {}
        for (rule, _), a, d in zip(self.layers, self.inputs, self.diagonals()):
            t = fn(slice(None), d.transpose(1, 2))  # (B, out)
            wide = torch.promote_types(t.dtype, a.dtype)  # a layer of another dtype than the outputs (mixed models)
            t = t.to(wide)
            if "weight" in rule.params:
                total[rule.params["weight"]] = (t.T @ a.to(wide) ** power).reshape(-1)
            if "bias" in rule.params:
                total[rule.params["bias"]] = t.sum(0)
        return total

    def traces(self) -> Pieces:
        """Per factored parameter tensor, ``Σ_{p in it} ∂²o(xᵢ)/∂θ_p²``: ``(B, C)``."""
        total: Pieces = {}
        for (rule, _), a, d in zip(self.layers, self.inputs, self.diagonals()):
            wide = torch.promote_types(d.dtype, a.dtype)
            by_unit = d.to(wide).sum(-1)  # Σ_u ∂²o/∂z_u²
            if "weight" in rule.params:
                total[rule.params["weight"]] = by_unit * a.to(wide).square().sum(1).unsqueeze(1)
            if "bias" in rule.params:
                total[rule.params["bias"]] = by_unit
        return total
