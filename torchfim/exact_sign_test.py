"""The exact arithmetic behind :func:`torchfim.compare.prob_outperform` and :func:`~torchfim.compare.fewest_pairs`:
the two-sided sign test, correctly rounded; the percentile interval of bootstrap totals, interpolated in fractions so
that swapping the methods mirrors it exactly; the rounding that keeps ``q`` and ``1 − q`` mirrored; and whether an
interval, in its limit of many resamples, reaches a verdict."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

__all__ = ["interval_concludes", "mirrored_float", "percentile_interval", "sign_test"]


def interval_concludes(n: int, losses: int, confidence: float, gamma: float) -> bool:
    """Whether the percentile interval of ``n − losses`` wins against ``losses``, in its limit of many resamples,
    lies above 1/2 (its lower quantile ``k_lo`` of ``K ~ Bin(n, p)``, ``p = (n − losses)/n``, above ``n/2``:
    ``P(K ≤ ⌊n/2⌋) < α/2``) and reaches above ``gamma`` (``k_hi > γn``: ``P(K > ⌊γn⌋) > α/2``; sure where
    ``p > γ``, as ``k_hi`` is at least the median ``np``), ``α = 1 − confidence``. Binomial terms from float64
    logs, a relative error near ``n·eps``."""
    if losses == 0:  # every pair won: the interval is [1, 1]
        return True
    p, half_alpha = (n - losses) / n, (1.0 - confidence) / 2
    k = np.arange(n + 1)
    log_choose = np.concatenate(([0.0], np.cumsum(np.log((n - k[1:] + 1) / k[1:]))))
    pmf = np.exp(log_choose + k * math.log(p) + (n - k) * math.log1p(-p))
    reach = math.floor(Fraction(gamma) * n)
    return float(pmf[: n // 2 + 1].sum()) < half_alpha and (p > gamma or float(pmf[reach + 1:].sum()) > half_alpha)


def sign_test(wins: int, losses: int) -> float:
    """The exact two-sided sign test's p-value for ``wins`` against ``losses`` (ties left out):
    ``min(1, 2·P(Bin(m, 1/2) ≥ max(wins, losses)))`` with ``m = wins + losses``; 1 when ``m = 0``.

    Correctly rounded. The tail ``Σ_{j≥k} C(m, j)`` is summed in integers from ``j = k`` up, each term
    from the last (``C(m, j+1) = C(m, j)·(m−j)/(j+1)``), and stops once the rest, at most the next term
    times ``1/(1−r)`` for the falling ratio ``r`` of consecutive terms, cannot change the rounded result:
    at 100,000 pairs a few thousand terms instead of 50,000 binomial coefficients (8 s)."""
    m, k = wins + losses, max(wins, losses)
    if m == 0:
        return 1.0
    term = math.comb(m, k)
    tail = 0
    for j in range(k, m + 1):
        tail += term
        if j == m:
            break
        term = term * (m - j) // (j + 1)  # exact: C(m, j+1)
        # Terms after this one fall by at least r = (m - j - 1) / (j + 2) each; their sum from ``term`` on
        # is below term / (1 - r) = term * (j + 2) / (2j + 3 - m).
        if 2 * j + 3 > m and (j - k) % 32 == 31:  # a check costs about as much as a term
            rest = -(-term * (j + 2) // (2 * j + 3 - m))
            if _rounded_p(tail, m) == _rounded_p(tail + rest, m):
                break
    return _rounded_p(tail, m)


def _rounded_p(tail: int, m: int) -> float:
    """``min(1, 2·tail / 2**m)``, one division of Python ints, correctly rounded (``2.0 * tail``
    overflows a float past ``m ≈ 1030``)."""
    return min(1.0, 2 * tail / 2**m)


def percentile_interval(totals: np.ndarray, two_n: int, alpha: float) -> tuple[float, float]:
    """The ``alpha / 2`` and ``1 - alpha / 2`` quantiles of ``totals / two_n``, interpolated linearly
    between order statistics as :func:`numpy.quantile` does, computed exactly.

    Exact, so that swapping A and B (``totals -> two_n - totals``) mirrors the interval exactly: the
    upper position is ``last - h`` for the lower one ``h``, the interpolation runs in fractions, and
    :func:`mirrored_float` rounds ``q`` and ``1 - q`` alike. Float quantiles missed by one rounding
    (0.39999999999999997 against 0.6), which could flip ``meaningful`` at ``gamma = 0.6``."""
    ordered = np.sort(totals)
    last = ordered.size - 1
    h_low = Fraction(last * (alpha / 2))
    return tuple(mirrored_float(_order_statistic(ordered, h) / two_n) for h in (h_low, last - h_low))


def _order_statistic(ordered: np.ndarray, h: Fraction) -> Fraction:
    """``ordered`` at the fractional position ``h``, interpolated linearly."""
    i = math.floor(h)
    below = Fraction(int(ordered[i]))
    if h == i:
        return below
    return below + (h - i) * (int(ordered[i + 1]) - below)


def mirrored_float(q: Fraction) -> float:
    """``q`` in [0, 1] rounded to a multiple of 2**-53: then ``1 - q`` rounds to exactly 1 minus it
    (a plain float() of ``q`` below 1/2 keeps bits that ``1 - q`` cannot hold)."""
    return round(q * 2**53) / 2**53
