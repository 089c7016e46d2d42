"""Variance-aware comparison of training runs over seeds.

One training run of a method is one draw from a distribution: change the seed of the weight
initialisation, of the data order, of the data split, ... and the final metric moves. Two methods
are therefore compared on several runs each, and the comparison reports how sure it is. This module
follows Bouthillier et al., "Accounting for Variance in Machine Learning Benchmarks", MLSys 2021
(arXiv:2103.03098):

* :func:`prob_outperform` estimates the probability of outperforming P(A > B) from paired runs,
  gives it a percentile-bootstrap confidence interval, and applies the paper's decision rule
  (significant *and* meaningful, with threshold ``gamma = 0.75``), guarded by an exact sign test
  so that a verdict is never drawn from fewer pairs than can support it.
* :func:`seeds`, :func:`derive_seeds` / :class:`SeedPlan` and :func:`torch_generator` give every run
  one master seed and split it, with :class:`numpy.random.SeedSequence` spawning, into independent
  seeds for each source of variation (``init``, ``data_order``, ``data_split``, ``label_noise``,
  ``sampling``), so that all of them vary from run to run, reproducibly.

A typical study:

>>> from torchfim.compare import seeds, derive_seeds, prob_outperform
>>> runs = seeds(10, master_seed=2021)      # one master seed per run, shared by A and B
>>> plan = derive_seeds(runs[0])            # that run's seed for each source of variation
>>> sorted(plan.as_dict())
['data_order', 'data_split', 'init', 'label_noise', 'sampling']
>>> acc_a = [0.91, 0.93, 0.90, 0.94, 0.92, 0.95, 0.91, 0.93, 0.92, 0.94]  # run i of A used runs[i]
>>> acc_b = [0.88, 0.90, 0.89, 0.91, 0.90, 0.92, 0.89, 0.90, 0.88, 0.91]  # run i of B used runs[i]
>>> prob_outperform(acc_a, acc_b).conclusion
'A better'
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from fractions import Fraction

import numpy as np
import torch

from .errors import TorchfimError, real_number, whole_number
from .exact_sign_test import interval_concludes, mirrored_float, percentile_interval, sign_test
from .seed_plans import SOURCES, SeedPlan, derive_seeds, seeds, torch_generator

__all__ = [
    "OutperformResult",
    "fewest_pairs",
    "prob_outperform",
    "SOURCES",
    "SeedPlan",
    "derive_seeds",
    "seeds",
    "torch_generator",
]

#: Conclusions :func:`prob_outperform` can reach.
A_BETTER = "A better"
B_BETTER = "B better"
NOT_SIGNIFICANT = "not significant"

# Rows of bootstrap indices drawn at once: keeps the (rows, n) index array near 32 MiB.
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


# ---------------------------------------------------------------------------------------------
# Probability of outperforming
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutperformResult:
    """The estimate of P(A > B), its confidence interval and the conclusion drawn from them.

    Attributes:
        p: the estimate of P(A > B): the fraction of pairs where A's run beats B's run, ties
            counting one half.
        ci_low, ci_high: the percentile-bootstrap confidence interval of ``p``.
        n: the number of paired runs.
        gamma: the threshold a meaningful effect must be able to reach (0.75 in the paper).
        confidence: the level of the interval (0.95 for a 95% interval).
        significant: the interval excludes 0.5 (``ci_low > 0.5`` or ``ci_high < 0.5``) and the
            sign test agrees: ``sign_test_p ≤ 1 - confidence``.
        meaningful: the interval reaches the meaningful zone on the side it points to:
            ``ci_high > gamma`` on A's side, ``ci_low < 1 - gamma`` on B's side (the side is the
            one the interval lies on when significant, else the side of ``p``; at ``p == 0.5``
            either counts, so that swapping A and B never changes the flag).
        conclusion: ``"A better"`` (significant with ``ci_low > 0.5``, and ``ci_high > gamma``), ``"B better"``
            (significant with ``ci_high < 0.5``, and ``ci_low < 1 - gamma``) or ``"not significant"`` (no
            conclusion: not significant, or significant but not meaningful; the flags say which).
        sign_test_p: the exact two-sided sign test's p-value on the pairs that are not tied:
            ``min(1, 2·P(Bin(m, 1/2) ≥ max(w, m − w)))`` for ``w`` wins of A among ``m`` untied
            pairs (1 when every pair is tied).

    ``str(result)`` is one readable line:

    >>> r = prob_outperform([3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6])
    >>> print(r)
    P(A > B) = 1.000, 95% CI [1.000, 1.000], sign test p = 0.031, n = 6 pairs, gamma = 0.75: A better
    >>> (r.p, r.significant, r.meaningful)
    (1.0, True, True)
    >>> print(prob_outperform([3, 4, 5, 6], [1, 2, 3, 4]))  # 4 of 4: as likely as 1 in 8 by chance
    P(A > B) = 1.000, 95% CI [1.000, 1.000], sign test p = 0.125, n = 4 pairs, gamma = 0.75: not significant
    """

    p: float
    ci_low: float
    ci_high: float
    n: int
    gamma: float
    confidence: float
    significant: bool
    meaningful: bool
    conclusion: str
    sign_test_p: float

    def __str__(self) -> str:
        line = (
            f"P(A > B) = {self.p:.3f}, {_percent(self.confidence)} CI [{self.ci_low:.3f}, "
            f"{self.ci_high:.3f}], sign test p {_p_value(self.sign_test_p)}, n = {self.n} pairs, "
            f"gamma = {self.gamma:g}: {self.conclusion}"
        )
        if self.conclusion == NOT_SIGNIFICANT and self.significant:
            line += " (significant but not meaningful)"
        return line


def _p_value(p: float) -> str:
    """``= 0.031``, or ``< 0.001`` below that."""
    return f"= {p:.3f}" if p >= 0.001 else "< 0.001"


def _percent(confidence: float) -> str:
    """``0.95`` -> ``'95%'``, ``0.999`` -> ``'99.9%'``, and ``np.float32(0.9)`` (0.8999999761581421 as a float)
    -> ``'90%'``: the shortest decimal that gives back the value in the narrowest of float16, float32 and float64
    that holds it exactly (its own precision, where it came as one of them), times 100 in decimal."""
    for dtype in (np.float16, np.float32, np.float64):
        if float(dtype(confidence)) == confidence:
            break
    shortest = Decimal(np.format_float_positional(dtype(confidence), unique=True, trim="-"))
    return f"{shortest.scaleb(2).normalize():f}%"


def _as_runs(x: object, name: str) -> np.ndarray:
    """``x`` as a 1-D array of finite values, else a TorchfimError naming ``name``: float64, or integers where ``x``
    holds integers (:func:`_exact_runs`)."""
    if isinstance(x, torch.Tensor):
        # float64 first: numpy has no bfloat16, so .numpy() refuses a bfloat16 tensor; integers kept as they are.
        x = x.detach().cpu()
        x = (x.to(torch.float64) if x.is_floating_point() or x.is_complex() else x).numpy()
    _refuse_text(x, name)
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TorchfimError(
            f"{name} must be a sequence of numbers (one metric value per run), "
            f"got {type(x).__name__}"
        ) from exc
    if arr.ndim != 1:
        raise TorchfimError(
            f"{name} must be one-dimensional (one metric value per run), got shape {arr.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        raise TorchfimError(
            f"{name} has non-finite values (NaN or inf) at index {bad[:5].tolist()}; "
            "drop or fix the failed runs, together with their partners in the other method"
        )
    return _exact_runs(x, arr)


def _exact_runs(x: object, arr: np.ndarray) -> np.ndarray:
    """The values of ``x`` to compare, ``arr`` being them checked as float64: integers kept as integers (an int64
    tensor or NumPy integer array as it is, Python ints as ints), so that ``2**53 + 1`` still beats ``2**53``."""
    if isinstance(x, np.ndarray):
        return x if x.dtype.kind in "iub" else arr
    if not isinstance(x, (list, tuple)):
        return arr
    items = [v.item() if isinstance(v, (np.generic, np.ndarray, torch.Tensor)) else v for v in x]
    if not any(isinstance(v, numbers.Integral) for v in items):
        return arr
    if all(isinstance(v, numbers.Integral) for v in items):
        return np.asarray([int(v) for v in items])  # int64, or objects past its range
    return np.array([int(v) if isinstance(v, numbers.Integral) else float(v) for v in items], dtype=object)


def _pair_outcomes(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where ``x > y`` and where ``x == y``, decided on the exact values: NumPy compares an integer with a float
    (or int64 with uint64) as float64, so such pairs are compared as Python numbers, which compare exactly."""
    if x.dtype.kind != y.dtype.kind or x.dtype.kind == "O":
        x, y = x.astype(object), y.astype(object)
    return np.asarray(x > y, dtype=bool), np.asarray(x == y, dtype=bool)


