"""torchfim.compare.prob_outperform decides each pair's win, tie or loss on the exact values: integers as integers
(Python ints, integer tensors and NumPy integer arrays, and an integer against a float), floats as floats; and its line reads the
confidence in the precision it was given in.

Oracle: the wins, ties and losses counted with Python's own comparisons, which are exact between ints and floats;
the confidence's text written out by hand.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from torchfim.compare import prob_outperform

BIG = 2**53  # the first integer past which float64 skips integers: 2**53 + 1 rounds to 2**53


def _exact_p(a: list, b: list) -> float:
    """(wins + ties/2)/n with Python's exact comparisons."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in zip(a, b)) / len(a)


@pytest.mark.parametrize("form", ["list", "tensor", "numpy", "numpy uint64", "numpy scalars"])
def test_integers_past_two_to_the_53_that_differ_are_not_a_tie(form):
    # From a review: the metrics went through float64, so 2**53 + 1 against 2**53 was a tie and
    # prob_outperform([2**53 + 1, 3], [2**53, 1]).p was 0.75, not 1.0 (one real win counted as a tie).
    assert prob_outperform([BIG + 1, 3], [BIG, 1]).p == 1.0
    a, b = [BIG + 1, 3, BIG + 2, 5], [BIG, 1, BIG + 2, 2]
    convert = {"list": list, "tensor": torch.tensor, "numpy": np.array,
               "numpy uint64": lambda v: np.array(v, dtype=np.uint64),
               "numpy scalars": lambda v: [np.int64(x) for x in v]}[form]
    r = prob_outperform(convert(a), convert(b))
    assert r.p == _exact_p(a, b) == 0.875  # 3 wins and a tie (as float64: 2 wins and 2 ties, 0.75)
    assert r.sign_test_p == 0.25  # 3 wins against none (as float64: 2 against none, p = 0.5)
    assert prob_outperform(convert(b), convert(a)).p == 1.0 - r.p


def test_integers_against_floats_are_compared_exactly():
    a, b = [BIG + 1, 3, BIG, 5], [float(BIG), 1.0, float(BIG), 5.5]  # a win past 2**53, a win, a tie, a loss
    expected = _exact_p(a, b)
    assert expected == 0.625
    for x, y in [(a, b), (torch.tensor(a), torch.tensor(b, dtype=torch.float64)), (np.array(a), np.array(b)),
                 (a, np.array(b)), (torch.tensor(a), b)]:
        assert prob_outperform(x, y).p == expected
        assert prob_outperform(y, x).p == 1.0 - expected
    mixed = [BIG + 1, 2.5, BIG, 5]  # ints and floats in one list
    assert prob_outperform(mixed, b).p == _exact_p(mixed, b) == 0.625
    huge = [2**70 + 1, 2**70]  # past int64: Python ints still compare exactly
    assert prob_outperform(huge, [2**70, 2**70]).p == 0.75


def test_ordinary_integers_give_the_same_result_as_the_same_values_as_floats():
    rng = np.random.default_rng(5)
    for n in (2, 7, 30):
        a, b = rng.integers(0, 6, size=n), rng.integers(0, 6, size=n)  # ties included
        ref = prob_outperform(a.astype(np.float64), b.astype(np.float64), generator_or_seed=1)
        assert prob_outperform(a, b, generator_or_seed=1) == ref
        assert prob_outperform(a.tolist(), b.astype(np.float64).tolist(), generator_or_seed=1) == ref
        assert prob_outperform(torch.from_numpy(a), torch.from_numpy(b).float(), generator_or_seed=1) == ref


@pytest.mark.parametrize(("confidence", "text"), [
    (np.float32(0.9), "90% CI"), (torch.tensor(0.9), "90% CI"), (np.float16(0.9), "90% CI"),
    (np.float32(0.975), "97.5% CI"), (0.975, "97.5% CI"), (0.95, "95% CI"), (0.999, "99.9% CI"),
    (0.99999999, "99.999999% CI"), (float(np.float32(0.9)) + 2**-53, "89.99999761581422% CI")])
def test_confidence_reads_as_given_in_its_own_precision(confidence, text):
    # From a review: confidence=np.float32(0.9), 0.8999999761581421 as a float64, read "89.99999762% CI".
    r = prob_outperform([3, 4, 5], [1, 2, 3], confidence=confidence)
    assert f", {text} [" in str(r)
    assert r.confidence == float(confidence)  # the interval's level itself is the value given
