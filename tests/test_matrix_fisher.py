"""The matrix Fisher normaliser and moments at every concentration (float64).

Moderate concentrations are checked against the Euler-angle quadrature in ``test_families_new``;
here: the one-dimensional building blocks against mpmath, the chain ``∇ log c = E[vec R]``,
``∇E[vec R] = Λ``, ``∇Λ = E[u⊗u⊗u]``, ``∇E[u⊗u⊗u] = κ₄`` by central differences from nearly
uniform to very concentrated laws, and the sampler at high concentration.
"""

from __future__ import annotations

import math
import warnings

import mpmath
import pytest
import torch

from torchfim import TorchfimError
from torchfim.families import MatrixFisher
from torchfim.families.matrix_fisher_normaliser import (
    matrix_fisher_moments,
    proper_svd,
    tilted_beta_moments,
)


@pytest.mark.parametrize("kappa", [0.0, 1e-3, 0.7, 12.0, 29.9, 30.0, 30.1, 75.0, 1e3, 1e6])
def test_tilted_beta_moments_against_mpmath(kappa):
    """``T_mn(κ) = B(n+½, m+½)/π · ₁F₁(n+½; m+n+1; −2κ)`` on both sides of the series switch (2κ = 60)."""
    mpmath.mp.dps = 40
    got = tilted_beta_moments(torch.tensor([kappa], dtype=torch.float64), 4)
    for (m, n), value in got.items():
        ref = mpmath.beta(n + 0.5, m + 0.5) / mpmath.pi * mpmath.hyp1f1(n + 0.5, m + n + 1, -2 * mpmath.mpf(kappa))
        assert abs(float(value[0]) / float(ref) - 1) < 1e-13, (m, n)


def test_proper_svd():
    a = torch.randn(5, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u, s, v = proper_svd(a)
    assert torch.allclose(u @ torch.diag_embed(s) @ v.transpose(-1, -2), a, atol=1e-12)
    assert torch.allclose(torch.linalg.det(u), torch.ones(5, dtype=torch.float64))
    assert torch.allclose(torch.linalg.det(v), torch.ones(5, dtype=torch.float64))
    assert bool((s[:, 0] >= s[:, 1]).all() and (s[:, 1] >= s[:, 2].abs()).all())
    assert torch.allclose(s.prod(-1), torch.linalg.det(a))


def test_uniform_law():
    """A = 0: c = 1, E[R] = 0, Cov(vec R) = I/3 (entries of a Haar rotation: E[R_ij R_kl] = δ_ik δ_jl / 3)."""
    moments = matrix_fisher_moments(torch.zeros(1, 9, dtype=torch.float64), 2)
    assert abs(float(moments.log_normaliser[0])) < 1e-14
    assert float(moments.mean.abs().max()) < 1e-14
    assert torch.allclose(moments.cov[0], torch.eye(9, dtype=torch.float64) / 3, atol=1e-14)


def _rotation(seed: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))[0]


SINGULAR_VALUES = [(0.3, 0.2, 0.1), (5.0, 3.0, -1.0), (20.0, 0.0, 0.0), (100.0, 100.0, -100.0), (800.0, 500.0, -300.0),
                   (1e3, 1.0, 0.5), (1e4, 2e3, 1e3)]


@pytest.mark.parametrize("singular_values", SINGULAR_VALUES)
def test_moments_are_derivatives_of_the_normaliser(singular_values):
    """Each moment is the central difference of the one below it, relative to its own scale."""
    a = (_rotation(1) @ torch.diag(torch.tensor(singular_values, dtype=torch.float64)) @ _rotation(2).T).reshape(1, 9)
    base = matrix_fisher_moments(a, 4)
    cov = base.cov[0]
    isserlis = sum(torch.einsum(f"{p},{q}->abcd", cov, cov) for p, q in (("ab", "cd"), ("ac", "bd"), ("ad", "bc")))
    targets = (base.mean[0], cov, base.third[0], base.fourth[0] - isserlis)
    h = 1e-5 * math.sqrt(max(1.0, max(abs(s) for s in singular_values)))
    differences = [torch.zeros_like(t) for t in targets]
    for i in range(9):
        step = torch.zeros_like(a)
        step[0, i] = h
        up, down = matrix_fisher_moments(a + step, 3), matrix_fisher_moments(a - step, 3)
        for d, field in zip(differences, ("log_normaliser", "mean", "cov", "third")):
            d[i] = (getattr(up, field) - getattr(down, field))[0] / (2 * h)
    for d, t in zip(differences, targets):
        assert float((d - t).abs().max()) <= 2e-6 * float(t.abs().max())