def _refuse_text(x: object, name: str) -> None:
    """Refuse metric values given as text: numpy would parse ``"0.9"`` as a number without a word."""
    items = [x] if isinstance(x, (str, bytes)) else x if isinstance(x, (list, tuple)) else []
    if isinstance(x, np.ndarray) and x.dtype.kind in "USO":
        items = x.ravel().tolist()
    text = next((v for v in items if isinstance(v, (str, bytes))), None)
    if text is not None:
        raise TorchfimError(
            f"{name} must hold numbers (one metric value per run), got text such as {text!r}; convert "
            "it first, e.g. [float(v) for v in values]"
        )


def _check_probability(
    name: str, value: object, low: float, high: float, closed_low: bool
) -> float:
    """``value`` as a float in (low, high) (or [low, high) if ``closed_low``), else raise; one real number, as
    :func:`~torchfim.errors.real_number` takes it (a 0-dim tensor or NumPy number too)."""
    number = real_number(value)
    ok = (
        number is not None
        and math.isfinite(number)
        and (low <= number if closed_low else low < number)
        and number < high
    )
    if not ok:
        interval = f"{'[' if closed_low else '('}{low:g}, {high:g})"
        raise TorchfimError(f"{name} must be in {interval}, got {value!r}")
    return number


def _rng(generator_or_seed: object) -> np.random.Generator:
    """A numpy Generator from a Generator, a non-negative int seed, a SeedSequence or None."""
    if isinstance(generator_or_seed, np.random.Generator):
        return generator_or_seed
    if generator_or_seed is None or isinstance(generator_or_seed, np.random.SeedSequence):
        return np.random.default_rng(generator_or_seed)
    seed = whole_number(generator_or_seed)  # a 0-dim integer tensor too
    if seed is not None and seed >= 0:
        return np.random.default_rng(seed)
    raise TorchfimError(
        "generator_or_seed must be a non-negative int, a numpy.random.Generator, a "
        f"numpy.random.SeedSequence or None, got {generator_or_seed!r}"
    )


