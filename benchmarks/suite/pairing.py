"""Ratios of two contenders from calls paired by round, so that the machine's slow and fast phases cancel.

A quotient of two medians sets calls taken minutes apart against each other: on two shared cores the
reference's median differed by 15-60 % between the fastest and the slowest of five rounds in one run
(2026-12-02), and a contender timed mostly in fast rounds looks cheaper than it is. Each call of the
harness keeps its ``(round, turn)`` (:mod:`.timing`); :func:`paired_ratio` divides each call of ``a``
by the median of ``b``'s calls in the same round and returns the median of these quotients. In the
committed run of 2026-12-02 the spread of the per-round quotients was below that of either
contender's per-round medians for most of the fast workloads (for the CNN's score diagonal 0.02 in
log against 0.06-0.08).

The partner is the round's median, not ``b``'s call of the same turn: a reference call that follows a
call of several seconds (curvlinops' dense GGN) ran two to three times slower than the reference's
other calls, and pairing a one-call-per-round contender with it halved the dense-GGN ratios.
Calls that ran under contention are left out (of the quotients and of the round's median) when at
least five of ``a``'s quiet calls remain, as for the medians of seconds.
"""

from __future__ import annotations

import statistics

__all__ = ["paired_ratio", "ratio", "workload_ratios"]


def _kept(values: list[float], quiet: list[bool], least: int) -> list[float]:
    """The quiet values when at least ``least`` of them (or all values are quiet), else all values."""
    kept = [v for v, ok in zip(values, quiet) if ok]
    return kept if len(kept) >= min(least, len(values)) else values


def paired_ratio(details: dict, workload: str, a: str, b: str) -> float | None:
    """Median over ``a``'s calls of ``seconds(a) / median(b's calls of the same round)``; None when
    either contender has no recorded turns (a run from before they were recorded)."""
    turns = details.get("turns", {}).get(workload, {})
    samples = details.get("samples", {}).get(workload, {})
    clean = details.get("clean", {}).get(workload, {})
    if not turns.get(a) or not turns.get(b):
        return None

    def rounds(c: str) -> dict[int, tuple[list[float], list[bool]]]:
        by_round: dict[int, tuple[list[float], list[bool]]] = {}
        for (r, _), s, ok in zip(turns[c], samples[c], clean.get(c, [True] * len(samples[c]))):
            by_round.setdefault(r, ([], []))
            by_round[r][0].append(s)
            by_round[r][1].append(ok)
        return by_round

    partner = {r: statistics.median(_kept(s, ok, 1)) for r, (s, ok) in rounds(b).items()}
    pairs = [(s / partner[r], ok) for r, (ss, oks) in rounds(a).items() if r in partner for s, ok in zip(ss, oks)]
    if not pairs:
        return None
    return statistics.median(_kept([q for q, _ in pairs], [ok for _, ok in pairs], 5))


def ratio(main: dict, details: dict | None, w1: str, c1: str, w2: str, c2: str) -> float | None:
    """``c1`` of workload ``w1`` over ``c2`` of ``w2``: paired (:func:`paired_ratio`) within one workload
    whose turns were recorded, else the quotient of the two medians."""
    if details is not None and w1 == w2:
        paired = paired_ratio(details, w1, c1, c2)
        if paired is not None:
            return paired
    a, b = main.get(w1, {}).get(c1), main.get(w2, {}).get(c2)
    return a / b if a is not None and b else None


def workload_ratios(main: dict, details: dict, workload: str) -> dict[str, float | None]:
    """Every timed contender of ``workload`` over the workload's reference (``details["ratio_reference"]``)."""
    ref = details["ratio_reference"][workload]
    return {c: ratio(main, details, workload, c, workload, ref) for c in main[workload]}