def test_sampling_at_high_concentration():
    """At singular values 1e2–1e4 the sample moments of u still match Λ and the fourth moments."""
    fam = MatrixFisher()
    a = torch.stack(
        [(_rotation(3 + i) @ torch.diag(torch.tensor(s, dtype=torch.float64)) @ _rotation(7 + i).T).reshape(9)
         for i, s in enumerate([(300.0, 200.0, 100.0), (1e4, 50.0, -20.0)])]
    )
    k = 30000
    rotations = fam.sample(a, k, torch.Generator().manual_seed(11))
    assert torch.allclose(rotations @ rotations.transpose(-1, -2), torch.eye(3, dtype=torch.float64), atol=1e-12)
    u = fam.output_score(rotations, a)
    v = torch.randn(2, 4, 9, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    along = torch.einsum("nka,nma->nkm", u, v)
    second, fourth = fam.moments_along(a, v)
    for values, target in ((u, torch.zeros_like(a)), (along**2, second), (along**4, fourth)):
        mean, se = values.mean(1), values.std(1) / k**0.5
        assert bool(((mean - target).abs() <= 4.5 * se).all())


def _rotation(seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q * torch.linalg.det(q)  # det +1


def _assert_accurate(fam: MatrixFisher, scale: float) -> None:
    """Λ(U S Vᵀ) = (U ⊗ V) Λ(S) (U ⊗ V)ᵀ, and Λ(S) is the Laplace limit Var(ω_k) = 1/(s_i + s_j) of
    R ≈ exp([ω]×) to O(1/s) relative."""
    u, v = _rotation(1), _rotation(2)
    s = scale * torch.tensor([1.0, 0.7, 0.2], dtype=torch.float64)
    principal = fam.fisher_output(torch.diag(s).reshape(1, 9))[0]
    rotated = fam.fisher_output((u @ torch.diag(s) @ v.T).reshape(1, 9))[0]
    frame = torch.kron(u, v)
    assert torch.allclose(rotated, frame @ principal @ frame.T, rtol=0, atol=1e-13 * float(principal.abs().max()))
    for (i, j), pair in {(0, 1): s[0] + s[1], (0, 2): s[0] + s[2], (1, 2): s[1] + s[2]}.items():
        assert math.isclose(float(principal[3 * i + j, 3 * i + j] * pair), 1.0, rel_tol=10 / scale)


def test_outputs_beyond_the_accurate_range_are_warned_of_and_refused_where_not_finite():
    """Accurate, and silent, up to singular values 1e13 (the documented range; it said 1e9). Before: at
    1e14 Λ was off by 2.7e-3 relative (0.79 at 1e15, NaN at 1e18), silently."""
    fam = MatrixFisher()
    rotation = _rotation(3).reshape(1, 9)
    for scale in (1e9, 1e13):
        _assert_accurate(fam, scale)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fam.check_output(scale * rotation)
    with pytest.warns(RuntimeWarning, match=r"singular value of 1e\+14.*lose accuracy.*above 1e\+13.*rescale"):
        fam.check_output(1e14 * rotation)
    with pytest.raises(TorchfimError, match=r"singular value of 1e\+18.*not finite above 1e\+17"):
        fam.check_output(1e18 * rotation)


@pytest.mark.parametrize("scale", [1e-4, 1e-6])
@pytest.mark.parametrize("family", ["matrix_fisher", "categorical"])
def test_float32_trace_bounds_near_the_uniform_law_stay_above_the_variance(scale: float, family: str) -> None:
    """Near the uniform law uᵀGu hardly varies (‖vec R − E vec R‖² is constant on SO(3), nearly so for a softmax
    of small logits), so the trace bound's two terms are far larger than their difference: formed in float32, a
    matrix Fisher head at scale 1e-4 gave −339 times the variance (a statistics trial). The bound in float32 now
    stays above the float64 exact variance, and the spectral one within 1% of its float64 value."""
    import torchfim

    def head(dtype: torch.dtype) -> torch.nn.Module:
        torch.manual_seed(1)
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 9)).to(dtype)
        with torch.no_grad():
            model[2].weight.mul_(scale)
            model[2].bias.mul_(scale)
        return model

    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = float(torchfim.fisher_variance(head(torch.float64), x, family=family, structure="trace"))
    spectral64 = float(torchfim.score_variance_bound_spectral(head(torch.float64), x, family=family, structure="trace"))
    for bound in (torchfim.score_variance_bound_spectral, torchfim.score_variance_bound_kurtosis,
                  torchfim.variance_bound):
        assert float(bound(head(torch.float32), x.float(), family=family, structure="trace")) >= exact
    spectral32 = float(torchfim.score_variance_bound_spectral(head(torch.float32), x.float(), family=family,
                                                              structure="trace"))
    assert abs(spectral32 / spectral64 - 1) < 0.01