def prob_outperform(
    a: Sequence[float],
    b: Sequence[float],
    *,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    gamma: float = 0.75,
    generator_or_seed: int | np.random.Generator | np.random.SeedSequence | None = 0,
) -> OutperformResult:
    """Probability that method A outperforms method B, with a bootstrap interval and a verdict.

    ``a[i]`` and ``b[i]`` are the metric (larger is better: accuracy, not loss; pass ``-loss``) of
    run ``i`` of A and of B, paired: both runs used the same master seed (see :func:`seeds`), so
    they saw the same data split, label noise, ... The estimate is

        P = (1/n) * sum_i ( 1[a_i > b_i] + 0.5 * 1[a_i == b_i] ),

    so a method compared with itself gives exactly 0.5, and ``P(a, b) = 1 - P(b, a)``, to the last bit
    (the sum is rounded to a multiple of 2**-53, as the interval is). Wins and ties are decided on the exact
    values, integers as integers (``2**53 + 1`` beats ``2**53``, also against the float ``2.0**53``), floats as floats:
    ties are exact equality, so round the metric first if tiny differences are noise.

    The confidence interval is the percentile bootstrap: resample the ``n`` pairs with replacement
    ``n_bootstrap`` times, recompute P on each resample, and take the ``(1 - confidence) / 2`` and
    ``(1 + confidence) / 2`` quantiles. It is not exact at small ``n``: a 95% interval from 30 pairs
    covers the true P from about 91% to 96% of the time for P from 0.18 to 0.82, depending on P (0.916 at
    P = 0.69, 0.957 at P = 0.5: a proportion of 30 pairs takes few values), and less beyond (0.87 at P = 0.88,
    0.78 at P = 0.95, where A wins all 30 pairs one study in five; the exact coverage for many resamples,
    without ties): the interval is degenerate when one method wins every pair, ``[1, 1]`` whatever ``n``.
    So the interval alone would declare a winner from 2 pairs, which happens by chance half the
    time when the methods do not differ. A verdict therefore also needs the exact two-sided sign
    test on the untied pairs at level ``1 - confidence`` (:attr:`OutperformResult.sign_test_p`):
    when the two methods' runs are exchangeable, a verdict is drawn with probability at most
    ``1 - confidence``. At 95% that takes at least 6 pairs (6 wins of 6: p = 1/32), 9 with one
    loss (p = 0.039), 12 with two (p = 0.039): :func:`fewest_pairs`.

    Decision rule, after Bouthillier et al. (2021), "Accounting for Variance in Machine Learning
    Benchmarks", Proceedings of MLSys 3 (arXiv:2103.03098), where the probability of outperforming
    is the recommended criterion (paraphrased): the improvement of A over B is *statistically
    significant* when the interval's lower bound is above 0.5 (here: and the sign test agrees), and *statistically meaningful* when
    its upper bound is above a threshold ``gamma``, for which the paper recommends 0.75; A is
    declared better only when both hold. Meaningful is judged on the upper bound, not on P itself:
    P = 0.7 with interval [0.55, 0.85] is a conclusive improvement. The rule applied to B
    (``ci_high < 0.5`` and ``ci_low < 1 - gamma``) declares B better; anything else is
    ``"not significant"`` (no conclusion; :attr:`OutperformResult.significant` tells a significant
    but not meaningful result apart).

    Args:
        a, b: paired metric values, one per run, same length ``n >= 2``, all finite. Lists, numpy
            arrays and CPU or GPU tensors are accepted.
        n_bootstrap: number of bootstrap resamples (at least 1; 1000 or more for a stable interval).
            Cost is ``O(n_bootstrap * n)``.
        confidence: level of the interval, in (0, 1).
        gamma: threshold of a meaningful effect, in [0.5, 1).
        generator_or_seed: numpy Generator, int seed, SeedSequence, or None (fresh entropy, not
            reproducible). The same seed gives the same interval.

    Returns:
        An :class:`OutperformResult`.

    Raises:
        TorchfimError (a ValueError): unequal lengths, fewer than 2 pairs, non-finite values,
            ``confidence`` outside (0, 1), ``gamma`` outside [0.5, 1), bad ``n_bootstrap``.

    Example, ten paired seeds where A wins 8 times, loses once and ties once:

    >>> a = [0.81, 0.79, 0.84, 0.80, 0.83, 0.78, 0.82, 0.85, 0.80, 0.79]
    >>> b = [0.78, 0.80, 0.80, 0.77, 0.79, 0.78, 0.80, 0.81, 0.76, 0.75]
    >>> r = prob_outperform(a, b, generator_or_seed=0)
    >>> r.p
    0.85
    >>> r.ci_low > 0.5 and r.ci_high > 0.75
    True
    >>> r.conclusion
    'A better'
    >>> prob_outperform(b, a).conclusion       # the same comparison, seen from B
    'B better'
    >>> prob_outperform(a, a).p, prob_outperform(a, a).conclusion
    (0.5, 'not significant')
    """
    x = _as_runs(a, "a")
    y = _as_runs(b, "b")
    if x.shape[0] != y.shape[0]:
        raise TorchfimError(
            f"a and b must have the same length (run i of A is paired with run i of B), "
            f"got {x.shape[0]} and {y.shape[0]}"
        )
    n = int(x.shape[0])
    if n < 2:
        raise TorchfimError(f"need at least 2 paired runs to compare A and B, got {n}")
    confidence = _check_probability("confidence", confidence, 0.0, 1.0, closed_low=False)
    gamma = _check_probability("gamma", gamma, 0.5, 1.0, closed_low=True)
    resamples = whole_number(n_bootstrap)  # a 0-dim integer tensor too
    if resamples is None or resamples < 1:
        raise TorchfimError(f"n_bootstrap must be a positive integer, got {n_bootstrap!r}")
    n_bootstrap = resamples
    rng = _rng(generator_or_seed)

    # Twice each pair's score, as a small integer: 2 for a win of A, 1 for a tie, 0 for a loss.
    # Integer sums keep the estimate exact: swapping A and B turns total into 2n - total. total / (2n) rounded
    # alone missed 1 - P(b, a) by one bit below 1/2 (1/6 against 1 - 5/6); rounded as the interval is, it cannot.
    wins, ties = _pair_outcomes(x, y)
    doubled = (2 * wins + ties).astype(np.int64)
    total = int(doubled.sum())
    p = mirrored_float(Fraction(total, 2 * n))

    # Each resample's total of doubled scores, kept as integers for the exact quantiles below.
    boot = np.empty(n_bootstrap, dtype=np.int64)
    rows = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    for start in range(0, n_bootstrap, rows):
        stop = min(start + rows, n_bootstrap)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = doubled[idx].sum(axis=1)
    ci_low, ci_high = percentile_interval(boot, 2 * n, 1.0 - confidence)

    sign_test_p = sign_test(int(wins.sum()), int((~wins & ~ties).sum()))
    agrees = sign_test_p <= 1.0 - confidence
    ci_low_above, ci_high_below = ci_low > 0.5 and agrees, ci_high < 0.5 and agrees
    significant = ci_low_above or ci_high_below
    # Side the evidence points to: where the interval lies if it excludes 0.5, else where P is.
    a_reaches, b_reaches = ci_high > gamma, ci_low < 1.0 - gamma
    # total vs n, not p vs 0.5: the side of P must not depend on the rounding of total / (2n).
    if ci_low_above or (not significant and total > n):
        meaningful = a_reaches
    elif ci_high_below or total < n:
        meaningful = b_reaches
    else:  # P = 0.5 exactly, interval around it: no side, either reach counts
        meaningful = a_reaches or b_reaches
    if ci_low_above and ci_high > gamma:
        conclusion = A_BETTER
    elif ci_high_below and ci_low < 1.0 - gamma:
        conclusion = B_BETTER
    else:
        conclusion = NOT_SIGNIFICANT
    return OutperformResult(
        p=p,
        ci_low=ci_low,
        ci_high=ci_high,
        n=n,
        gamma=gamma,
        confidence=confidence,
        sign_test_p=sign_test_p,
        significant=significant,
        meaningful=meaningful,
        conclusion=conclusion,
    )


