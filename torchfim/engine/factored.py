"""Squared norms of a shared parameter's per-sample gradients from its uses' factors.

Each use of a weight adds ``Σ_k u_k v_kᵀ`` to a sample's gradient over its positions ``k``: a linear map
``u_k = g_k`` (the output sensitivity) and ``v_k = a_k`` (the input), its bias ``u_k = g_k`` and
``v_k = 1``, a table lookup ``u_k`` the one-hot row of token ``t_k`` and ``v_k = g_k``
(:meth:`.modules.Rule.factors`). The squared norm of the sum over every use is
``‖Σ_k u_k v_kᵀ‖² = Σ_{k,k'} (u_k·u_k')(v_k·v_k')`` over all pairs of positions of all uses
(docs/math.md §6.1-6.2): Gram matrices of the factors, where a one-hot factor's products are a gather
(against a dense one) or an equality test (against another). So a table tied to an output layer (GPT-2's
``wte``/``lm_head``) gets its per-sample squared norms without a per-sample table of its size.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from .modules import Call, Rule
from .modules.base import Factors

__all__ = ["shared_squared_norms"]


def shared_squared_norms(calls: Sequence[tuple[Rule, Call]], sens: Sequence[list], shared: set[int],
                         sizes: Sequence[int]) -> dict[int, Tensor]:
    """Per parameter of ``shared`` whose every use gives factors, where the Gram matrices cost less than
    the per-sample gradients: its squared norms ``(B, m)`` (``sizes``: each parameter's number of entries)."""
    uses: dict[int, list[Factors]] = {}
    refused: set[int] = set()
    for (rule, call), s in zip(calls, sens):
        mine = shared.intersection(rule.params.values())
        if not mine or all(t is None for t in s):
            continue
        given = rule.factors(call, s) or {}
        for i in mine:
            if i in given:
                uses.setdefault(i, []).append(given[i])
            else:
                refused.add(i)
    out = {}
    for i, pairs in uses.items():
        # Grams cost about K²·(widths) against K·size for the gradients, K positions over all uses
        positions = sum(v.shape[-2] for _, v in pairs)
        width = max(_width(u) + _width(v) for u, v in pairs)
        if i not in refused and positions * width < sizes[i]:
            out[i] = _norms(pairs).T
    return out


def _width(factor: Tensor) -> int:
    return factor.shape[-1] if factor.is_floating_point() else 1


def _norms(pairs: list[Factors]) -> Tensor:
    """``Σ_{p,q} Σ_{k,k'} (u_k·u_k')(v_k·v_k')`` over the uses ``p, q`` and their positions: ``(m, B)``."""
    total = None
    for p, (u, v) in enumerate(pairs):
        for q in range(p, len(pairs)):
            u2, v2 = pairs[q]
            term = (_gram(u, u2) * _gram(v, v2)).sum((-1, -2))
            term = term if q == p else 2 * term
            total = term if total is None else total + term
    return total


def _gram(x: Tensor, y: Tensor) -> Tensor:
    """``x_k·y_k'`` for factors ``(m or 1, B, K, n)`` (dense) or token ids ``(B, K)`` (one-hot rows): ``(·, B,
    K, K')`` (boolean between two one-hot factors, which the product with the other Gram promotes)."""
    if x.is_floating_point() and y.is_floating_point():
        return x @ y.transpose(-1, -2)
    if not x.is_floating_point() and not y.is_floating_point():
        return x[:, :, None] == y[:, None, :]
    if x.is_floating_point():
        return _gram(y, x).transpose(-1, -2)
    index = x[None, :, None, :].expand(*y.shape[:-1], x.shape[-1])  # y's entry at each token of x
    return y.gather(-1, index).transpose(-1, -2)  # (·, B, K', K) → (·, B, K, K')