@pytest.mark.parametrize("structure", ["diag", "full", "blocks"])
@pytest.mark.parametrize(("family", "width"), [("bernoulli", 1), ("categorical", 4), ("matrix_fisher", 9)])
def test_float32_entry_bounds_near_the_uniform_law_stay_at_or_above_the_variance(structure: str, family: str,
                                                                                 width: int) -> None:
    """The entries' bounds cancel as the trace's do: a one-logit Bernoulli head at scale 1e-4 in float32 gave
    diagonal bounds down to −1400 times the variance (a reviewer), where λ_max(M) = E u⁴ makes the bound the
    variance itself. Formed in float64, every entry's float32 bound is at or above the float64 variance (to 1e-4
    of it: the Bernoulli bound equals it up to rounding)."""
    import torchfim

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, width))
    with torch.no_grad():
        model[2].weight.mul_(1e-4)
        model[2].bias.mul_(1e-4)
    x = torch.randn(7, 3)

    def flat(value) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in value.values()]) if isinstance(value, dict) else value.reshape(-1)

    exact = flat(torchfim.fisher_variance(model.double(), x.double(), family, "score", structure))
    bound = flat(torchfim.score_variance_bound_spectral(model.float(), x, family, structure)).double()
    assert bool((bound >= exact * (1 - 1e-4) - 1e-40).all())


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("call", ["sample", "fisher_output", "log_prob", "moments"])
def test_non_finite_outputs_called_directly_are_refused_by_name(value: float, call: str) -> None:
    """Outside torchfim.fisher (whose check_output refuses them first), a NaN or Inf A reached torch's SVD, which
    raised _LinAlgError ("failed to converge") from inside LAPACK."""
    fam, a = MatrixFisher(), torch.eye(3, dtype=torch.float64).reshape(1, 9).clone()
    a[0, 4] = value
    calls = {"sample": lambda: fam.sample(a, 2, torch.Generator().manual_seed(0)),
             "fisher_output": lambda: fam.fisher_output(a),
             "log_prob": lambda: fam.log_prob(a, torch.eye(3, dtype=torch.float64).reshape(1, 3, 3)),
             "moments": lambda: matrix_fisher_moments(a, 4)}
    with pytest.raises(TorchfimError, match=r"matrix Fisher outputs A have non-finite entries \(NaN or Inf\)"):
        calls[call]()