def fewest_pairs(confidence: float = 0.95, losses: int = 0, gamma: float = 0.75) -> int:
    """The fewest paired runs from which :func:`prob_outperform` can draw a verdict at ``confidence`` (and ``gamma``)
    when the losing method wins ``losses`` of them: the smallest ``n`` with more wins than losses (``n − losses >
    losses``) whose exact two-sided sign test of ``n − losses`` wins against ``losses`` has ``p ≤ 1 − confidence``
    and whose percentile-bootstrap interval, in its limit of many resamples (the ``(1 ∓ confidence)/2`` quantiles of
    ``K/n``, ``K ~ Bin(n, (n − losses)/n)``), lies above 1/2 and reaches above ``gamma`` (meaningful). From 10 losses
    at 80%, 23 at 95% and 38 at 99% that reach takes more pairs than the sign test: 30 losses at 95% take 87, where
    the sign test alone passes 79, whose interval, about [0.51, 0.72], is significant but not meaningful. Near the
    count, ``prob_outperform``'s own interval, from ``n_bootstrap`` resamples, may fall either side of ``gamma``.

    >>> fewest_pairs(), fewest_pairs(losses=1), fewest_pairs(losses=2), fewest_pairs(0.99)
    (6, 9, 12, 8)
    >>> fewest_pairs(losses=8)  # 20 wins against 8
    28
    >>> fewest_pairs(losses=30), fewest_pairs(losses=30, gamma=0.7)
    (87, 79)
    """
    confidence = _check_probability("confidence", confidence, 0.0, 1.0, closed_low=False)
    gamma = _check_probability("gamma", gamma, 0.5, 1.0, closed_low=True)
    count = whole_number(losses)
    if count is None or count < 0:
        raise TorchfimError(f"losses must be a non-negative integer, got {losses!r}")
    losses = count
    # The winner must win more than it loses: the two-sided test is symmetric, so from losses + 1
    # pairs on, 1 win against 8 or more losses would pass too -- as a verdict for the other method.
    n = 2 * losses + 1
    while sign_test(n - losses, losses) > 1.0 - confidence or not interval_concludes(n, losses, confidence, gamma):
        n += 1
    return n
