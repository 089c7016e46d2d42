"""Structure-aware moments and spectra of the families against enumeration and the dense defaults.

Every override (pairwise fourth moments, third moments, Λ-bilinear forms, top eigenvalues of Λ and
of the fourth-moment matrix) is checked in float64 against sums over the label support
(``oracles.label_support``: exact enumeration, truncated Poisson, exact Gauss–Hermite) and
against the dense ``Family`` defaults, then on confident classifiers where ``1 − p`` cancels, and
on the (256, 100) batch of issue 11 in float32/float16/bfloat16.
"""

from __future__ import annotations

import pytest
import torch
from oracles import FAMILY_WIDTH, label_support

from torchfim.families import Categorical, Family, get_family
from torchfim.families import categorical as categorical_module

RTOL = 1e-10


def outputs(family: str, n: int = 3, seed: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return 0.7 * torch.randn(n, FAMILY_WIDTH[family], generator=gen, dtype=torch.float64)


def vectors(o: torch.Tensor, m: int, seed: int) -> torch.Tensor:
    return torch.randn(o.shape[0], m, o.shape[1], generator=torch.Generator().manual_seed(seed), dtype=o.dtype)


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> bool:
    """Relative agreement measured against the largest entry (entries may be 0)."""
    scale = want.abs().max().clamp_min(1e-300)
    return bool(((got - want).abs() <= rtol * scale).all())


def enumerated(family: str, o: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per input: label probabilities (S,) and scores u (S, C) over the label support."""
    return [label_support(family, oi)[1:] for oi in o]


def test_pairwise_moment4_matches_enumeration_and_dense_default(family):
    fam, o = get_family(family), outputs(family)
    v = vectors(o, 4, seed=1)
    got = fam.pairwise_moment4(o, v)
    assert got.shape == (3, 4, 4)
    for i, (probs, u) in enumerate(enumerated(family, o)):
        proj = (u @ v[i].T) ** 2  # (S, m): (uᵀv_p)²
        assert close(got[i], torch.einsum("s,sp,sq->pq", probs, proj, proj))
    assert close(got, Family.pairwise_moment4(fam, o, v))


def test_pairwise_spread_is_the_variance_of_the_score_products(family):
    """``Var[(uᵀv_p)(uᵀv_q)]`` by enumeration over the labels (for one output by ``Var(u²) v_p² v_q²``)."""
    fam, o = get_family(family), outputs(family)
    v = vectors(o, 4, seed=1)
    got = fam.pairwise_spread(o, v)
    for i, (probs, u) in enumerate(enumerated(family, o)):
        proj = u @ v[i].T  # (S, m)
        mean = torch.einsum("s,sp,sq->pq", probs, proj, proj)
        assert close(got[i], torch.einsum("s,sp,sq->pq", probs, proj**2, proj**2) - mean**2)


def test_third_moments_match_enumeration(family):
    fam, o = get_family(family), outputs(family)
    a, b, c = vectors(o, 3, seed=2), vectors(o, 3, seed=3), vectors(o, 3, seed=4)
    third, along = fam.third_moment(o), fam.moment3(o, a, b, c)
    assert third.shape == (3,) + (FAMILY_WIDTH[family],) * 3 and along.shape == (3, 3)
    for i, (probs, u) in enumerate(enumerated(family, o)):
        want = torch.einsum("s,sa,sb,sc->abc", probs, u, u, u)
        assert torch.allclose(third[i], want, rtol=RTOL, atol=1e-12)
        want3 = torch.einsum("s,sm,sm,sm->m", probs, u @ a[i].T, u @ b[i].T, u @ c[i].T)
        assert torch.allclose(along[i], want3, rtol=RTOL, atol=1e-12)
    assert torch.allclose(along, Family.moment3(fam, o, a, b, c), rtol=RTOL, atol=1e-12)


def test_fisher_bilinear_and_gram_match_enumeration(family):
    fam, o = get_family(family), outputs(family)
    v, w = vectors(o, 3, seed=5), vectors(o, 3, seed=6)
    bilinear, gram = fam.fisher_output_bilinear(o, v, w), fam.fisher_output_gram(o, v)
    for i, (probs, u) in enumerate(enumerated(family, o)):
        assert close(bilinear[i], torch.einsum("s,sm,sm->m", probs, u @ v[i].T, u @ w[i].T))
        assert close(gram[i], torch.einsum("s,sp,sq->pq", probs, u @ v[i].T, u @ v[i].T))
    assert close(gram, Family.fisher_output_gram(fam, o, v))


def test_top_eigenvalues_match_dense_spectra(family):
    fam, o = get_family(family), outputs(family, n=4)
    lam_top, m4_top = fam.fisher_output_top_eigenvalue(o), fam.fourth_moment_top_eigenvalue(o)
    for i, (probs, u) in enumerate(enumerated(family, o)):
        lam = torch.einsum("s,sa,sb->ab", probs, u, u)
        vec = torch.einsum("sa,sb->sab", u, u).reshape(len(probs), -1)
        m4 = torch.einsum("s,sx,sy->xy", probs, vec, vec)
        assert close(lam_top[i], torch.linalg.eigvalsh(lam)[-1])
        assert close(m4_top[i], torch.linalg.eigvalsh(m4)[-1])
    assert close(m4_top, Family.fourth_moment_top_eigenvalue(fam, o))
    assert close(lam_top, Family.fisher_output_top_eigenvalue(fam, o))


@pytest.mark.parametrize("family", ["categorical", "gaussian", "poisson"])
def test_wider_outputs_match_dense_defaults(family):
    """C = 7: every override against the dense C⁴ defaults (whose tensors test_families checks)."""
    fam = get_family(family)
    o = 1.5 * torch.randn(5, 7, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    v = vectors(o, 3, seed=9)
    assert close(fam.pairwise_moment4(o, v), Family.pairwise_moment4(fam, o, v))
    assert close(fam.fourth_moment_top_eigenvalue(o), Family.fourth_moment_top_eigenvalue(fam, o))
    assert close(fam.fisher_output_top_eigenvalue(o), Family.fisher_output_top_eigenvalue(fam, o))
    assert close(fam.moment3(o, v, v, v), Family.moment3(fam, o, v, v, v))


def test_gaussian_fourth_top_eigenvalue_is_lambda_squared_times_c_plus_2():
    fam = get_family("gaussian")
    fam.sigma = 0.5
    o = torch.zeros(2, 5, dtype=torch.float64)
    dense = torch.linalg.eigvalsh(fam.fourth_moment(o).reshape(2, 25, 25))[:, -1]
    assert torch.allclose(fam.fourth_moment_top_eigenvalue(o), torch.full((2,), 16.0 * 7, dtype=torch.float64))
    assert torch.allclose(dense, torch.full((2,), 16.0 * 7, dtype=torch.float64))


def _accurate_scores(o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """p and the score vectors d_y = e_y − p with d_r[r] = Σ_{a≠r} p_a (no cancellation), float64."""
    p = torch.softmax(o, -1)
    r = int(p.argmax())
    d = torch.eye(len(p), dtype=o.dtype) - p
    d[r, r] = torch.cat([p[:r], p[r + 1 :]]).sum()
    return p, d


@pytest.mark.parametrize("margin", [5.0, 40.0, 100.0, 300.0, 700.0])
def test_categorical_spectra_keep_relative_precision_for_confident_classifiers(margin):
    """p_r rounds to 1 in float64 above margin ≈ 37; the eigenvalues must still be right to 1e-10."""
    fam = Categorical()
    two = torch.tensor([[margin, 0.0]], dtype=torch.float64)
    q = torch.sigmoid(-two[:, 0])
    p0 = torch.sigmoid(two[:, 0])
    # C = 2: Λ = pq[[1,−1],[−1,1]] so λ_max = 2pq; M = (p q⁴ + q p⁴) w wᵀ with ‖w‖² = 4.
    assert close(fam.fisher_output_top_eigenvalue(two), 2 * p0 * q)
    assert close(fam.fourth_moment_top_eigenvalue(two), 4 * p0 * q * (q**3 + p0**3))
    o = torch.tensor([[margin, 0.3, -0.5, 1.0]], dtype=torch.float64)
    p, d = _accurate_scores(o[0])
    lam = torch.einsum("y,ya,yb->ab", p, d, d)
    vec = torch.einsum("ya,yb->yab", d, d).reshape(4, 16)
    m4 = torch.einsum("y,yx,yz->xz", p, vec, vec)
    for got, dense in ((fam.fisher_output_top_eigenvalue(o), lam), (fam.fourth_moment_top_eigenvalue(o), m4)):
        scale = dense.abs().max()
        assert close(got[0], torch.linalg.eigvalsh(dense / scale)[-1] * scale)
        assert float(got[0]) > 0


@pytest.mark.parametrize("classes", [9, 150])
def test_categorical_fourth_top_bound_above_the_exact_threshold(monkeypatch, classes):
    """Above EXACT_FOURTH_TOP_CLASSES the O(C) Collatz–Wielandt value is an upper bound, and
    tight, for ordinary and confident (margins up to 700) classifiers alike."""
    o = 2.0 * torch.randn(8, classes, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    o[:6, 0] += torch.tensor([10.0, 30.0, 60.0, 100.0, 300.0, 700.0], dtype=torch.float64)
    exact = Categorical().fourth_moment_top_eigenvalue(o)
    monkeypatch.setattr(categorical_module, "EXACT_FOURTH_TOP_CLASSES", 4)
    bound = Categorical().fourth_moment_top_eigenvalue(o)
    assert bool((bound >= exact * (1 - 1e-12)).all())
    assert bool((bound <= exact * (1 + 1e-6)).all())


def issue11_logits(dtype: torch.dtype, n: int = 256, c: int = 100) -> torch.Tensor:
    """Logits whose top-class margins run from 1 to 1e4 (issue 11: eigh failed above ≈ 40)."""
    gen = torch.Generator().manual_seed(11)
    o = 3 * torch.randn(n, c, generator=gen)
    o[:, 0] += torch.logspace(0, 4, n)
    return o.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_issue11_confident_batch_runs_finite_in_low_precision(dtype):
    fam, o = Categorical(), issue11_logits(dtype)
    v = vectors(o.double(), 4, seed=12).to(dtype)
    results = [
        fam.fisher_output_top_eigenvalue(o),
        fam.fourth_moment_top_eigenvalue(o),
        fam.pairwise_moment4(o, v),
        *fam.moments_along(o, v),
        fam.moment3(o, v, v, v),
        fam.fisher_output_gram(o, v),
    ]
    for r in results:
        assert r.dtype == dtype and bool(torch.isfinite(r).all())
    # Against float64 on the same rounded logits, relative where the value is in the dtype's
    # normal range (margins ≳ 88 push it below float32's, ≳ 10 below float16's).
    floor = 1e3 * torch.finfo(dtype).tiny
    rtol = 2e-2 if dtype == torch.bfloat16 else 1e-2
    for got, reference in (
        (results[0], fam.fisher_output_top_eigenvalue(o.double())),
        (results[1], fam.fourth_moment_top_eigenvalue(o.double())),
    ):
        assert bool(((got.double() - reference).abs() <= rtol * reference + floor).all())
    assert bool((results[0] >= 0).all()) and bool((results[1] >= 0).all())


def test_issue11_float64_agrees_with_dense_reference():
    """A smaller batch of the same kind (margins up to 30, where the dense float64 path is sound)."""
    gen = torch.Generator().manual_seed(13)
    o = 2 * torch.randn(16, 12, generator=gen, dtype=torch.float64)
    o[:, 0] += torch.linspace(0, 30, 16, dtype=torch.float64)
    fam = Categorical()
    v = vectors(o, 5, seed=14)
    assert close(fam.fourth_moment_top_eigenvalue(o), Family.fourth_moment_top_eigenvalue(fam, o))
    assert close(fam.fisher_output_top_eigenvalue(o), Family.fisher_output_top_eigenvalue(fam, o))
    assert close(fam.pairwise_moment4(o, v), Family.pairwise_moment4(fam, o, v))


def test_issue11_fourth_top_eigenvalue_allocates_no_fourth_order_tensor():
    """(256, 100) float32: the dense path asked for a 25.6 GB tensor; now no single allocation tops
    256 MiB (measured: 20 MiB). Memory is counted by torch's profiler, not timed."""
    from torch.profiler import ProfilerActivity, profile

    fam, o = Categorical(), issue11_logits(torch.float32)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        top = fam.fourth_moment_top_eigenvalue(o)
    assert torch.isfinite(top).all()
    largest = max(e.cpu_memory_usage for e in prof.events())
    assert 0 < largest < 256 * 2**20, f"largest allocation {largest / 2**20:.0f} MiB"
