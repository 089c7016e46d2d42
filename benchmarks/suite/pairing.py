"""Ratios of two contenders from paired calls, so that the machine's slow and fast phases cancel.

A quotient of two medians compares calls taken seconds apart: on two shared cores one plain penalty
step took anywhere from 2.3 to 16 ms in one run, and the medians of two contenders can land in
different phases (a finite-difference step once came out faster than its own passes alone). The
harness therefore runs each round turn by turn (every contender's ``k``-th call of the round, one after
the other) and records each call's ``(round, turn)``. :func:`paired_ratio` divides each call of ``a`` by
the call of ``b`` in the same round and turn (``b``'s last call of the round when ``b`` has fewer turns),
at most a few calls apart, and returns the median of these quotients, over the pairs whose two calls
both ran on a quiet machine when there are at least five of them (as the medians of seconds are taken).
This is what ``benchmarks/regression.py`` does between two commits.
"""

from __future__ import annotations

import statistics

__all__ = ["paired_ratio", "ratio"]


def paired_ratio(details: dict, workload: str, a: str, b: str) -> float | None:
    """Median over ``a``'s calls of ``seconds(a) / seconds(b)`` for ``b``'s call of the same turn; None
    when either contender has no recorded turns (a run from before the turns were recorded)."""
    turns = details.get("turns", {}).get(workload, {})
    samples = details.get("samples", {}).get(workload, {})
    clean = details.get("clean", {}).get(workload, {})
    if not turns.get(a) or not turns.get(b):
        return None
    by_turn: dict[int, dict[int, tuple[float, bool]]] = {}
    for (r, k), s, ok in zip(turns[b], samples[b], clean.get(b, [True] * len(samples[b]))):
        by_turn.setdefault(r, {})[k] = (s, ok)
    pairs = []
    for (r, k), s, ok in zip(turns[a], samples[a], clean.get(a, [True] * len(samples[a]))):
        round_b = by_turn.get(r)
        if round_b:
            sb, ok_b = round_b[k] if k in round_b else round_b[max(round_b)]
            pairs.append((s / sb, ok and ok_b))
    if not pairs:
        return None
    kept = [q for q, ok in pairs if ok]
    return statistics.median(kept if len(kept) >= min(5, len(pairs)) else [q for q, _ in pairs])


def ratio(main: dict, details: dict | None, w1: str, c1: str, w2: str, c2: str) -> float | None:
    """``c1`` of workload ``w1`` over ``c2`` of ``w2``: paired (:func:`paired_ratio`) within one workload
    whose turns were recorded, else the quotient of the two medians."""
    if details is not None and w1 == w2:
        paired = paired_ratio(details, w1, c1, c2)
        if paired is not None:
            return paired
    a, b = main.get(w1, {}).get(c1), main.get(w2, {}).get(c2)
    return a / b if a is not None and b else None
