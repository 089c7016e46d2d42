"""``nn.MultiheadAttention``: its input and output projections, with attention recomputed locally.

With inputs ``x_q, x_k, x_v`` (one row per position) the module computes ``q = x_q W_qᵀ + b_q``
(likewise ``k``, ``v``), ``c = attention(q, k, v)`` head by head, and ``z = c W_oᵀ + b_o``. Given the
output sensitivities ``g = ∂(vᵀo)/∂z`` of a sample, the out-projection is a linear layer on ``c``:
``∂/∂W_o = Σ_l g_l c_lᵀ``, ``∂/∂b_o = Σ_l g_l``; and with ``δ_q = ∂(vᵀo)/∂q`` (likewise ``δ_k``,
``δ_v``), obtained by one batched backward through the attention alone from ``g W_o``, the packed
in-projection gets ``∂/∂W_q = Σ_l δ_{q,l} x_{q,l}ᵀ`` and ``∂/∂b_q = Σ_l δ_{q,l}`` (docs/math.md §6.3b).
Attention mixes positions but never samples, so the batched backward gives every sample its own δ.

While the engine records, the module runs :meth:`AttentionRule.recording_forward`, the same
computation in its parts, which keeps ``c`` and makes ``q, k, v`` taps of the call: the engine's
backward of the output vectors then delivers ``δ_q, δ_k, δ_v`` with everything else, and no part of
the attention is computed again. Calls that ask for the attention weights keep the module's own
forward and the local backward above.

Covered: packed projections, or q, k and v weights of their own (``kdim``, ``vdim``), no ``add_bias_kv``/``add_zero_attn``,
batched inputs (either ``batch_first``), ``attn_mask`` (2-D or 3-D, boolean or additive) and
``key_padding_mask``, attention dropout inactive, the attention weights not used downstream. Any
other call goes to the generic rule.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..attention_kernel import math_attention
from .base import PARTS, Call, Grads, Rule, as_float, positions_grads, positions_squares
from .generic import GenericRule

#: The parameters the rule covers, by their names below the module.
PARAMETERS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias", "out_proj.weight",
              "out_proj.bias")
#: The in-projection's weights of q, k and v: the packed one's rows, or three of their own (``kdim``, ``vdim``).
_SEPARATE = ("q_proj_weight", "k_proj_weight", "v_proj_weight")


def attention_supported(module: nn.Module) -> bool:
    """Whether ``module`` is a multi-head attention whose every call the rule may cover."""
    return isinstance(module, nn.MultiheadAttention) and module.bias_k is None and not module.add_zero_attn


def _additive(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A boolean mask (True = not attended) as an additive one (−inf there), in ``dtype``."""
    if mask is None or mask.is_floating_point():
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))


