"""The fraction of the small-vs-large learning-rate gap that the Fisher penalty closes, with a
percentile-bootstrap interval over the paired seeds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .train import compact

__all__ = ["gap_closed"]

#: Bootstrap resamples of the interval (a fixed generator: the interval is reproducible).
N_BOOTSTRAP = 4000


def _gap(groups: Sequence[np.ndarray]) -> float:
    """``Σ_g mean(large − small)``: the gap itself."""
    return sum(float(np.mean(g[0] - g[1])) for g in groups)


def _ratio(groups: Sequence[np.ndarray]) -> float | None:
    """``Σ_g mean(fp − small) / Σ_g mean(large − small)`` over the groups (None when the gap is 0)."""
    num = sum(float(np.mean(g[2] - g[1])) for g in groups)
    den = _gap(groups)
    return None if den == 0 else num / den


def _interval(samples: Sequence[float], confidence: float) -> tuple[float | None, float | None]:
    if not samples:
        return None, None
    lo, hi = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
    return compact(lo), compact(hi)


def gap_closed(groups: Sequence[tuple[Sequence[float], Sequence[float], Sequence[float]]],
               confidence: float = 0.95, seed: int = 0) -> dict[str, float | int | None]:
    """The fraction of the gap closed, ``(FP − small)/(large − small)`` on seed means, and its interval.

    Each group is ``(large, small, fp)``, one metric per evaluation seed, paired by seed index (one
    group per data set and model; several groups pool them: the sums over groups of the mean
    differences are divided). The interval resamples the seeds of each group with replacement
    (pairs kept together) :data:`N_BOOTSTRAP` times and takes the ``(1 ± confidence)/2`` quantiles
    of the ratio; resamples where the gap vanishes are dropped (their count is reported). 1 = the
    penalty matches the large learning rate; 0 = it does nothing; below 0 = it hurts. The gap
    itself, ``Σ_g mean(large − small)``, comes with its own interval (``gap_ci_low``/``gap_ci_high``):
    when that interval reaches 0 there is no clear gap, and the fraction means little.
    """
    arrays = [np.asarray([a, b, c], dtype=np.float64) for a, b, c in groups]
    point = _ratio(arrays)
    rng = np.random.default_rng(seed)
    ratios, gaps = [], []
    for _ in range(N_BOOTSTRAP):
        resample = [g[:, rng.integers(0, g.shape[1], g.shape[1])] for g in arrays]
        gaps.append(_gap(resample))
        r = _ratio(resample)
        if r is not None:
            ratios.append(r)
    lo, hi = _interval(ratios, confidence)
    gap_lo, gap_hi = _interval(gaps, confidence)
    return {
        "value": None if point is None else compact(point),
        "ci_low": lo,
        "ci_high": hi,
        "gap": compact(_gap(arrays)),
        "gap_ci_low": gap_lo,
        "gap_ci_high": gap_hi,
        "confidence": confidence,
        "n_bootstrap": N_BOOTSTRAP,
        "dropped": N_BOOTSTRAP - len(ratios),
    }
