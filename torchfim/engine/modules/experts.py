"""Hugging Face's fused mixture-of-experts layers: two linear maps per (token, expert) pair.

The experts modules of transformers (classes decorated with ``use_experts_implementation``: Mixtral,
Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE, GPT-OSS and some seventy more) hold every expert's weights in one
3-D tensor and take the router's choice with the hidden states: token ``n`` goes to experts
``e_{n1}, …, e_{nk}`` with weights ``w_{n1}, …, w_{nk}``. For each pair ``p = (n, j)`` with ``e = e_{nj}``::

    z¹_p = W¹_e x_n + b¹_e,   h_p = gate(z¹_p),   z²_p = W²_e h_p + b²_e,   out_n = Σ_j w_{nj} norm(z²_{nj})

(``W¹`` is ``gate_up_proj``, or ``up_proj`` without a gate; ``gate`` the class's ``_apply_gate`` or its
activation; ``norm`` an optional post-expert norm; weights stored ``(E, out, in)``, or ``(E, in, out)``
transposed). Expert ``e``'s weights enter a sample's output only through its pairs routed to ``e``, each a
linear map, so with ``δ¹_p = ∂(vᵀo)/∂z¹_p`` and ``δ²_p = ∂(vᵀo)/∂z²_p`` (total derivatives, every path
through later pairs and positions included) the per-sample gradients are those of linear maps at the
sample's pairs routed to ``e`` (docs/math.md §6.3g)::

    ∂(vᵀo)/∂W¹_e = Σ_{p→e} δ¹_p x_pᵀ,   ∂(vᵀo)/∂b¹_e = Σ_{p→e} δ¹_p,   likewise W²_e, b²_e with δ² and h.

While the engine records, the module runs :meth:`ExpertsRule.recording_forward`: the same computation,
expert by expert on the pairs sorted by expert, whose ``z¹`` and ``z²`` (in token order, ``(N, k, ·)``)
are taps of the call, so the engine's backward of the output vectors delivers the ``δ`` with everything
else. Each sample's pairs are then gathered expert by expert into blocks of equal length (padded with
zeros), and one batched product per weight gives every (sample, expert) its gradient. An index ``≥ E``
(a dropped token) contributes nothing, as in the module. The rule is on probation: the coverage check
compares the output recorded so with the model's own and the per-sample gradients with autograd's on the
first batch, and a class whose forward computes something else gives way to the generic rule.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PARTS, Call, Grads, Rule, as_float

#: The two maps' parameters by the names transformers gives them: (weight, bias) of the first and second.
_GATED = (("gate_up_proj", "gate_up_proj_bias"), ("down_proj", "down_proj_bias"))
_PLAIN = (("up_proj", "up_proj_bias"), ("down_proj", "down_proj_bias"))


def _maps(module: nn.Module) -> tuple[tuple[str, str], tuple[str, str]]:
    return _GATED if module.has_gate else _PLAIN


def experts_supported(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module the rule follows: the attributes that
    ``use_experts_implementation`` sets, 3-D weights, experts not spread over processes."""
    flags = ("has_gate", "has_bias", "is_transposed", "has_post_expert_norm", "_is_expert_parallel", "num_experts")
    if not all(hasattr(module, f) for f in flags) or module._is_expert_parallel:
        return False
    weights = [getattr(module, weight, None) for weight, _ in _maps(module)]
    return all(isinstance(w, Tensor) and w.dim() == 3 and w.shape[0] == module.num_experts for w in weights)


def covered_names(module: nn.Module) -> set[str]:
    """The names of the parameters the rule covers."""
    return {name for pair in _maps(module) for name in pair}


