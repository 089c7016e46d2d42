"""Experts applied densely to every token, expert by expert (Llama 4's text experts).

Llama 4's MoE block hands its experts the tokens ``x_n`` once per expert, each copy scaled by that expert's
router score (zero where the router did not choose it), as rows ``(E·N, d)`` laid out expert by expert, and
the experts run as two batched products over the ``E`` blocks::

    z¹_{e,n} = x_{e,n} W¹_e,   h_{e,n} = up ⊙ act(gate) of z¹_{e,n},   out_{e,n} = h_{e,n} W²_e

(weights stored ``(E, in, out)``). Each expert's weights are a linear map at the positions ``n`` of its block,
so with ``δ¹ = ∂(vᵀo)/∂z¹`` and ``δ² = ∂(vᵀo)/∂out`` the per-sample gradients are §6.1's sums over the
sample's tokens in each block: ``∂/∂W¹_e = Σ_{n ∈ i} x_{e,n} δ¹_{e,n}ᵀ``, ``∂/∂W²_e = Σ_{n ∈ i} h_{e,n}
δ²_{e,n}ᵀ`` (docs/math.md §6.3g). The block's rows ``n`` come sample by sample (``N = B·T``); the rule reads
them so (:attr:`.base.Call.own_layout`), and the coverage check confirms it on the first batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import PARTS, Call, Grads, Rule, as_float
from .experts import block_gradients

_NAMES = ("gate_up_proj", "down_proj")


def dense_experts_supported(module: nn.Module) -> bool:
    """A module with Llama 4's text experts' layout: ``gate_up_proj`` ``(E, d, 2I)`` and ``down_proj``
    ``(E, I, d)``, ``num_experts``, ``expert_dim`` and ``act_fn``, not built on transformers'
    ``use_experts_implementation`` (those route each token to its own experts: :mod:`.experts`)."""
    if hasattr(module, "has_gate") or not all(hasattr(module, a) for a in ("num_experts", "expert_dim", "act_fn")):
        return False
    first, second = (getattr(module, n, None) for n in _NAMES)
    return (isinstance(first, Tensor) and isinstance(second, Tensor) and first.dim() == second.dim() == 3
            and first.shape[0] == second.shape[0] == module.num_experts
            and first.shape[2] == 2 * module.expert_dim and second.shape[1] == module.expert_dim)


class DenseExpertsRule(Rule):
    """Per-sample gradients of experts applied densely, block by block (see the module docstring)."""

    on_probation = True
    substitutes_forward = True

    def __init__(self, module: nn.Module, params: dict[str, int]) -> None:
        super().__init__(module, params)
        #: What :meth:`recording_forward` kept of the call in progress, for :meth:`take_recorded`.
        self._pending: tuple[Tensor, Tensor, Tensor] | None = None

    def recording_forward(self, hidden_states: Tensor) -> Tensor:
        """The experts' forward while the engine records, with ``z¹`` a tap and the blocks' inputs ``x`` and
        ``h`` kept."""
        module = self.module
        x = hidden_states.view(module.num_experts, -1, hidden_states.shape[-1])
        first = torch.bmm(x, module.gate_up_proj)
        gate, up = first.chunk(2, dim=-1)
        h = up * module.act_fn(gate)
        self._pending = (first, x.detach(), h.detach())
        return torch.bmm(h, module.down_proj).view(-1, hidden_states.shape[-1])

    def take_recorded(self, call: Call) -> list[Tensor]:
        """The ``z¹`` tap of the call just recorded; the call's rows are read by sample within each block."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        first, x, h = pending
        tokens = x.shape[1]
        if tokens % call.size:
            return []
        call.own_layout = True
        call.cache[PARTS], call.cache["blocks"] = [first], (x, h)
        return [first]

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        x, h = call.cache["blocks"]
        experts, size = self.module.num_experts, call.size
        out: Grads = {}
        deltas = (sens[-1], sens[0])  # ∂/∂z¹ (m, E, N, 2I) and ∂/∂out (m, E·N, d)
        m = next(s.shape[0] for s in sens if s is not None)
        for name, a, g in zip(_NAMES, (x, h), deltas):
            if name not in self.params:
                continue
            if g is None:  # the vectors do not reach this map
                out[self.params[name]] = x.new_zeros(len(range(*rows.indices(size))), m, getattr(self.module, name).numel())
                continue
            a = as_float(a.unflatten(1, (size, -1))[:, rows])  # (E, b, T, in)
            g = as_float(g.reshape(m, experts, size, -1, g.shape[-1])[:, :, rows])  # (m, E, b, T, out)
            b, positions = a.shape[1], a.shape[2]
            inputs = a.transpose(0, 1).reshape(b * experts, positions, -1)
            stacked = g.permute(2, 1, 3, 0, 4).reshape(b * experts, positions, -1)
            out[self.params[name]] = block_gradients(inputs, stacked, b, m, transposed=True)
        return out
