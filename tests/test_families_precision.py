"""Numerical regressions of issue 11 in the families: Poisson draws at huge rates (item 5), Bernoulli
cancellation (item 8), non-finite targets (item 9) and half-precision outputs (item 12)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FAMILIES
from oracles import FAMILY_WIDTH

from torchfim import TorchfimError
from torchfim.families import Bernoulli, Poisson, Positions, get_family
from torchfim.families.poisson import EXACT_POISSON_MAX_RATE

# ----------------------------------------------------------------- item 5: Poisson at huge rates


@pytest.mark.parametrize("log_rate", [15.0, 22.0, 23.0, 40.0, 44.0, 47.0, 50.0, 60.0, 70.0])
def test_poisson_draws_have_mean_and_variance_lambda(log_rate):
    """Standardised draws z = (y − λ)/√λ: mean 0 and variance 1 within 5 standard errors.

    Before the fix, torch.poisson's int64 count overflowed above log-rate ≈ 44 (issue 11 item 5:
    a score estimate of 1.7e40 against an exact 2.9e20). 22 and 23 straddle the switch from
    torch.poisson to the corrected normal approximation (EXACT_POISSON_MAX_RATE = 2³²).
    """
    n = 20000
    o = torch.full((1, 1), log_rate, dtype=torch.float64)
    y = Poisson().sample(o, n, torch.Generator().manual_seed(int(log_rate)))
    assert y.shape == (1, n, 1) and y.dtype == torch.float64 and bool(torch.isfinite(y).all())
    rate = math.exp(log_rate)
    z = (y.flatten() - rate) / math.sqrt(rate)
    # Draws are integers held in float64: above λ ≈ 2⁵³ they are quantised to float64's spacing.
    spacing = math.ulp(rate) / math.sqrt(rate)
    assert abs(float(z.mean())) <= 5 / math.sqrt(n) + spacing
    assert abs(float(z.var()) - 1) <= 5 * math.sqrt(2 / n) + spacing**2
    assert bool((y == y.round()).all()) and bool((y >= 0).all())


@pytest.mark.parametrize("log_rate", [75.0, 80.0])
def test_poisson_draws_beyond_float64_resolution_stay_finite_and_centred(log_rate):
    """Above λ ≈ 2¹⁰⁶ the spread √λ is below float64's resolution of λ: draws stay finite and
    centred on λ to within that resolution."""
    o = torch.full((2, 3), log_rate, dtype=torch.float64)
    y = Poisson().sample(o, 500, torch.Generator().manual_seed(0))
    rate = math.exp(log_rate)
    assert bool(torch.isfinite(y).all())
    deviation = (y - rate).mean()  # centred first: a mean of values near λ would round by ulp(λ)
    assert abs(float(deviation)) <= 5 * math.sqrt(rate / y.numel()) + math.ulp(rate)


def test_poisson_scores_of_float32_outputs_at_huge_rates():
    """Counts come back in float64, so the float32 score y − λ (|u| ≈ √λ) keeps its precision."""
    o = torch.full((1, 2), 40.0, dtype=torch.float32)
    fam = Poisson()
    y = fam.sample(o, 20000, torch.Generator().manual_seed(1))
    u = fam.output_score(y, o)
    assert u.dtype == torch.float32 and bool(torch.isfinite(u).all())
    ratio = (u.double() ** 2).mean() / math.exp(40.0)
    assert abs(float(ratio) - 1) <= 5 * math.sqrt(2 / u.numel())
    assert torch.equal(y, fam.sample(o, 20000, torch.Generator().manual_seed(1)))


def test_poisson_threshold_is_where_torch_poisson_is_still_exact():
    assert 2.0**31 < EXACT_POISSON_MAX_RATE < 1e12


# ----------------------------------------------------------------- item 8: Bernoulli cancellation

LOGITS = [0.5, 5.0, 17.0, 20.0, 37.0, 40.0, 60.0, 80.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_fisher_is_symmetric_and_matches_closed_form(dtype):
    """Λ = e^{−|o|}/(1 + e^{−|o|})²; p(1 − p) cancelled to exactly 0 above o ≈ 17 (float32) / 37 (float64)."""
    fam = Bernoulli()
    o = torch.tensor(LOGITS, dtype=dtype).unsqueeze(1)
    lam, lam_neg = fam.fisher_output(o).flatten(), fam.fisher_output(-o).flatten()
    assert torch.equal(lam, lam_neg)
    t = torch.exp(-o.double().abs()).flatten()
    want = t / (1 + t) ** 2
    rtol = 1e-6 if dtype == torch.float32 else 1e-14
    assert torch.allclose(lam.double(), want, rtol=rtol, atol=0) and bool((lam > 0).all())
    root = fam.fisher_output_sqrt(o).flatten().double()
    assert torch.allclose(root, torch.exp(-0.5 * o.double().abs()).flatten() / (1 + t), rtol=rtol, atol=0)
    assert torch.allclose(fam.fisher_output_top_eigenvalue(o).double(), want, rtol=rtol, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bernoulli_higher_moments_and_scores_without_cancellation(dtype):
    fam = Bernoulli()
    o = torch.tensor(LOGITS + [-x for x in LOGITS], dtype=dtype).unsqueeze(1)
    p, q = torch.sigmoid(o.double()), torch.sigmoid(-o.double())  # q = 1 − p, computed without 1 − p
    rtol = 1e-5 if dtype == torch.float32 else 1e-13
    m4 = fam.fourth_moment(o).flatten().double()
    assert torch.allclose(m4, (p * q**4 + q * p**4).flatten(), rtol=rtol, atol=0)
    assert torch.allclose(fam.fourth_moment_top_eigenvalue(o).double(), m4, rtol=rtol, atol=0)
    m3 = fam.third_moment(o).flatten().double()
    assert torch.allclose(m3, (p * q**3 - q * p**3).flatten(), rtol=rtol, atol=0)
    ones, zeros = torch.ones(len(o), 1, 1, dtype=dtype), torch.zeros(len(o), 1, 1, dtype=dtype)
    assert torch.allclose(fam.output_score(ones, o).flatten().double(), q.flatten(), rtol=rtol, atol=0)
    assert torch.allclose(fam.output_score(zeros, o).flatten().double(), -p.flatten(), rtol=rtol, atol=0)


# ----------------------------------------------------------------- item 9: non-finite targets


@pytest.mark.parametrize("family", ["gaussian", "poisson", "bernoulli"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_targets_are_refused(family, bad):
    fam = get_family(family)
    o = torch.zeros(3, FAMILY_WIDTH[family], dtype=torch.float64)
    y = torch.ones(3, FAMILY_WIDTH[family], dtype=torch.float64)
    y[1, 0] = bad
    with pytest.raises(TorchfimError, match="non-finite value"):
        fam.check_targets(y, o)


def test_categorical_refuses_float_targets_even_when_nan():
    with pytest.raises(TorchfimError, match="integer class indices"):
        get_family("categorical").check_targets(torch.tensor([0.0, math.nan]), torch.zeros(2, 3))


# ----------------------------------------------------------------- item 12: half precision

HALF = [torch.float16, torch.bfloat16]


def _calls(fam, o: torch.Tensor, y: torch.Tensor, v: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    second, fourth = fam.moments_along(o, v)
    return {
        "output_score": fam.output_score(y, o),
        "log_prob": fam.log_prob(o, y),
        "fisher_output": fam.fisher_output(o),
        "fisher_output_sqrt": fam.fisher_output_sqrt(o),
        "fourth_moment": fam.fourth_moment(o),
        "third_moment": fam.third_moment(o),
        "moment4": fam.moment4(o, v, v),
        "moment3": fam.moment3(o, v, v, v),
        "pairwise_moment4": fam.pairwise_moment4(o, v),
        "second": second,
        "fourth": fourth,
        "quadratic_moment": fam.quadratic_moment(o, k),
        "fisher_output_top_eigenvalue": fam.fisher_output_top_eigenvalue(o),
        "fourth_moment_top_eigenvalue": fam.fourth_moment_top_eigenvalue(o),
    }


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_outputs_agree_with_float64(family, dtype, monkeypatch):
    """Every method runs on float16/bfloat16 outputs, returns the output's dtype, agrees with
    float64 on the same rounded values, and never calls an eigen-solver in half precision."""
    for name in ("eigh", "eigvalsh"):
        original = getattr(torch.linalg, name)

        def guarded(a, *args, _original=original, **kwargs):
            assert a.dtype not in HALF, "eigen-solver called in half precision"
            return _original(a, *args, **kwargs)

        monkeypatch.setattr(torch.linalg, name, guarded)
    fam = get_family(family)
    gen = torch.Generator().manual_seed(2)
    o = (0.7 * torch.randn(4, FAMILY_WIDTH[family], generator=gen)).to(dtype)
    fam.check_output(o)
    y = fam.sample(o, 3, gen)
    v = torch.randn(4, 2, o.shape[1], generator=gen).to(dtype)
    k = torch.randn(4, o.shape[1], o.shape[1], generator=gen)
    k = (k + k.transpose(1, 2)).to(dtype)
    low = _calls(fam, o, y, v, k)
    high = _calls(fam, o.double(), y if family == "categorical" else y.double(), v.double(), k.double())
    rtol = 2e-2 if dtype == torch.float16 else 6e-2
    for name, got in low.items():
        assert got.dtype == dtype, name
        assert bool(torch.isfinite(got).all()), name
        want = high[name]
        assert bool(((got.double() - want).abs() <= rtol * want.abs().max() + 1e-3).all()), name


@pytest.mark.parametrize("dtype", HALF)
def test_half_precision_position_outputs_agree_with_float64(family, dtype):
    """The block-diagonal second and fourth moments of outputs with positions, in half precision, keep the output's
    dtype and agree with float64 on the same rounded values (on torch 2.2, whose CPU ``eye`` has no bfloat16, the
    blocks' identity failed every bfloat16 call)."""
    fam = Positions(get_family(family), 3)
    gen = torch.Generator().manual_seed(4)
    o = (0.7 * torch.randn(4, 3 * FAMILY_WIDTH[family], generator=gen)).to(dtype)
    rtol = 2e-2 if dtype == torch.float16 else 6e-2
    for name in ("fisher_output", "fisher_output_sqrt", "fourth_moment"):
        got, want = getattr(fam, name)(o), getattr(fam, name)(o.double())
        assert got.dtype == dtype, name
        assert bool(((got.double() - want).abs() <= rtol * want.abs().max() + 1e-3).all()), name


@pytest.mark.parametrize("family", FAMILIES)
def test_half_precision_labels_are_usable(family):
    """Sampled labels keep enough precision: class indices, 0/1, float32 means, float64 counts."""
    fam = get_family(family)
    o = torch.zeros(2, FAMILY_WIDTH[family], dtype=torch.bfloat16)
    y = fam.sample(o, 4, torch.Generator().manual_seed(0))
    sampled = {"categorical": torch.long, "bernoulli": torch.bfloat16, "gaussian": torch.float32}
    checked = {"categorical": torch.long, "bernoulli": torch.float32, "gaussian": torch.float32}
    sampled["poisson"] = checked["poisson"] = torch.float64
    assert y.dtype == sampled[family]
    assert fam.check_targets(y[:, 0], o).dtype == checked[family]
