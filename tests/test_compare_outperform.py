"""torchfim.compare.prob_outperform: the probability of outperforming and its decision rule, the exact sign test,
the bootstrap interval (against a plain reference implementation, and its coverage), and its input errors.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchfim.compare as compare
import torchfim.exact_sign_test as exact_sign_test
from torchfim.compare import OutperformResult, prob_outperform


def _phi(x: float) -> float:
    """Standard normal CDF."""
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


# ---------------------------------------------------------------------------------------------
# The estimate and the decision rule
# ---------------------------------------------------------------------------------------------


def test_dominating_method_is_declared_better():
    rng = np.random.default_rng(0)
    b = rng.normal(size=20)
    a = b + rng.uniform(0.01, 1.0, size=20)  # A beats B on every paired seed
    r = prob_outperform(a, b)
    assert r.p == 1.0
    assert (r.ci_low, r.ci_high) == (1.0, 1.0)
    assert r.ci_low >= 0.5
    assert r.significant and r.meaningful
    assert r.conclusion == "A better"
    assert r.n == 20 and r.gamma == 0.75 and r.confidence == 0.95

    rev = prob_outperform(b, a)
    assert rev.p == 0.0
    assert (rev.ci_low, rev.ci_high) == (0.0, 0.0)
    assert rev.significant and rev.meaningful
    assert rev.conclusion == "B better"


def test_identical_methods_give_exactly_one_half_and_no_conclusion():
    a = [0.7, 0.71, 0.69, 0.73, 0.7, 0.72]
    r = prob_outperform(a, list(a))
    assert r.p == 0.5
    assert (r.ci_low, r.ci_high) == (0.5, 0.5)
    assert not r.significant and not r.meaningful
    assert r.conclusion == "not significant"


def test_estimate_counts_wins_and_half_ties():
    # 3 wins, 2 ties, 1 loss for A.
    a = [2.0, 2.0, 2.0, 1.0, 1.0, 0.0]
    b = [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    assert prob_outperform(a, b).p == pytest.approx((3 + 0.5 * 2) / 6, abs=1e-15)


@settings(max_examples=200, deadline=None)
@given(
    pairs=st.lists(
        st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=25
    ),  # few distinct values: many ties
    seed=st.integers(0, 2**32 - 1),
)
def test_symmetry_p_ab_is_one_minus_p_ba(pairs, seed):
    a = [float(x) for x, _ in pairs]
    b = [float(y) for _, y in pairs]
    ab = prob_outperform(a, b, n_bootstrap=200, generator_or_seed=seed)
    ba = prob_outperform(b, a, n_bootstrap=200, generator_or_seed=seed)
    assert ab.p == 1.0 - ba.p and ba.p == 1.0 - ab.p
    # Same seed, same resampled pairs: the interval is the mirror image, exactly.
    assert ab.ci_low == 1.0 - ba.ci_high and ab.ci_high == 1.0 - ba.ci_low
    assert ab.significant == ba.significant
    assert ab.meaningful == ba.meaningful
    mirror = {"A better": "B better", "B better": "A better", "not significant": "not significant"}
    assert ba.conclusion == mirror[ab.conclusion]
    assert 0.0 <= ab.ci_low <= ab.ci_high <= 1.0


@pytest.mark.parametrize("n", [*range(2, 40), 1000, 5000])
def test_p_ab_is_exactly_one_minus_p_ba_ties_included(n):
    """P(A > B) counts a tie one half on each side, so P(a, b) + P(b, a) = 1 exactly; total / (2n) rounded alone
    missed 1 - P(b, a) by a bit below 1/2 (n = 3: 1/6 against 1 - 5/6). Every total of n pairs, from random pairs
    with few values (many ties); 5000 pairs draw the bootstrap in two chunks."""
    rng = np.random.default_rng(n)
    n_bootstrap = 1000 if n == 5000 else 20  # 5000 pairs: 838 resamples a chunk, two chunks
    totals = range(2 * n + 1) if n < 40 else rng.integers(0, 2 * n + 1, size=3)
    for total in map(int, totals):
        half, odd = divmod(total, 2)
        ties = odd + 2 * int(rng.integers(0, min(half, n - half - odd) + 1))  # a win and a loss make two ties
        wins = (total - ties) // 2
        score = rng.permutation(np.r_[np.ones(wins), np.zeros(ties), -np.ones(n - wins - ties)])
        a = rng.integers(0, 3, size=n).astype(np.float64)
        b = a - score
        kwargs = dict(n_bootstrap=n_bootstrap, generator_or_seed=total)
        ab, ba = prob_outperform(a, b, **kwargs), prob_outperform(b, a, **kwargs)
        assert abs(Fraction(ab.p) - Fraction(total, 2 * n)) <= Fraction(1, 2**54)
        assert ab.p == 1.0 - ba.p and ba.p == 1.0 - ab.p and ab.p + ba.p == 1.0
        assert ab.sign_test_p == ba.sign_test_p
        _assert_mirrored(ab, ba)


def test_flags_are_symmetric_at_one_half():
    # P = 0.5 exactly with a wide interval (found by hypothesis): swapping A and B must not
    # change the flags.
    a = [0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0]
    b = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    ab, ba = prob_outperform(a, b), prob_outperform(b, a)
    assert ab.p == ba.p == 0.5
    assert ab.meaningful == ba.meaningful
    assert ab.significant is ba.significant is False


def _assert_mirrored(ab: OutperformResult, ba: OutperformResult) -> None:
    assert (ab.ci_low, ab.ci_high) == (1.0 - ba.ci_high, 1.0 - ba.ci_low)
    assert (ab.significant, ab.meaningful) == (ba.significant, ba.meaningful)
    mirror = {"A better": "B better", "B better": "A better", "not significant": "not significant"}
    assert ba.conclusion == mirror[ab.conclusion]


def test_swapping_a_and_b_mirrors_the_interval_and_the_flags_exactly():
    # From a review: float quantiles gave ci_low 0.39999999999999997 one way and ci_high 0.6 the
    # other, so at gamma = 0.6 B's side reached the meaningful zone and A's did not.
    a = [3, 0, 2, 2, 2, 2, 0, 0, 2, 2, 0, 0, 1, 0, 1, 1, 2, 3, 1, 3, 3, 0, 0, 2]
    b = [2, 2, 1, 3, 3, 0, 3, 2, 3, 1, 1, 0, 0, 0, 1, 2, 2, 0, 1, 1, 1, 0, 1, 1]
    kwargs = dict(gamma=0.6, confidence=0.8, n_bootstrap=12, generator_or_seed=675)
    ab, ba = prob_outperform(a, b, **kwargs), prob_outperform(b, a, **kwargs)
    _assert_mirrored(ab, ba)
    assert (ab.ci_low, ab.ci_high) == (0.4, 1.0 - 0.4208333333333333)

    rng = np.random.default_rng(2021)
    for seed in range(300):
        n = int(rng.integers(2, 31))
        a, b = rng.integers(0, 4, size=n), rng.integers(0, 4, size=n)
        kwargs = dict(
            gamma=float(rng.choice([0.5, 0.6, 0.625, 0.75, 0.8])),
            confidence=float(rng.choice([0.6, 0.8, 0.9, 0.95])),
            n_bootstrap=int(rng.integers(1, 40)),
            generator_or_seed=seed,
        )
        _assert_mirrored(prob_outperform(a, b, **kwargs), prob_outperform(b, a, **kwargs))


def test_significant_but_not_meaningful_is_no_conclusion_unless_gamma_is_lowered():
    # 1000 pairs, A wins 600: P = 0.6 with a tight interval, around [0.57, 0.63].
    a = np.r_[np.ones(600), np.zeros(400)]
    b = np.full(1000, 0.5)
    r = prob_outperform(a, b)
    assert r.p == pytest.approx(0.6)
    assert 0.5 < r.ci_low < 0.6 < r.ci_high < 0.75
    assert r.significant and not r.meaningful
    assert r.conclusion == "not significant"
    assert "significant but not meaningful" in str(r)

    # The same data with the significance-only threshold gamma = 0.5.
    assert prob_outperform(a, b, gamma=0.5).conclusion == "A better"
    # And on B's side.
    rb = prob_outperform(b, a)
    assert rb.significant and not rb.meaningful and rb.conclusion == "not significant"


def test_meaningful_uses_the_upper_bound_not_the_estimate():
    # 40 pairs, A wins 28: P = 0.7 < gamma, but the interval (about [0.56, 0.84]) is above 0.5
    # and reaches past 0.75, so the rule declares A better.
    a = np.r_[np.ones(28), np.zeros(12)]
    b = np.full(40, 0.5)
    r = prob_outperform(a, b)
    assert r.p == pytest.approx(0.7)
    assert r.ci_low > 0.5 and r.p < r.gamma < r.ci_high
    assert r.significant and r.meaningful
    assert r.conclusion == "A better"
    assert prob_outperform(b, a).conclusion == "B better"


def test_meaningful_but_not_significant():
    # 4 pairs, 3 wins and 1 loss: P = 0.75 but the interval reaches below 0.5.
    r = prob_outperform([1.0, 1.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0])
    assert r.p == 0.75
    assert r.ci_low < 0.5 < r.gamma < r.ci_high
    assert not r.significant and r.meaningful
    assert r.conclusion == "not significant"
    assert "meaningful" not in str(r)


def _null_verdict_rate(n: int, confidence: float) -> float:
    """The exact probability that prob_outperform draws a verdict from n untied pairs of two methods whose
    runs are exchangeable: each of the 2^n win/loss patterns is equally likely, and the verdict depends on
    the number of wins only (the resampled pairs are exchangeable too)."""
    rate = 0.0
    for wins in range(n + 1):
        a = np.r_[np.ones(wins), np.zeros(n - wins)]
        r = prob_outperform(a, 1.0 - a, confidence=confidence, generator_or_seed=wins)
        rate += math.comb(n, wins) / 2**n * (r.conclusion != "not significant")
    return rate


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_a_verdict_by_chance_is_at_most_one_minus_confidence(confidence):
    # The percentile interval alone is [1, 1] when one method wins every pair: from 2 pairs it declared a
    # winner half the time by chance (4 pairs: 1 in 8). The sign test caps the rate at 1 - confidence.
    rates = {n: _null_verdict_rate(n, confidence) for n in range(2, 16)}
    assert all(rate <= 1.0 - confidence + 1e-12 for rate in rates.values()), rates
    assert rates[2] == 0.0
    # ... without losing the power to conclude where the pairs can support it: 6 of 6 at 95%.
    assert prob_outperform(np.ones(6), np.zeros(6)).conclusion == "A better"
    assert prob_outperform(np.zeros(6), np.ones(6)).conclusion == "B better"


def test_the_fewest_pairs_for_a_verdict_are_those_the_docstring_gives():
    # "At 95% that takes at least 6 pairs (6 wins of 6), 9 with one loss, 12 with two."
    def agrees(n: int, losses: int) -> bool:
        a = np.r_[np.ones(n - losses), np.zeros(losses)]
        return prob_outperform(a, 1.0 - a).sign_test_p <= 0.05

    for losses, fewest in [(0, 6), (1, 9), (2, 12)]:
        assert agrees(fewest, losses) and not agrees(fewest - 1, losses)
        assert compare.fewest_pairs(0.95, losses) == fewest
    assert "6 pairs" in prob_outperform.__doc__ and "9 with one" in prob_outperform.__doc__
    assert "12 with two" in prob_outperform.__doc__


def _exact_sign_test(wins: int, losses: int) -> Fraction:
    """The exact two-sided sign test, summed over the lower tail: the chance under fair coins that
    the smaller side gets at most its count, twice, capped at 1."""
    m = wins + losses
    return min(Fraction(1), Fraction(2 * sum(math.comb(m, j) for j in range(min(wins, losses) + 1)), 2**m))


@pytest.mark.parametrize("n, wins", [(1100, 540), (1100, 600), (5000, 2450), (5000, 2700)])
def test_sign_test_of_a_thousand_pairs_and_more_is_exact(n, wins):
    # From a review: 2.0 * tail raised OverflowError past about 1030 untied pairs.
    ties = 7
    a = np.r_[np.ones(wins), np.zeros(n - wins), np.full(ties, 0.5)]
    r = prob_outperform(a, np.r_[1.0 - a[: n], np.full(ties, 0.5)], n_bootstrap=20)
    assert r.sign_test_p == float(_exact_sign_test(wins, n - wins))
    # The normal approximation with continuity correction is within 0.1% of it at these n.
    z = (abs(wins - n / 2) - 0.5) / math.sqrt(n / 4)
    assert r.sign_test_p == pytest.approx(2.0 * (1.0 - _phi(z)), abs=1e-3)
    if (n, wins) == (1100, 540):
        assert round(r.sign_test_p, 4) == 0.5668


def test_sign_test_stopped_early_is_still_correctly_rounded():
    # The tail is summed only until the rest cannot change the rounded p-value: every split of up to
    # 300 pairs, and splits of 3001 pairs near the rounding's hardest places (p close to 1 and tiny), equal
    # the correctly rounded full sum.
    splits = [(w, m - w) for m in range(301) for w in range(m + 1)]
    splits += [(w, 3001 - w) for w in (1450, 1500, 1501, 1530, 1600, 1700, 2500, 3001)]
    for wins, losses in splits:
        assert exact_sign_test.sign_test(wins, losses) == float(_exact_sign_test(wins, losses)), (wins, losses)


def test_sign_test_p_is_the_exact_two_sided_binomial_tail():
    # Brute force over every sign pattern of the untied pairs: the probability, under fair coins, of a
    # split at least as lopsided as the observed one.
    for wins, losses in [(0, 0), (1, 0), (3, 1), (5, 0), (2, 2), (7, 3), (0, 9)]:
        m = wins + losses
        far = max(wins, losses)
        brute = sum(max(k, m - k) >= far for pattern in range(2**m) for k in [bin(pattern).count("1")]) / 2**m
        ties = 3
        a = np.r_[np.ones(wins), np.zeros(losses), np.full(ties, 0.5)]
        b = np.r_[np.zeros(wins), np.ones(losses), np.full(ties, 0.5)]
        assert prob_outperform(a, b).sign_test_p == pytest.approx(brute if m else 1.0, abs=1e-15)


def test_bootstrap_matches_a_plain_reference_implementation(monkeypatch):
    rng = np.random.default_rng(5)
    a = np.round(rng.normal(0.3, 1.0, size=37), 1)
    b = np.round(rng.normal(0.0, 1.0, size=37), 1)

    def reference(x, y, n_boot, conf, seed):
        score = (x > y) + 0.5 * (x == y)
        gen = np.random.default_rng(seed)
        idx = gen.integers(0, x.size, size=(n_boot, x.size))
        boot = score[idx].mean(axis=1)
        lo, hi = np.quantile(boot, [(1 - conf) / 2, (1 + conf) / 2])
        return score.mean(), lo, hi

    p, lo, hi = reference(a, b, 1500, 0.9, 11)
    r = prob_outperform(a, b, n_bootstrap=1500, confidence=0.9, generator_or_seed=11)
    assert (r.p, r.ci_low, r.ci_high) == pytest.approx((p, lo, hi), abs=1e-12)

    # Drawing the resamples in chunks (as for large n) changes nothing.
    monkeypatch.setattr(compare, "_BOOTSTRAP_CHUNK_ELEMENTS", 37 * 7)
    r2 = prob_outperform(a, b, n_bootstrap=1500, confidence=0.9, generator_or_seed=11)
    assert (r2.ci_low, r2.ci_high) == pytest.approx((lo, hi), abs=1e-12)


def test_wider_confidence_gives_wider_interval():
    rng = np.random.default_rng(2)
    b = rng.normal(size=25)
    a = b + rng.normal(0.3, 1.0, size=25)
    r80 = prob_outperform(a, b, confidence=0.8, generator_or_seed=4)
    r99 = prob_outperform(a, b, confidence=0.99, generator_or_seed=4)
    assert r99.ci_low < r80.ci_low <= r80.p <= r80.ci_high < r99.ci_high
    assert "80% CI" in str(r80) and "99% CI" in str(r99)


def _ideal_percentile_coverage(n: int, p: float, confidence: float) -> float:
    """Exact coverage of the percentile-bootstrap interval for a proportion, as n_bootstrap -> inf.

    With continuous data there are no ties, so P-hat = K / n with K ~ Binomial(n, p), and the
    bootstrap distribution given K = k is Binomial(n, k / n) / n. Sum over k of
    P(K = k) * 1[p lies between that distribution's (1-c)/2 and (1+c)/2 quantiles].
    """
    alpha = (1.0 - confidence) / 2.0

    def pmf(m: float) -> np.ndarray:
        return np.array([math.comb(n, k) * m**k * (1 - m) ** (n - k) for k in range(n + 1)])

    covered = 0.0
    weights = pmf(p)
    for k in range(n + 1):
        cdf = np.cumsum(pmf(k / n))
        lo = np.searchsorted(cdf, alpha - 1e-12) / n
        hi = np.searchsorted(cdf, 1.0 - alpha - 1e-12) / n
        covered += weights[k] * (lo <= p <= hi)
    return float(covered)


@pytest.mark.parametrize(
    "delta, confidence",
    [(0.5, 0.95), (1.0, 0.95), (0.5, 0.80)],
)
def test_confidence_interval_coverage(delta, confidence):
    """Empirical coverage of the interval where the true P(A > B) is known.

    a_i - b_i ~ Normal(delta, 1), so the true P(A > B) over pairs is Phi(delta). 1000 studies of
    n = 30 pairs each. Tolerance: the percentile bootstrap of a proportion is anti-conservative at
    small n; its exact large-n_bootstrap coverage here (``_ideal_percentile_coverage``: 0.915 for
    delta = 0.5, 0.948 for delta = 1.0 at 95%; 0.761 for delta = 0.5 at 80%) can sit below
    nominal. The empirical coverage over R = 1000 studies has standard deviation
    sd = sqrt(c (1 - c) / R) = 0.0069 at c = 0.95 (0.0126 at 0.8). We require it to lie in
    [min(nominal, ideal) - 4 sd, max(nominal, ideal) + 4 sd], [0.887, 0.978] for delta = 0.5 at
    95%: an interval of the wrong level, or not centred on the estimate, falls outside. (This
    seed gives 0.918, 0.957 and 0.800; over 5000 other studies the implementation covered 0.925
    at delta = 0.5 and 0.945 at delta = 1.0.)
    """
    n, studies = 30, 1000
    true_p = _phi(delta)
    rng = np.random.default_rng(20210303)
    covered = 0
    for _ in range(studies):
        b = rng.normal(size=n)
        a = b + rng.normal(delta, 1.0, size=n)
        r = prob_outperform(a, b, confidence=confidence, generator_or_seed=rng)
        covered += r.ci_low <= true_p <= r.ci_high
    coverage = covered / studies

    ideal = _ideal_percentile_coverage(n, true_p, confidence)
    sd = math.sqrt(confidence * (1.0 - confidence) / studies)
    low = min(confidence, ideal) - 4 * sd
    high = max(confidence, ideal) + 4 * sd
    assert low <= coverage <= high, (coverage, ideal, low, high)
    if confidence == 0.95:
        assert coverage >= 0.88


def test_reproducible_given_the_seed():
    rng = np.random.default_rng(9)
    a, b = rng.normal(size=12), rng.normal(size=12)
    r1 = prob_outperform(a, b, generator_or_seed=3)
    r2 = prob_outperform(a, b, generator_or_seed=3)
    assert r1 == r2
    assert prob_outperform(a, b, generator_or_seed=np.random.default_rng(3)) == r1
    assert prob_outperform(a, b, generator_or_seed=np.random.SeedSequence(3)) == r1
    others = {prob_outperform(a, b, generator_or_seed=s).ci_low for s in range(4, 12)}
    others |= {prob_outperform(a, b, generator_or_seed=s).ci_high for s in range(4, 12)}
    assert len(others) > 2  # the seed does drive the bootstrap


def test_accepts_arrays_and_tensors():
    a = [0.9, 0.8, 0.85, 0.95]
    b = [0.7, 0.75, 0.6, 0.8]
    ref = prob_outperform(a, b)
    assert prob_outperform(np.array(a), np.array(b)) == ref
    ta = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    assert prob_outperform(ta, torch.tensor(b)) == ref


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.int64])
def test_accepts_tensors_of_any_real_dtype(dtype):
    # From a review: a bfloat16 tensor raised a bare TypeError (numpy has no bfloat16).
    a, b = [3, 4, 5, 6, 7, 8, 2], [1, 2, 3, 4, 5, 6, 2]
    r = prob_outperform(torch.tensor(a, dtype=dtype), torch.tensor(b, dtype=dtype))
    assert r == prob_outperform(a, b)
    assert r.conclusion == "A better"


def test_result_is_frozen_and_prints_one_line():
    r = prob_outperform([3.0, 4.0, 5.0], [1.0, 2.0, 6.0])
    assert isinstance(r, OutperformResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.p = 0.0  # type: ignore[misc]
    line = str(r)
    assert "\n" not in line
    assert line.startswith("P(A > B) = 0.667, 95% CI [")
    assert line.endswith("n = 3 pairs, gamma = 0.75: not significant")


@pytest.mark.parametrize(
    "kwargs, a, b, message",
    [
        ({}, [1.0, 2.0, 3.0], [1.0, 2.0], "same length"),
        ({}, [1.0], [2.0], "at least 2 paired runs"),
        ({}, [], [], "at least 2 paired runs"),
        ({}, [1.0, float("nan"), 3.0], [1.0, 2.0, 3.0], r"a has non-finite values .* index \[1\]"),
        ({}, [1.0, 2.0, 3.0], [1.0, float("inf"), 3.0], "b has non-finite values"),
        ({}, [[1.0, 2.0], [3.0, 4.0]], [1.0, 2.0], "one-dimensional"),
        ({}, ["x", "y"], [1.0, 2.0], "must hold numbers"),
        ({"confidence": 0.0}, [1.0, 2.0], [0.0, 1.0], r"confidence must be in \(0, 1\)"),
        ({"confidence": 1.0}, [1.0, 2.0], [0.0, 1.0], r"confidence must be in \(0, 1\)"),
        ({"confidence": 95}, [1.0, 2.0], [0.0, 1.0], r"confidence must be in \(0, 1\)"),
        ({"confidence": float("nan")}, [1.0, 2.0], [0.0, 1.0], "confidence must be in"),
        ({"gamma": 0.4}, [1.0, 2.0], [0.0, 1.0], r"gamma must be in \[0.5, 1\)"),
        ({"gamma": 1.0}, [1.0, 2.0], [0.0, 1.0], r"gamma must be in \[0.5, 1\)"),
        ({"n_bootstrap": 0}, [1.0, 2.0], [0.0, 1.0], "n_bootstrap must be a positive integer"),
        ({"n_bootstrap": 10.5}, [1.0, 2.0], [0.0, 1.0], "n_bootstrap must be a positive integer"),
        ({"generator_or_seed": -1}, [1.0, 2.0], [0.0, 1.0], "generator_or_seed must be"),
        ({"generator_or_seed": "0"}, [1.0, 2.0], [0.0, 1.0], "generator_or_seed must be"),
    ],
)
def test_input_errors(kwargs, a, b, message):
    with pytest.raises(ValueError, match=message):
        prob_outperform(a, b, **kwargs)


def test_options_given_as_zero_dim_tensors_or_numpy_numbers_are_taken_as_their_value():
    # From a review: confidence=torch.tensor(0.9) was refused with "confidence must be in (0, 1), got tensor(0.9000)",
    # a value inside the interval it named; n_bootstrap, losses and an int seed as 0-dim tensors alike.
    a, b = [0.9, 0.8, 0.85, 0.95, 0.7, 0.92], [0.7, 0.75, 0.6, 0.8, 0.72, 0.9]
    ref = prob_outperform(a, b, confidence=0.9, gamma=0.6, n_bootstrap=500, generator_or_seed=3)
    given = prob_outperform(a, b, confidence=torch.tensor(0.9, dtype=torch.float64), gamma=np.float64(0.6),
                            n_bootstrap=torch.tensor(500), generator_or_seed=torch.tensor(3))
    assert given == ref
    assert compare.fewest_pairs(torch.tensor(0.95, dtype=torch.float64), torch.tensor(2)) == 12
    for bad, message in [(torch.tensor(1.5), r"confidence must be in \(0, 1\)"), (torch.ones(2), "confidence must"),
                         (torch.tensor(True), "confidence must")]:
        with pytest.raises(ValueError, match=message):
            prob_outperform(a, b, confidence=bad)
    with pytest.raises(ValueError, match="n_bootstrap must be a positive integer"):
        prob_outperform(a, b, n_bootstrap=torch.tensor(500.0))
