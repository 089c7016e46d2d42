"""The paired families at extreme outputs (trial report): gamma draws at tiny and huge shapes, their
scores and moments, and heteroscedastic Gaussian scores with |μ| ≫ σ. Oracles: mpmath at 40 digits,
and Monte Carlo moments with tolerances from their own standard errors."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch

from torchfim.families import Bernoulli, Gamma, HeteroscedasticGaussian

N = 100_000


def _assert_score_moments(u: torch.Tensor, lam_diag: torch.Tensor, columns: slice = slice(None)) -> None:
    """E[u] = 0 and E[u²] = diag Λ within 5 standard errors (each estimated from the sample)."""
    u, lam_diag = u.double()[:, columns], lam_diag[columns]
    n = u.shape[0]
    assert bool(torch.isfinite(u).all())
    mean_z = u.mean(0) / (u.std(0) / math.sqrt(n))
    square = u**2
    square_z = (square.mean(0) - lam_diag) / (square.std(0) / math.sqrt(n))
    assert float(mean_z.abs().max()) < 5, mean_z
    assert float(square_z.abs().max()) < 5, (square.mean(0) / lam_diag, square_z)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("log_shape", [-6.0, -12.0])
def test_gamma_sampled_scores_at_small_shape(log_shape, dtype):
    """Before: draws below float64's range were clipped, so log w was wrong (log-shape −6: E[u_α²]/Λ_αα = 0.39).

    At log-shape −12 only u_α is checked: u_μ = w − α is then O(1) on a fraction ≈ α of the draws
    (N·α ≈ 0.6), so no sample of this size estimates its moments."""
    fam, o = Gamma(), torch.tensor([[0.3, log_shape]], dtype=dtype)
    u = fam.sample_scores(o, N, torch.Generator().manual_seed(0))[0]
    assert u.dtype == dtype
    columns = slice(None) if log_shape > -10 else slice(1, 2)
    _assert_score_moments(u, torch.diagonal(fam.fisher_output(o.double())[0]), columns)


@pytest.mark.parametrize(("log_shape", "dtype"), [(14.0, torch.float32), (20.0, torch.float32),
                                                  (27.0, torch.float64), (28.0, torch.float64),
                                                  (30.0, torch.float64), (40.0, torch.float64),
                                                  (75.0, torch.float64), (200.0, torch.float64)])
def test_gamma_sampled_scores_at_large_shape(log_shape, dtype):
    """Before: u_α = α(log w − ψ(α)) − (w − α) cancelled (float32 log-shape 14: E[u_α²]/Λ_αα = 1.81); from log-shape
    about 66 the draw's w − α rounded away (a review: at 75, u_μ = 0 and u_α = ½ always, so Î1 gave 0 and half the
    Fisher, Î2 a quarter off). Log-shapes 27 and 28 stand either side of the normal draw's threshold, 1e12."""
    fam, o = Gamma(), torch.tensor([[-0.7, log_shape]], dtype=dtype)
    u = fam.sample_scores(o, N, torch.Generator().manual_seed(1))[0]
    _assert_score_moments(u, torch.diagonal(fam.fisher_output(o.double())[0]))


def _mp_shape_score(y: float, log_mean: float, log_shape: float) -> float:
    mpmath.mp.dps = 40
    alpha = mpmath.exp(mpmath.mpf(log_shape))
    w = mpmath.mpf(y) * alpha / mpmath.exp(mpmath.mpf(log_mean))
    return float(alpha * (mpmath.log(w) - mpmath.digamma(alpha)) - (w - alpha))


@pytest.mark.parametrize(("log_shape", "dtype", "atol"), [(14.0, torch.float32, 1e-5), (19.0, torch.float64, 1e-9),
                                                          (30.0, torch.float64, 1e-6), (36.0, torch.float64, 1e-5),
                                                          (-0.5, torch.float64, 1e-12), (-300.0, torch.float64, 1e-12)])
def test_gamma_output_score_against_mpmath(log_shape, dtype, atol):
    """u_α of given labels y = μ(1 + t/√α) (the bulk of the law; for small α, y = μ·e^{−t/α}) against
    40 digits. Tolerance: float64 rounding of y/μ (ε·√α·|t| in u_α); float32 labels are exact inputs
    here, the score being computed in float64."""
    fam, log_mean = Gamma(), 0.4
    t = torch.tensor([-3.0, -1.0, -0.2, 0.1, 1.0, 4.0], dtype=torch.float64)
    if log_shape > 0:
        y = math.exp(log_mean) * (1 + t / math.exp(log_shape / 2))
    else:
        y = torch.exp(log_mean - t.abs() * math.exp(-log_shape))
    y = y.to(dtype)
    o = torch.tensor([[log_mean, log_shape]], dtype=dtype)
    u = fam.output_score(y.reshape(1, -1, 1), o)[0, :, 1]
    want = torch.tensor([_mp_shape_score(float(v), float(o[0, 0]), float(o[0, 1])) for v in y.double()], dtype=torch.float64)
    assert torch.allclose(u.double(), want, rtol=0, atol=atol), (u, want)