class AttentionRule(Rule):
    """Per-sample gradients of ``nn.MultiheadAttention``'s own projections (see the module docstring)."""

    def __init__(self, module: nn.Module, params: dict[str, int], path: str) -> None:
        super().__init__(module, params)
        self.generic = GenericRule(module, params, path)
        self.signature = inspect.signature(module.forward)
        #: Which projections have a trainable parameter ("in_proj", "out_proj"): only those are computed.
        self.trained = {"in_proj" if name.startswith(("in_proj", *_SEPARATE)) else "out_proj" for name in params}
        #: The names of the q, k and v blocks' weights (the packed weight's three times where it is packed).
        self.in_weights = ("in_proj_weight",) * 3 if module._qkv_same_embed_dim else _SEPARATE
        #: What :meth:`recording_forward` kept of the call in progress, for :meth:`take_recorded`.
        self._pending: tuple[list[Tensor], Tensor] | None = None

    def _arguments(self, call: Call) -> dict:
        """The call's arguments by name, defaults included (bound once per call)."""
        if "arguments" not in call.cache:
            bound = self.signature.bind(*call.args, **call.kwargs)
            bound.apply_defaults()
            call.cache["arguments"] = bound.arguments
        return call.cache["arguments"]

    def _covers(self, call: Call, sens: list[Tensor | None]) -> bool:
        dropout = self.module.training and self.module.dropout > 0
        weights_used = any(s is not None for s in sens[1 : len(sens) - len(call.cache.get(PARTS, ()))])
        return not dropout and not weights_used and self._arguments(call)["query"].dim() == 3

    # ------------------------------------------------------------ recording in parts
    def recording_forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                          need_weights: bool = True, attn_mask: Tensor | None = None,
                          average_attn_weights: bool = True, is_causal: bool = False) -> tuple[Tensor, None]:
        """The module's forward while the engine records: ``nn.MultiheadAttention.forward`` computed in
        parts (projections, attention, out-projection), its ``q, k, v`` and ``c`` kept for the call.

        ``is_causal`` is a hint that ``attn_mask`` is the causal mask (as in torch), so the mask is used.
        Calls the parts do not cover (attention weights asked for, dropout active, unbatched inputs)
        run the module's own forward.
        """
        module = self.module
        args = (query, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal)
        own = need_weights or (module.training and module.dropout > 0) or query.dim() != 3
        if own or (is_causal and attn_mask is None):  # the last: torch refuses the hint without a mask
            self._pending = None
            return type(module).forward(module, *args)
        if query is key and key is value and module._qkv_same_embed_dim:  # one packed projection, one tap
            parts = [F.linear(query, module.in_proj_weight, module.in_proj_bias)]
            qkv = parts[0].chunk(3, -1)
        else:
            parts = qkv = _project((query, key, value), _in_weights(module), module.in_proj_bias)
        first = [t if module.batch_first else t.transpose(0, 1) for t in qkv]  # (B, L, E)
        mask = self._mask({"attn_mask": attn_mask, "key_padding_mask": key_padding_mask}, first[0])
        ctx = _attend(*first, mask, module.num_heads)
        z = F.linear(ctx, module.out_proj.weight, module.out_proj.bias)
        self._pending = (parts, ctx.detach())
        return (z if module.batch_first else z.transpose(0, 1)), None

    def take_recorded(self, call: Call) -> list[Tensor]:
        """The ``q, k, v`` taps of the call just recorded (none when it ran the module's own forward)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        # A frozen in-projection needs no δ (and its q, k, v need not carry autograd history).
        parts = list(pending[0]) if "in_proj" in self.trained else []
        call.cache[PARTS], call.cache["context"] = parts, pending[1]
        return parts

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        if not self._covers(call, sens):
            return self.generic.grads(call, sens, rows)
        x, g, ctx, deltas = self._prepared(call, sens)
        out: Grads = {}
        positions_grads(self, g[:, rows], ctx[rows], "out_proj.weight", "out_proj.bias", out)
        if "in_proj" in self.trained:
            self._in_projection([t[rows] for t in x], [d[:, rows] for d in deltas], out)
        return out

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        """Both projections' squares by :func:`.base.positions_squares` (None: the call goes generic)."""
        if not self._covers(call, sens):
            return None
        x, g, ctx, deltas = self._prepared(call, sens)
        squares = {}  # per parameter name: its squares, weights (out, in) in the layout (in, out)
        if "in_proj" in self.trained:
            pairs = self._in_parts(x, deltas)
            parts = [positions_squares(d, xi, self.in_weights[k] in self.params) for k, (d, xi) in enumerate(pairs)]
            if self.in_weights[0] == "in_proj_weight":
                squares["in_proj_weight"] = parts[0][0] if len(parts) == 1 or parts[0][0] is None else \
                    torch.cat([w for w, _ in parts], 1)
            else:
                squares.update({name: w for name, (w, _) in zip(self.in_weights, parts)})
            squares["in_proj_bias"] = torch.cat([b for _, b in parts])
        if "out_proj" in self.trained:
            squares["out_proj.weight"], squares["out_proj.bias"] = positions_squares(g, ctx, "out_proj.weight" in self.params)
        return {i: (squares[name] if name.endswith("bias") else squares[name].T).reshape(-1)
                for name, i in self.params.items()}

    def _prepared(self, call: Call, sens: list[Tensor | None]) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
        """Inputs, output sensitivities, ``c`` and ``δ`` of the call: once per call and group of vectors."""
        cached = call.cache.get("prepared")
        if cached is None or cached[0] is not sens[0]:
            prepared = self._recorded(call, sens) if PARTS in call.cache else self._local(call, sens[0])
            cached = call.cache["prepared"] = (sens[0], prepared)
        return cached[1]

    def _recorded(self, call: Call, sens: list[Tensor | None]) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
        """Inputs, output sensitivities, ``c`` and ``δ`` of a call recorded in parts (as :meth:`_local`)."""
        g, deltas = sens[0], sens[len(sens) - len(call.cache[PARTS]) :]
        if not self.module.batch_first:  # (m, L, B, ·) → (m, B, L, ·)
            g, deltas = g.transpose(1, 2), [d.transpose(1, 2) for d in deltas]
        return self._inputs(call), as_float(g), as_float(call.cache["context"]), [as_float(d) for d in deltas]

    def _local(self, call: Call, sens: Tensor) -> tuple[list[Tensor], Tensor, Tensor, list[Tensor]]:
        """Inputs ``(B, L, E)``, sensitivities ``(m, B, L, E)``, ``c`` and the δ of every sample, from one
        batched backward through the attention alone."""
        x, args = self._inputs(call), self._arguments(call)
        g = as_float(sens if self.module.batch_first else sens.transpose(1, 2))  # (m, B, L, E)
        ctx, deltas = self._attention_backward(x, g, self._mask(args, x[0]))
        return x, g, ctx, deltas

    def _inputs(self, call: Call) -> list[Tensor]:
        """The call's query, key and value inputs, each ``(B, L or S, E)``."""
        args, first = self._arguments(call), self.module.batch_first
        return [as_float(args[n] if first else args[n].transpose(0, 1)) for n in ("query", "key", "value")]

    def _mask(self, args: dict, q: Tensor) -> Tensor | None:
        """``attn_mask`` and ``key_padding_mask`` as one additive mask ``(b, heads, L, S)`` (or None)."""
        heads, dtype = self.module.num_heads, q.dtype
        mask = _additive(args["attn_mask"], dtype)
        if mask is not None:  # (L, S) for every sample and head, or (B·heads, L, S)
            mask = mask[None, None] if mask.dim() == 2 else mask.reshape(-1, heads, *mask.shape[1:])
        padding = _additive(args["key_padding_mask"], dtype)
        if padding is not None:
            padding = padding[:, None, None, :]
            mask = padding if mask is None else mask + padding
        return mask

    def _attention_backward(self, x: list[Tensor], g: Tensor, mask: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        """The attention output ``c`` (b, L, E) and ``[δ_q, δ_k, δ_v]``, each ``(m, b, L or S, E)``."""
        module = self.module
        m, b = g.shape[0], g.shape[1]
        bias = None if module.in_proj_bias is None else module.in_proj_bias.detach()
        qkv = _project(x, [w.detach() for w in _in_weights(module)], bias)
        with torch.enable_grad():
            # One copy of the attention per vector: the vectors' backwards run as one batched pass.
            leaves = [t.unsqueeze(0).expand(m, *t.shape).reshape(m * b, *t.shape[1:]).requires_grad_() for t in qkv]
            rep = None
            if mask is not None:
                rep = mask.expand(b, -1, -1, -1).unsqueeze(0).expand(m, -1, -1, -1, -1).reshape(m * b, *mask.shape[1:])
            ctx = _attend(*leaves, rep, module.num_heads)
            g_ctx = g @ module.out_proj.weight.detach().to(g.dtype)
            deltas = torch.autograd.grad(ctx, leaves, g_ctx.reshape(ctx.shape))
        c = ctx.detach().reshape(m, b, *ctx.shape[1:])[0]
        return c, [d.reshape(m, b, *d.shape[1:]) for d in deltas]

    def _in_parts(self, x: list[Tensor], deltas: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
        """The in-projection as ``(δ, input)`` pairs: one for packed self-attention (the three row blocks
        q, k, v of ``W_in`` on one input, side by side), else one per block. ``deltas`` is
        ``[δ_q, δ_k, δ_v]``, or the three side by side ``(m, b, L, 3E)`` when recorded in parts."""
        same = all(t.data_ptr() == x[0].data_ptr() and t.shape == x[0].shape and t.stride() == x[0].stride() for t in x)
        if len(deltas) == 1 or (same and self.in_weights[0] == "in_proj_weight"):
            return [(deltas[0] if len(deltas) == 1 else torch.cat(deltas, -1), x[0])]
        return list(zip(deltas, x))

    def _in_projection(self, x: list[Tensor], deltas: list[Tensor], out: Grads) -> None:
        """The in-projection's per-sample gradients (see :meth:`_in_parts`): each block's, the packed weight's
        and the bias's blocks side by side."""
        pairs = self._in_parts(x, deltas)
        if len(pairs) == 1:
            positions_grads(self, *pairs[0], "in_proj_weight", "in_proj_bias", out)
            return
        parts: list[Grads] = [{}, {}, {}]
        for k, (d, xi) in enumerate(pairs):
            positions_grads(self, d, xi, self.in_weights[k], "in_proj_bias", parts[k])
        for name in ("in_proj_weight", "in_proj_bias"):
            if name in self.params:
                i = self.params[name]
                b, m = parts[0][i].shape[:2]
                out[i] = torch.cat([p[i].reshape(b, m, -1) for p in parts], -1)
        out.update({self.params[n]: parts[k][self.params[n]] for k, n in enumerate(_SEPARATE) if n in self.params})


def _in_weights(module: nn.MultiheadAttention) -> list[Tensor]:
    """The weights of q, k and v: the row blocks of the packed in-projection, or their own (``kdim``, ``vdim``)."""
    if module._qkv_same_embed_dim:
        return list(module.in_proj_weight.chunk(3))
    return [module.q_proj_weight, module.k_proj_weight, module.v_proj_weight]


def _project(inputs: tuple[Tensor, ...] | list[Tensor], weights: list[Tensor], bias: Tensor | None) -> list[Tensor]:
    """``q, k, v`` from their own inputs through their weights and the blocks of the packed ``bias``."""
    biases = (None, None, None) if bias is None else bias.chunk(3)
    return [F.linear(t, w, b) for t, w, b in zip(inputs, weights, biases)]


def _attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, heads: int) -> Tensor:
    """Scaled dot-product attention over ``heads`` heads: ``(n, L, E)`` inputs, ``(n, L, E)`` output."""
    n, length, width = q.shape

    def split(t: Tensor) -> Tensor:
        return t.reshape(n, t.shape[1], heads, width // heads).transpose(1, 2)

    # The math kernel: on CPU the fused kernels are several times slower at these small shapes.
    with math_attention():
        ctx = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
    return ctx.transpose(1, 2).reshape(n, length, width)