class ExpertsRule(Rule):
    """Per-sample gradients of a fused experts module's weights (see the module docstring)."""

    reads_regrouped_rows = True
    on_probation = True
    substitutes_forward = True

    def __init__(self, module: nn.Module, params: dict[str, int]) -> None:
        super().__init__(module, params)
        self.signature = inspect.signature(type(module).forward)
        #: Per map (first, second): whether it has a trainable parameter, so that its ``z`` is a tap.
        self.trained = [any(name in params for name in pair) for pair in _maps(module)]
        #: What :meth:`recording_forward` kept of the call in progress, for :meth:`take_recorded`.
        self._pending: tuple[list[Tensor], Tensor, Tensor, Tensor] | None = None

    # ------------------------------------------------------------ recording
    def recording_forward(self, *args: object, **kwargs: object) -> Tensor:
        """The module's forward while the engine records (module docstring): the same output, with ``z¹`` and
        ``z²`` kept as taps for the call, and ``x``, the experts' indices and ``h`` for its products."""
        module = self.module
        x, index, weights = self._routing(args, kwargs)
        experts = module.num_experts
        n, k = index.shape
        flat = index.reshape(-1).clamp(max=experts)  # experts' indices; ``experts`` stands for a dropped pair
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=experts + 1).tolist()
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        (w1, b1), (w2, b2) = [(getattr(module, w), getattr(module, b, None)) for w, b in _maps(module)]
        pairs = x.unsqueeze(1).expand(n, k, x.shape[-1]).reshape(n * k, -1)  # each token's row once per pair
        first = self._grouped(_rows(pairs, order, inverse), w1, b1 if module.has_bias else None, counts)
        first = _rows(first, inverse, order).view(n, k, -1)
        h = module._apply_gate(first) if module.has_gate else module.act_fn(first)
        second = self._grouped(_rows(h.reshape(n * k, -1), order, inverse), w2, b2 if module.has_bias else None, counts)
        second = _rows(second, inverse, order).view(n, k, -1)
        y = second
        if module.has_post_expert_norm:
            y = module.post_expert_norm(second.reshape(n * k, -1)).view(n, k, -1)
        kept = weights * (index < experts)
        self._pending = ([z for z, trained in zip((first, second), self.trained) if trained], x.detach(),
                         index, h.detach())
        return (y * kept.unsqueeze(-1)).sum(1).to(x.dtype)

    def _routing(self, args: tuple, kwargs: dict) -> list[Tensor]:
        """The call's hidden states, experts' indices and weights: its first three arguments, by the names of
        the class forward where it has them (a forward taking ``*args`` has them in order)."""
        kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        bound = self.signature.bind_partial(self.module, *args, **kwargs).arguments
        named = [bound[n] for n, p in self.signature.parameters.items() if p.kind in kinds and n in bound][1:4]
        return named if len(named) == 3 else list(args[:3])

    def _grouped(self, rows: Tensor, weight: Tensor, bias: Tensor | None, counts: list[int]) -> Tensor:
        """``W_e r + b_e`` for the rows ``rows`` sorted by expert, ``counts[e]`` of them for expert ``e``,
        and zero rows for the dropped pairs after them (``counts[-1]``)."""
        pieces, start = [], 0
        transposed = self.module.is_transposed
        for e, count in enumerate(counts[:-1]):
            if count:
                part = rows[start : start + count]
                out = part @ weight[e] if transposed else F.linear(part, weight[e])
                pieces.append(out if bias is None else out + bias[e])
                start += count
        units = weight.shape[2] if transposed else weight.shape[1]
        pieces.append(rows.new_zeros(counts[-1], units))
        return torch.cat(pieces)

    def take_recorded(self, call: Call) -> list[Tensor]:
        """The ``z¹``, ``z²`` taps of the call just recorded (those of maps with a trainable parameter)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        taps, x, index, h = pending
        call.cache[PARTS] = taps
        call.cache["routing"] = (call.batch_first(x), call.batch_first(index), call.batch_first(h))
        return taps

    # ------------------------------------------------------------ products
    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        x, index, h = (t[rows] for t in call.cache["routing"])
        b = x.shape[0]
        x = as_float(x.reshape(b, -1, x.shape[-1]))  # (b, T, in)
        index = index.reshape(b, -1)  # (b, L): L = T·k pairs per sample
        pairs = index.shape[1]
        inputs = (x, as_float(h.reshape(b, pairs, -1)))
        deltas = iter(sens[len(sens) - len(call.cache[PARTS]) :])
        out: Grads = {}
        for (weight, bias), trained, a in zip(_maps(self.module), self.trained, inputs):
            g = next(deltas) if trained else None
            if g is None:
                continue
            g = as_float(g[:, rows]).reshape(g.shape[0], b, pairs, -1)  # (m, b, L, out)
            if weight in self.params:
                out[self.params[weight]] = self._weight_grads(call, rows, g, a, pairs // a.shape[1] if a is x else 1)
            if bias in self.params:  # Σ of δ over each sample's pairs routed to e: a scatter-add by expert
                experts = self.module.num_experts
                where = index.clamp(max=experts)[None, :, :, None].expand_as(g)
                summed = g.new_zeros(g.shape[0], b, experts + 1, g.shape[-1]).scatter_add_(2, where, g)
                out[self.params[bias]] = summed[:, :, :experts].transpose(0, 1).reshape(b, g.shape[0], -1)
        named = dict(self.module.named_parameters(recurse=False))
        m = next(s.shape[0] for s in sens if s is not None)
        for name, i in self.params.items():
            if i not in out:  # a map the vectors do not reach
                out[i] = x.new_zeros(b, m, named[name].numel())
        return out

    def _weight_grads(self, call: Call, rows: slice, g: Tensor, a: Tensor, per_row: int) -> Tensor:
        """Per-sample gradients ``(b, m, E·out·in)`` of one map's weight from its sensitivities ``g``
        ``(m, b, L, out)`` at the pairs and its inputs ``a`` ``(b, L / per_row, in)`` (a token's row serves its
        ``per_row`` pairs): one batched product over every (sample, expert) block of pairs."""
        if "blocks" not in call.cache:
            index = call.cache["routing"][1]
            call.cache["blocks"] = _expert_blocks(index.reshape(index.shape[0], -1), self.module.num_experts)
        blocks, length = call.cache["blocks"]
        blocks = blocks[rows]  # (b, E·C); L where a sample has fewer pairs for an expert
        m, b, pairs, units = g.shape
        experts, width = self.module.num_experts, a.shape[-1]
        rows_of = blocks.clamp(max=pairs - 1)
        # A padded slot reads some pair's δ against a zero input row: it adds nothing.
        ge = _gathered(g, rows_of).permute(1, 2, 0, 3).reshape(b * experts, length, m * units)  # a view for m = 1
        ae = _gathered(a, rows_of // per_row).masked_fill_((blocks == pairs).unsqueeze(-1), 0)
        return block_gradients(ae.view(b * experts, length, width), ge, b, m, self.module.is_transposed)


def block_gradients(a: Tensor, g: Tensor, size: int, vectors: int, transposed: bool) -> Tensor:
    """Per-sample gradients ``(b, m, E·…)`` of stacked experts' weights from the blocks of positions of every
    (sample, expert), sample-major: inputs ``a`` ``(b·E, C, in)`` and sensitivities ``g`` ``(b·E, C, m·out)``,
    ``Σ_c a_c g_cᵀ`` per block and vector in the weights' layout, ``(E, in, out)`` where they are stored
    transposed, else ``(E, out, in)``; one batched product (a transposed operand is not copied)."""
    blocks, _, width = a.shape
    experts, units = blocks // size, g.shape[-1] // vectors
    if transposed:  # (b·E, in, m·out) → (b, m, E, in, out)
        product = torch.bmm(a.transpose(1, 2), g).view(size, experts, width, vectors, units).permute(0, 3, 1, 2, 4)
    else:  # (b·E, m·out, in) → (b, m, E, out, in)
        product = torch.bmm(g.transpose(1, 2), a).view(size, experts, vectors, units, width).transpose(1, 2)
    return product.reshape(size, vectors, -1)


class _Permuted(torch.autograd.Function):
    """The rows of ``t`` in the order ``order`` (a permutation), whose backward puts the rows back by the
    inverse permutation: a gather each way, where indexing's backward would scatter-add."""

    @staticmethod
    def forward(ctx, t: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
        ctx.inverse = inverse
        return t.index_select(0, order)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        return grad.index_select(0, ctx.inverse), None, None


def _rows(t: Tensor, order: Tensor, inverse: Tensor) -> Tensor:
    """``t[order]`` for a permutation ``order`` whose inverse is ``inverse`` (:class:`_Permuted`)."""
    return _Permuted.apply(t, order, inverse)


def _expert_blocks(index: Tensor, experts: int) -> tuple[Tensor, int]:
    """For experts' indices ``index`` ``(B, L)`` (``≥ experts``: dropped), the positions ``0 … L−1`` of each
    sample's pairs grouped by expert into ``experts`` blocks of ``C`` (the most pairs any sample routes to one
    expert), the rest of each block ``L``: ``(B, experts·C)``, and ``C``."""
    size, length = index.shape
    expert = index.clamp(max=experts)
    counts = torch.zeros(size, experts + 1, dtype=torch.long, device=index.device)
    counts.scatter_add_(1, expert, torch.ones_like(expert))
    block = max(1, int(counts[:, :experts].max()))
    order = torch.argsort(expert, dim=1, stable=True)
    sorted_expert = expert.gather(1, order)
    starts = counts.cumsum(1) - counts
    rank = torch.arange(length, device=index.device) - starts.gather(1, sorted_expert)
    slot = torch.where(sorted_expert < experts, sorted_expert * block + rank, experts * block)
    blocks = torch.full((size, experts * block + 1), length, dtype=torch.long, device=index.device)
    blocks.scatter_(1, slot, order)
    return blocks[:, :-1], block


def _gathered(t: Tensor, rows: Tensor) -> Tensor:
    """The rows ``rows`` ``(b, R)`` of each sample of ``t`` ``(…, b, L, d)``: ``(…, b, R, d)``."""
    *lead, b, length, width = t.shape
    flat = (rows + torch.arange(b, device=rows.device).unsqueeze(1) * length).reshape(-1)
    return t.reshape(*lead, b * length, width).index_select(-2, flat).view(*lead, b, -1, width)
