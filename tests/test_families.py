"""Output families against hand-written likelihoods, enumeration and quadrature (DESIGN.md §2)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FAMILIES
from oracles import FAMILY_WIDTH, log_likelihood, output_fisher
from torch.func import grad

import torchfim
from torchfim import TorchfimError
from torchfim.families import Family, Gaussian, get_family
from torchfim.families.gaussian import SIGMA_RANGE


def outputs(family: str, n: int = 3) -> torch.Tensor:
    return 0.7 * torch.randn(n, FAMILY_WIDTH[family], generator=torch.Generator().manual_seed(4), dtype=torch.float64)


def labels(family: str, o: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    return get_family(family).sample(o, k, torch.Generator().manual_seed(seed))


def test_score_and_log_prob_match_hand_written_likelihood(family):
    fam, o = get_family(family), outputs(family)
    y = labels(family, o, 5)
    u = fam.output_score(y, o)
    lp = fam.log_prob(o, y)
    assert u.shape == y.shape[:2] + (o.shape[1],) and lp.shape == y.shape[:2]
    for i in range(o.shape[0]):
        for j in range(y.shape[1]):
            ref_u = grad(lambda out, i=i, j=j: log_likelihood(family, out, y[i, j]))(o[i])
            assert torch.allclose(u[i, j], ref_u, rtol=1e-12, atol=1e-12)
            assert torch.allclose(lp[i, j], log_likelihood(family, o[i], y[i, j]), rtol=1e-12)
    assert torch.allclose(fam.nll(o, y), -lp.mean())


def test_fisher_output_is_negative_hessian_of_log_likelihood(family):
    fam, o = get_family(family), outputs(family)
    lam = fam.fisher_output(o)
    for i in range(o.shape[0]):
        assert torch.allclose(lam[i], output_fisher(family, o[i]), rtol=1e-12, atol=1e-14)
    s = fam.fisher_output_sqrt(o)
    assert torch.allclose(s @ s.transpose(-1, -2), lam, rtol=1e-12, atol=1e-14)


def test_categorical_root_columns_are_those_of_the_whole_root():
    """Blocks of columns of the categorical ``S`` (``S Sᵀ = Λ``), on both sides of the top class whose
    Householder column is left out, equal the whole root's, and so do the blocks the exact Fisher takes
    once the whole root is over its budget."""
    fam = get_family("categorical")
    o = torch.randn(3, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    o[0, 0], o[1, 3], o[2, 6] = 4.0, 4.0, 4.0  # top classes first, inside, last
    whole = fam.fisher_output_sqrt(o)
    assert whole.shape == (3, 7, 6)
    assert torch.allclose(whole @ whole.transpose(-1, -2), fam.fisher_output(o), rtol=1e-12, atol=1e-14)
    for start, stop in ((0, 2), (2, 5), (5, 6), (0, 6)):
        assert torch.equal(fam.fisher_output_sqrt_columns(o, start, stop), whole[..., start:stop])
    blocks = list(fam.fisher_output_sqrt_blocks(o, max_entries=3 * 7 * 4))
    assert [b.shape[-1] for b in blocks] == [4, 2] and torch.equal(torch.cat(blocks, -1), whole)


def test_a_vocabulary_root_comes_a_block_at_a_time():
    """50,257 classes (GPT-2's vocabulary): the whole root of two rows would hold 2·50257·50256 numbers
    (20 GB in float32, and the Householder matrix as much again); its first block stays under the
    budget and matches columns built alone."""
    from torchfim.families import base

    fam = get_family("categorical")
    o = torch.randn(2, 50257, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    first = next(fam.fisher_output_sqrt_blocks(o))
    assert first.shape[:2] == (2, 50257) and 0 < first.numel() <= base.SQRT_BLOCK_ENTRIES
    assert torch.equal(first[..., :3], fam.fisher_output_sqrt_columns(o, 0, 3))
    s = torch.softmax(o, -1).sqrt()
    q = first / s.unsqueeze(-1)  # S = diag(s) Q: Q's columns orthonormal and orthogonal to s
    eye = torch.eye(q.shape[-1], dtype=q.dtype).expand(2, -1, -1)
    assert torch.allclose(q.transpose(1, 2) @ q, eye, atol=1e-12)
    assert float((q * s.unsqueeze(-1)).sum(1).abs().max()) < 1e-12


def _exact_moments(family: str, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """E[u], E[uuᵀ] and E[u⊗u⊗u⊗u] by enumeration (discrete) or Gauss–Hermite quadrature."""
    fam = get_family(family)
    c = o.shape[0]
    if family == "categorical":
        support = torch.arange(c)
        weights = torch.softmax(o, 0)
    elif family == "bernoulli":
        support = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
        p = torch.sigmoid(o)
        weights = torch.cat([1 - p, p])
    elif family == "poisson":
        counts = torch.arange(80, dtype=torch.float64)
        grid = torch.cartesian_prod(*[counts] * c)
        support = grid
        weights = torch.exp(fam.log_prob(o.unsqueeze(0), grid.unsqueeze(0)))[0]
    else:
        nodes, w = np.polynomial.hermite_e.hermegauss(8)
        nodes, w = torch.tensor(nodes), torch.tensor(w / w.sum())
        support = o + torch.cartesian_prod(*[nodes] * c).reshape(-1, c)
        weights = torch.cartesian_prod(*[w] * c).reshape(-1, c).prod(1)
    u = fam.output_score(support.unsqueeze(0), o.unsqueeze(0))[0]
    m1 = torch.einsum("s,sa->a", weights, u)
    m2 = torch.einsum("s,sa,sb->ab", weights, u, u)
    m4 = torch.einsum("s,sa,sb,sc,sd->abcd", weights, u, u, u, u)
    return m1, m2, m4


def test_moments_by_enumeration(family):
    fam, o = get_family(family), outputs(family)
    lam, m4 = fam.fisher_output(o), fam.fourth_moment(o)
    for i in range(o.shape[0]):
        m1, m2, ref4 = _exact_moments(family, o[i])
        assert m1.abs().max() < 1e-12
        assert torch.allclose(m2, lam[i], rtol=1e-10, atol=1e-12)
        assert torch.allclose(m4[i], ref4, rtol=1e-10, atol=1e-12)


def test_contractions_match_enumerated_moments(family):
    """moment4, moments_along and quadratic_moment against the enumerated E[u⊗u⊗u⊗u] and Λ."""
    fam, o = get_family(family), outputs(family)
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(o.shape[0], 3, o.shape[1], generator=gen, dtype=o.dtype)
    w = torch.randn(o.shape[0], 3, o.shape[1], generator=gen, dtype=o.dtype)
    k = torch.randn(o.shape[0], o.shape[1], o.shape[1], generator=gen, dtype=o.dtype)
    k = k + k.transpose(1, 2)
    class_first = v.permute(2, 0, 1).contiguous().permute(1, 2, 0)  # the layout back-propagation gives
    second, fourth = fam.moments_along(o, v)
    second_cf, fourth_cf = fam.moments_along(o, class_first)
    for i in range(o.shape[0]):
        _, m2, m4 = _exact_moments(family, o[i])
        ref2 = torch.einsum("ab,ma,mb->m", m2, v[i], v[i])
        ref4 = torch.einsum("abcd,ma,mb,mc,md->m", m4, v[i], v[i], v[i], v[i])
        mixed = torch.einsum("abcd,ma,mb,mc,md->m", m4, v[i], v[i], w[i], w[i])
        for got2, got4 in ((second, fourth), (second_cf, fourth_cf)):
            assert torch.allclose(got2[i], ref2, rtol=1e-10, atol=1e-12)
            assert torch.allclose(got4[i], ref4, rtol=1e-10, atol=1e-12)
        assert torch.allclose(fam.moment4(o, v, w)[i], mixed, rtol=1e-10, atol=1e-12)
        quad = torch.einsum("abcd,ab,cd->", m4, k[i], k[i])
        assert torch.allclose(fam.quadratic_moment(o, k)[i], quad, rtol=1e-10, atol=1e-12)


def test_sampling_matches_moments(family):
    """Sample means of u and uuᵀ agree with 0 and Λ within 4.5 standard errors."""
    fam, o = get_family(family), outputs(family, n=2)
    k = 40000
    u = fam.output_score(labels(family, o, k, seed=9), o)
    outer = torch.einsum("nka,nkb->nkab", u, u)
    for values, target in ((u, torch.zeros_like(o)), (outer, fam.fisher_output(o))):
        mean, se = values.mean(1), values.std(1) / k**0.5
        assert bool(((mean - target).abs() <= 4.5 * se + 1e-12).all())


def test_sampling_is_reproducible(family):
    o = outputs(family)
    assert torch.equal(labels(family, o, 7, seed=3), labels(family, o, 7, seed=3))
    assert not torch.equal(labels(family, o, 7, seed=3), labels(family, o, 7, seed=4))


def test_gaussian_sigma():
    fam, o = Gaussian(sigma=0.5), outputs("gaussian")
    assert torch.allclose(fam.fisher_output(o)[0], 4 * torch.eye(2, dtype=torch.float64))
    with pytest.raises(TorchfimError, match="sigma must be a positive"):
        Gaussian(sigma=0.0)
    for refused in (True, torch.tensor([0.5]), float("nan")):
        with pytest.raises(TorchfimError, match="sigma must be a positive"):
            Gaussian(sigma=refused)
    assert Gaussian(sigma=np.float32(0.5)).sigma == Gaussian(sigma=torch.tensor(0.5)).sigma == 0.5  # refused before


def test_gaussian_sigma_outside_float64s_reach_is_refused_and_its_edges_give_finite_variances():
    """σ = 1e100 or 1e300 ended fisher_variance in Python's OverflowError (σ⁴ of a float), and σ = 1e-300 in "the
    per-sample products overflowed ... rescale the inputs", a fix that does not help (a review): σ beyond 1e±75 is now
    refused by name. At the edges the variance is 2·Σ‖J‖⁴_F/σ⁴-like: finite, and scaling as 1/σ⁴ exactly."""
    for refused in (1e300, 1e100, 1e-100, 1e-300):
        with pytest.raises(TorchfimError, match="sigma must be a positive number from 1e-75 to 1e"):
            Gaussian(sigma=refused)
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 2).double(), torch.randn(5, 3, dtype=torch.float64)
    one = float(torchfim.fisher_variance(model, x, family=Gaussian(1.0), estimator="score", structure="trace"))
    for sigma in SIGMA_RANGE:
        v = float(torchfim.fisher_variance(model, x, family=Gaussian(sigma), estimator="score", structure="trace"))
        assert math.isfinite(v) and v == pytest.approx(one / sigma**4, rel=1e-9)


def test_get_family():
    assert isinstance(get_family("poisson"), Family)
    inst = Gaussian(2.0)
    assert get_family(inst) is inst
    with pytest.raises(TorchfimError, match="unknown family 'softmax'.*choose one of"):
        get_family("softmax")


@pytest.mark.parametrize(
    ("family", "shape", "message"),
    [
        ("bernoulli", (4, 3), "one logit per input.*use family='categorical'"),
        ("categorical", (4, 1), "at least 2 logits.*family='bernoulli'"),
        ("gaussian", (4, 2, 2), r"shape \(batch, C\).*flat output"),
    ],
)
def test_output_shape_errors(family, shape, message):
    with pytest.raises(TorchfimError, match=message):
        get_family(family).check_output(torch.zeros(shape))


def test_target_errors():
    o = torch.zeros(4, 3)
    fam = get_family("categorical")
    with pytest.raises(TorchfimError, match="class indices"):
        fam.check_targets(torch.zeros(4), o)
    with pytest.raises(TorchfimError, match=r"lie in \[0, 2\]"):
        fam.check_targets(torch.tensor([0, 1, 2, 3]), o)
    with pytest.raises(TorchfimError, match="must be 0 or 1"):
        get_family("bernoulli").check_targets(torch.tensor([0.0, 2.0, 1.0, 0.0]), o[:, :1])
    with pytest.raises(TorchfimError, match="non-negative integer counts"):
        get_family("poisson").check_targets(torch.full((4, 3), 0.5), o)


@pytest.mark.parametrize("family", FAMILIES)
def test_samples_have_documented_shape(family):
    o = outputs(family)
    y = labels(family, o, 5)
    want = (3, 5) if family == "categorical" else (3, 5, FAMILY_WIDTH[family])
    assert tuple(y.shape) == want