@pytest.mark.parametrize("log_shape", [-180.0, -356.0, -400.0, -700.0, -3.0, 2.9])
def test_gamma_cumulants_at_small_shape_against_mpmath(log_shape):
    """α²ψ'(α) − α, α³ψ''(α) + α, α⁴ψ'''(α) − 2α (limits 1, −2, 6 as α → 0). Before: κ₄ = inf
    at log-shape −180, Λ_αα = inf at −356 and NaN at −400."""
    mpmath.mp.dps = 40
    alpha = mpmath.exp(mpmath.mpf(log_shape))
    want = [alpha**2 * mpmath.polygamma(1, alpha) - alpha, alpha**3 * mpmath.polygamma(2, alpha) + alpha,
            alpha**4 * mpmath.polygamma(3, alpha) - 2 * alpha]
    second, third, fourth = Gamma().cumulants_by_count(torch.tensor([[0.0, log_shape]], dtype=torch.float64))
    got = [second[0, 0, 2], third[0, 0, 3], fourth[0, 0, 4]]
    for value, reference in zip(got, want):
        assert math.isclose(float(value), float(reference), rel_tol=1e-13), (got, want)


@pytest.mark.parametrize(("mean", "log_var", "dtype"), [(1e8, -40.0, torch.float64), (1e10, -20.0, torch.float64),
                                                        (1000.0, -20.0, torch.float32)])
def test_heteroscedastic_sampled_scores_with_mean_far_above_sigma(mean, log_var, dtype):
    """Before: the scores came from labels y = μ + σz, and (y − μ)/σ cancelled (float64 μ = 1e8,
    log σ² = −40: E[u_μ²]/Λ_μμ = 0.020)."""
    fam, o = HeteroscedasticGaussian(), torch.tensor([[mean, log_var]], dtype=dtype)
    u = fam.sample_scores(o, N, torch.Generator().manual_seed(2))[0]
    assert u.dtype == dtype
    _assert_score_moments(u, torch.diagonal(fam.fisher_output(o.double())[0]))


@pytest.mark.parametrize("family", [HeteroscedasticGaussian(), Gamma()])
def test_sampled_scores_are_those_of_the_sampled_labels(family):
    """Where labels carry the scores exactly enough (moderate outputs), sample_scores draws the same
    randomness as sample: the scores of sample's labels."""
    o = torch.tensor([[0.3, -1.2, 0.5, 2.0], [-0.4, 0.7, -3.0, 25.0]], dtype=torch.float64)
    y = family.sample(o, 50, torch.Generator().manual_seed(3))
    u = family.sample_scores(o, 50, torch.Generator().manual_seed(3))
    # Rounding of the labels: w − α loses ε·α·(2 + |log α − log μ|) (gamma); y − μ loses ε(1 + |μ|),
    # so z = (y − μ)/σ loses that over σ, u_μ = z/σ over σ² and u_s = (z² − 1)/2 that times |z| ≲ 5.
    first, second = o.chunk(2, dim=-1)
    if isinstance(family, Gamma):
        scale = second.exp() * (2 + (second - first).abs())
    else:
        scale = (1 + first.abs()) * ((-second).exp() + 5 * (-0.5 * second).exp())
    tol = 1e-12 + 64 * torch.finfo(o.dtype).eps * torch.cat([scale, scale], -1).unsqueeze(1)
    assert bool(((u - family.output_score(y, o)).abs() <= tol).all())


def test_bernoulli_labels_are_the_exact_inverse_cdf_of_float32_logits():
    """The sampler's rule is documented: the rarer label where U < σ(−|o|), U uniform in float64.
    Oracle: the same uniforms against the exact σ(−|o|) of each float32 logit, with the logits placed
    at the uniforms' own thresholds (o = ±log((1 − U)/U) rounded to float32), where float32's
    σ(o) (error 6e-8 absolute, as large as 1 − p above o ≈ 17) used to pick the wrong label: the same
    rule with a float32 threshold gets 3232 of these 20000 labels wrong."""
    n = 20000
    uniform = torch.rand((n, 1, 1), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double().reshape(n, 1, 1)
    logits = (sign * torch.log((1 - uniform) / uniform)).reshape(n, 1).float()
    labels = Bernoulli().sample(logits, 1, torch.Generator().manual_seed(4))
    rare = uniform.flatten() < torch.sigmoid(-logits.double().abs()).flatten()  # float64: 1e-16 relative
    want = torch.where(logits.flatten() >= 0, ~rare, rare).float()
    assert labels.dtype == torch.float32 and torch.equal(labels.flatten(), want)


@pytest.mark.parametrize("logit", [-3.0, 0.4, 8.0])
def test_bernoulli_label_frequencies(logit):
    """P(y = 1) = σ(o), within 5 binomial standard errors."""
    n = 400_000
    y = Bernoulli().sample(torch.tensor([[logit]]), n, torch.Generator().manual_seed(5))
    p = 1 / (1 + math.exp(-logit))
    assert abs(float(y.double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / n)
