"""``nn.Embedding``: a table lookup ``z_l = W[t_l]`` at each position ``l`` of a sample; ``nn.EmbeddingBag``.

The per-sample gradient of ``W`` holds, in the row of token ``k``, the sum of the sensitivities
``g_l`` of the positions where the sample has token ``k`` (docs/math.md §6). Only the rows a sample
uses are non-zero, so the squares and the squared norms are built from those sums alone.

A subclass with a forward of its own that scales the lookup by a constant, ``z_l = c·W[t_l]`` (Gemma's
and BART's scaled word embeddings), has the same gradients with ``c·g_l``: the factor is read off the
recorded call (:func:`lookup_scale`), and the coverage check confirms the rule as for any subclass.

``nn.EmbeddingBag`` in mode ``sum`` or ``mean`` sums its lookups over each sample's bag with weights
``w_l`` (1; ``1/n`` over the bag's ``n`` ids other than ``padding_idx``; or the call's
``per_sample_weights``), ``z = Σ_l w_l W[t_l]``: the lookup's gradients with ``g_l = w_l g``
(:class:`EmbeddingBagRule`, for one bag per sample: the rows of a 2-D input, or cut from a 1-D one by
``offsets``).
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Call, Factors, Grads, Rule, as_float


def embedding_supported(module: nn.Module) -> bool:
    """Lookups whose per-sample gradient is the plain scatter (no max_norm, no frequency scaling)."""
    return isinstance(module, nn.Embedding) and module.max_norm is None and not module.scale_grad_by_freq


def embedding_bag_supported(module: nn.Module) -> bool:
    """Bags that sum or average their lookups (not ``max``), with the plain scatter."""
    return (isinstance(module, nn.EmbeddingBag) and module.mode in ("sum", "mean") and module.max_norm is None
            and not module.scale_grad_by_freq)


#: The key of :attr:`.base.Call.cache` under which the rule keeps a call's scale ``c`` (module docstring).
SCALE = "lookup_scale"


def lookup_scale(module: nn.Embedding, call: Call) -> float | None:
    """``c`` where the call's output is ``c·W[ids]`` for its first argument ``ids`` (to a few units in the last
    place), else None."""
    ids = call.args[0] if call.args else None
    if not call.taps or not isinstance(ids, Tensor) or ids.is_floating_point() or ids.numel() == 0:
        return None
    out = call.taps[0].detach()
    if out.shape != (*ids.shape, module.embedding_dim) or ids.min() < 0 or ids.max() >= module.num_embeddings:
        return None
    lookup = F.embedding(ids, module.weight.detach())
    at = lookup.abs().argmax()
    if lookup.reshape(-1)[at] == 0:
        return None
    scale = (out.reshape(-1)[at] / lookup.reshape(-1)[at]).item()
    tolerance = 16 * torch.finfo(out.dtype).eps
    return scale if torch.allclose(out, lookup * scale, rtol=tolerance, atol=tolerance * out.abs().max().item()) else None


class EmbeddingRule(Rule):
    """Per-sample products of ``nn.Embedding`` (``padding_idx`` rows get no gradient, as in torch), and of
    subclasses that scale its lookup by a constant."""

    sparse_grads = True

    def take_recorded(self, call: Call) -> list[Tensor]:
        """No taps; the call's scale in its cache, for a subclass whose output is a multiple ``c ≠ 1`` of the lookup."""
        if self.on_probation:
            scale = lookup_scale(self.module, call)
            if scale is not None and scale != 1.0:
                call.cache[SCALE] = scale
        return []

    @staticmethod
    def _sensitivity(call: Call, sens: list[Tensor | None]) -> Tensor:
        """The sensitivities of the lookup ``W[ids]``: the output's, times the call's scale."""
        scale = call.cache.get(SCALE)
        return sens[0] if scale is None else sens[0] * scale

    def _ids(self, call: Call) -> Tensor:
        """The call's token ids, one row per sample: ``(B, L)``."""
        return call.args[0].reshape(call.size, -1)

    def _sums(self, ids: Tensor, g: Tensor) -> tuple[Tensor, Tensor, int]:
        """Per (vector, sample, token) sums of sensitivities ``(U, d)``, their (vector·B + sample) and token ids,
        for ``ids`` ``(B, L)``."""
        size = ids.shape[0]
        m, dim = g.shape[0], g.shape[-1]
        g = as_float(g.reshape(m, size, -1, dim))
        vocab = self.module.num_embeddings
        owner = torch.arange(m * size, device=ids.device).reshape(m, size, 1)
        keys = (owner * vocab + ids.unsqueeze(0)).reshape(-1)
        if self.module.padding_idx is not None:
            keep = ids.unsqueeze(0).expand(m, -1, -1).reshape(-1) != self.module.padding_idx % vocab
            keys, g = keys[keep], g.reshape(-1, dim)[keep]
        unique, inverse = torch.unique(keys, return_inverse=True)
        sums = g.new_zeros(unique.shape[0], dim).index_add_(0, inverse, g.reshape(-1, dim))
        return sums, unique, vocab

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        if "weight" not in self.params:
            return {}
        ids = self._ids(call)[rows]
        g = self._sensitivity(call, sens)[:, rows]
        sums, unique, vocab = self._sums(ids, g)
        m, b = g.shape[0], ids.shape[0]
        dense = sums.new_zeros(m * b * vocab, sums.shape[-1]).index_copy_(0, unique, sums)
        return {self.params["weight"]: dense.reshape(m, b, -1).transpose(0, 1)}

    def add_grads(self, call: Call, sens: list[Tensor | None], rows: slice, into: Tensor, index: int) -> Tensor:
        """The rows of the tokens each sample uses, added in place into ``into`` (contiguous, owned by the
        caller): a tied output layer's per-sample gradients get the lookup's without a dense copy."""
        if not into.is_contiguous():
            return super().add_grads(call, sens, rows, into, index)
        sums, unique, vocab = self._sums(self._ids(call)[rows], self._sensitivity(call, sens)[:, rows])
        b, m = into.shape[:2]
        owner, token = unique // vocab, unique % vocab  # owner = vector · b + sample
        at = ((owner % b) * m + owner // b) * vocab + token  # the row of (sample, vector, token) in into
        into.view(b * m * vocab, -1).index_add_(0, at, sums.to(into.dtype))
        return into

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        if "weight" not in self.params:
            return {}
        sums, unique, vocab = self._sums(self._ids(call), self._sensitivity(call, sens))
        table = sums.new_zeros(vocab, sums.shape[-1]).index_add_(0, unique % vocab, sums.square())
        return {self.params["weight"]: table.reshape(-1)}

    def factors(self, call: Call, sens: list[Tensor | None]) -> dict[int, Factors] | None:
        """``(token ids, g)``: one-hot rows times the sensitivities (zero at ``padding_idx``)."""
        if "weight" not in self.params:
            return {}
        ids = self._ids(call)  # (B, L)
        g = self._sensitivity(call, sens)
        g = as_float(g.reshape(g.shape[0], call.size, -1, g.shape[-1]))  # (m, B, L, d)
        if self.module.padding_idx is not None:
            g = g * (ids != self.module.padding_idx % self.module.num_embeddings)[None, :, :, None]
        return {self.params["weight"]: (ids, g)}

    def tensor_sample_squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        return {self.params["weight"]: self.sample_squares(call, sens)} if "weight" in self.params else {}

    def sample_squares(self, call: Call, sens: list[Tensor | None]) -> Tensor | None:
        m = sens[0].shape[0]
        if "weight" not in self.params:
            return sens[0].new_zeros(call.size, m)
        sums, unique, vocab = self._sums(self._ids(call), self._sensitivity(call, sens))
        norms = sums.new_zeros(m * call.size).index_add_(0, unique // vocab, sums.square().sum(-1))
        return norms.reshape(m, call.size).T


class EmbeddingBagRule(EmbeddingRule):
    """Per-sample products of ``nn.EmbeddingBag`` (``sum``, ``mean``), one bag per sample: the rows of a 2-D
    input, or the bags that ``offsets`` cut from a 1-D one (laid out as rows, padded with weight 0). The
    lookup rule's with each position's sensitivity ``w_l g`` (module docstring). On probation: where the
    call has not one bag per sample the rule raises, and the generic rule takes the module."""

    on_probation = True

    def take_recorded(self, call: Call) -> list[Tensor]:
        return []

    def _ids(self, call: Call) -> Tensor:
        return self._bags(call)[0]

    def _sensitivity(self, call: Call, sens: list[Tensor | None]) -> Tensor:
        """``(m, B, L, d)``: the bag's sensitivity ``g`` times each position's weight ``w_l``."""
        weights = self._bags(call)[1]
        return sens[0].unsqueeze(2) * weights[None, :, :, None].to(sens[0].dtype)

    def _bags(self, call: Call) -> tuple[Tensor, Tensor]:
        """The call's bags as rows of ids ``(B, L)`` and their weights ``w_l`` ``(B, L)`` (0 past a bag's end
        and at ``padding_idx``), once per call."""
        if "bags" not in call.cache:
            bound = inspect.signature(nn.EmbeddingBag.forward).bind(self.module, *call.args, **call.kwargs).arguments
            ids, offsets, weights = bound["input"], bound.get("offsets"), bound.get("per_sample_weights")
            dtype = self.module.weight.dtype
            weights = torch.ones(ids.shape, device=ids.device, dtype=dtype) if weights is None else weights.detach()
            if ids.dim() == 1:
                ids, weights = _as_rows(ids, weights, offsets, self.module.include_last_offset)
            if ids.shape[0] != call.size:
                raise ValueError(f"{ids.shape[0]} bags in a batch of {call.size}: left to the generic rule")
            if self.module.padding_idx is not None:
                weights = weights * (ids != self.module.padding_idx % self.module.num_embeddings)
            if self.module.mode == "mean":
                weights = weights / (weights != 0).sum(1, keepdim=True).clamp_min(1)
            call.cache["bags"] = (ids, weights)
        return call.cache["bags"]


def _as_rows(ids: Tensor, weights: Tensor, offsets: Tensor, include_last: bool) -> tuple[Tensor, Tensor]:
    """The bags ``offsets`` cuts from the 1-D ``ids`` as rows ``(bags, longest)``, padded with id 0 and
    weight 0 (``include_last``: ``offsets`` ends with the end of the last bag)."""
    ends = offsets[1:] if include_last else torch.cat([offsets[1:], offsets.new_tensor([ids.numel()])])
    starts = offsets[:-1] if include_last else offsets
    lengths = ends - starts
    width = int(lengths.max()) if lengths.numel() else 0
    bag = torch.arange(starts.numel(), device=ids.device).repeat_interleave(lengths)
    position = torch.arange(bag.numel(), device=ids.device) - starts[bag]
    taken = slice(int(starts[0]), int(starts[0]) + bag.numel()) if starts.numel() else slice(0, 0)
    rows = ids.new_zeros(starts.numel(), width)
    rows[bag, position] = ids[taken]
    row_weights = weights.new_zeros(starts.numel(), width)
    row_weights[bag, position] = weights[taken]
    return rows, row_weights
