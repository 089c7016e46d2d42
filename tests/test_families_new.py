"""The heteroscedastic Gaussian, gamma and matrix Fisher families against quadrature oracles (float64)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from oracles_new import NEW_FAMILIES, NEW_WIDTH, euler_grid, label_moments, log_likelihood
from torch.func import grad, hessian

from torchfim import TorchfimError
from torchfim.families import FAMILIES, Gamma, HeteroscedasticGaussian, MatrixFisher, get_family


@pytest.fixture(params=NEW_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def outputs(family: str, n: int = 3, width: int | None = None) -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    o = 0.7 * torch.randn(n, width or NEW_WIDTH[family], generator=gen, dtype=torch.float64)
    if family == "matrix_fisher":
        o = o * 2.0  # singular values of order 1–3: a law neither flat nor a point mass
    return o


def labels(family: str, o: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    return get_family(family).sample(o, k, torch.Generator().manual_seed(seed))


def test_registered_by_name():
    assert {"heteroscedastic_gaussian", "gamma", "matrix_fisher"} <= set(FAMILIES)
    assert isinstance(get_family("heteroscedastic_gaussian"), HeteroscedasticGaussian)
    assert isinstance(get_family("gamma"), Gamma)
    assert isinstance(get_family("matrix_fisher"), MatrixFisher)


def test_score_and_log_prob_match_hand_written_likelihood(family):
    fam, o = get_family(family), outputs(family)
    y = labels(family, o, 4)
    u, lp = fam.output_score(y, o), fam.log_prob(o, y)
    assert u.shape == y.shape[:2] + (o.shape[1],) and lp.shape == y.shape[:2]
    for i in range(o.shape[0]):
        for j in range(y.shape[1]):
            ref_u = grad(lambda out, label=y[i, j]: log_likelihood(family, out, label))(o[i])
            assert torch.allclose(u[i, j], ref_u, rtol=1e-9, atol=1e-11)
            assert torch.allclose(lp[i, j], log_likelihood(family, o[i], y[i, j]), rtol=1e-11, atol=1e-11)
    assert torch.allclose(fam.nll(o, y), -lp.mean())


def test_output_hessian_is_negative_hessian_of_log_likelihood(family):
    """``output_hessian`` (non-canonical) or ``Λ`` (canonical) equals −∇²_o log p at sampled labels."""
    fam, o = get_family(family), outputs(family)
    y = labels(family, o, 3)
    for i in range(o.shape[0]):
        for j in range(y.shape[1]):
            ref = -hessian(lambda out, label=y[i, j]: log_likelihood(family, out, label))(o[i])
            canonical = getattr(fam, "canonical", True)
            got = fam.fisher_output(o)[i] if canonical else fam.output_hessian(y, o)[i, j]
            # The gamma oracle's −∇² of log Γ(α) goes through torch's trigamma, off by up to ~1e-9 absolute
            # at these shapes (α²ψ'(α), α ∈ [0.3, 5]); an entry near 0 cannot meet a relative tolerance.
            assert torch.allclose(got, ref, rtol=1e-8, atol=3e-9 if family == "gamma" else 1e-10)


def test_log_prob_autograd_hessian_is_fisher_for_matrix_fisher():
    """log_prob is twice differentiable in o and −∇²_o log p = Λ (the custom backward passes)."""
    fam, o = MatrixFisher(), outputs("matrix_fisher", n=2)
    y = labels("matrix_fisher", o, 1)[:, 0]
    for i in range(2):
        neg_hess = -hessian(lambda row, label=y[i : i + 1]: fam.log_prob(row.unsqueeze(0), label).sum())(o[i])
        assert torch.allclose(neg_hess, fam.fisher_output(o)[i], rtol=1e-10, atol=1e-12)


def test_moments_by_quadrature(family):
    """E[u] = 0, E[uuᵀ] = Λ = E[−∇²_o log p], third and fourth moments, and Σ p = 1, by quadrature."""
    width = 2 if family == "gamma" else None  # the gamma rule covers one label dimension
    fam, o = get_family(family), outputs(family, width=width)
    lam, m3, m4 = fam.fisher_output(o), fam.third_moment(o), fam.fourth_moment(o)
    for i in range(o.shape[0]):
        ref = label_moments(family, o[i])
        assert abs(float(ref["total"]) - 1) < 1e-11
        scale = ref["m2"].abs().max()
        assert ref["m1"].abs().max() < 1e-10 * scale
        assert torch.allclose(lam[i], ref["m2"], rtol=1e-9, atol=1e-11 * scale)
        # The oracle's −∇² of log Γ(α) goes through torch's trigamma, good to ~1e-9 relative only.
        assert torch.allclose(ref["neg_hessian"], ref["m2"], rtol=5e-9, atol=1e-11 * scale)
        assert torch.allclose(m3[i], ref["m3"], rtol=1e-9, atol=1e-11 * scale**1.5)
        assert torch.allclose(m4[i], ref["m4"], rtol=1e-9, atol=1e-11 * scale**2)


def test_log_prob_is_normalised(family):
    """∫ p(y|o) dy = 1 from log_prob alone: one label dimension on a grid in y (Gaussian) or log y
    (gamma), the Euler-angle rule on SO(3); and log p of two dimensions is the sum of each."""
    fam = get_family(family)
    o = outputs(family, n=2, width=None if family == "matrix_fisher" else 2)
    for row in o:
        if family == "matrix_fisher":
            rotations, haar = euler_grid(32)
            mass = (haar * torch.exp(fam.log_prob(row.unsqueeze(0), rotations.unsqueeze(0))[0])).sum()
        else:
            y, weights = _line_rule(family, row)
            mass = (weights * torch.exp(fam.log_prob(row.unsqueeze(0), y.reshape(1, -1, 1))[0])).sum()
        assert abs(float(mass) - 1) < 1e-10
    if family != "matrix_fisher":
        two = outputs(family, n=1, width=4)
        y = fam.sample(two, 3, torch.Generator().manual_seed(1))
        per_dim = [fam.log_prob(two[:, [d, 2 + d]], y[..., d : d + 1]) for d in range(2)]
        assert torch.allclose(fam.log_prob(two, y), per_dim[0] + per_dim[1], rtol=1e-13)


def _line_rule(family: str, row: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and weights of composite Gauss–Legendre over the real line (Gaussian) or log y (gamma),
    with the Jacobian ``y`` of ``dy = y d(log y)`` folded into the weights."""
    if family == "gamma":
        log_mean, shape = float(row[0]), math.exp(float(row[1]))
        lo = log_mean - 45.0 / min(shape, 1.0) - 5.0
        hi = log_mean - math.log(shape) + math.log(shape + 60.0 + 12 * math.sqrt(shape))
    else:
        sd = math.exp(0.5 * float(row[1]))
        lo, hi = float(row[0]) - 14 * sd, float(row[0]) + 14 * sd
    x, w = np.polynomial.legendre.leggauss(20)
    edges = np.linspace(lo, hi, 401)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    nodes = torch.tensor(((edges[1:] + edges[:-1])[:, None] / 2 + half * x).ravel())
    weights = torch.tensor((half * w).ravel())
    if family == "gamma":
        return torch.exp(nodes), weights * torch.exp(nodes)
    return nodes, weights


@pytest.mark.parametrize("family", ["heteroscedastic_gaussian", "gamma"])
@pytest.mark.parametrize("dims", [1, 3])
def test_top_fourth_moment_eigenvalue_of_paired_families(family, dims):
    """The O(D) λ_max(M) against the dense C²×C² eigenproblem, one and three label dimensions."""
    fam, o = get_family(family), 1.3 * outputs(family, n=4, width=2 * dims)
    c = o.shape[1]
    dense = torch.linalg.eigvalsh(fam.fourth_moment(o).reshape(4, c * c, c * c))[:, -1]
    assert torch.allclose(fam.fourth_moment_top_eigenvalue(o), dense, rtol=1e-9)


def test_contractions_match_dense_moments(family):
    """moment4, moments_along, pairwise_moment4, quadratic_moment, moment3 against the dense tensors."""
    fam, o = get_family(family), outputs(family)
    gen = torch.Generator().manual_seed(5)
    c = o.shape[1]
    v, w, x = (torch.randn(o.shape[0], 3, c, generator=gen, dtype=o.dtype) for _ in range(3))
    k = torch.randn(o.shape[0], c, c, generator=gen, dtype=o.dtype)
    k = k + k.transpose(1, 2)
    m4, m3, lam = fam.fourth_moment(o), fam.third_moment(o), fam.fisher_output(o)
    assert torch.allclose(fam.moment4(o, v, w), torch.einsum("nabcd,nma,nmb,nmc,nmd->nm", m4, v, v, w, w))
    second, fourth = fam.moments_along(o, v)
    assert torch.allclose(second, torch.einsum("nab,nma,nmb->nm", lam, v, v))
    assert torch.allclose(fourth, torch.einsum("nabcd,nma,nmb,nmc,nmd->nm", m4, v, v, v, v))
    pair = torch.einsum("nabcd,npa,npb,nqc,nqd->npq", m4, v, v, v, v)
    assert torch.allclose(fam.pairwise_moment4(o, v), pair)
    assert torch.allclose(fam.quadratic_moment(o, k), torch.einsum("nabcd,nab,ncd->n", m4, k, k))
    assert torch.allclose(fam.moment3(o, v, w, x), torch.einsum("nabc,nma,nmb,nmc->nm", m3, v, w, x))
    s = fam.fisher_output_sqrt(o)
    assert torch.allclose(s @ s.transpose(-1, -2), lam, rtol=1e-10, atol=1e-12)
    top = torch.linalg.eigvalsh(lam)[:, -1]
    assert torch.allclose(fam.fisher_output_top_eigenvalue(o), top, rtol=1e-9)
    top4 = torch.linalg.eigvalsh(m4.reshape(o.shape[0], c * c, c * c))[:, -1]
    assert torch.allclose(fam.fourth_moment_top_eigenvalue(o), top4, rtol=1e-9)


def test_sampling_matches_moments(family):
    """Sample means of u, uuᵀ and (uᵀv)⁴ agree with 0, Λ and the fourth moments within 4 SE (40,000 draws)."""
    fam, o = get_family(family), outputs(family, n=2)
    k = 40000
    u = fam.output_score(labels(family, o, k, seed=9), o)
    v = torch.randn(2, 3, o.shape[1], generator=torch.Generator().manual_seed(2), dtype=o.dtype)
    along = torch.einsum("nka,nma->nkm", u, v)
    checks = (
        (u, torch.zeros_like(o)),
        (torch.einsum("nka,nkb->nkab", u, u), fam.fisher_output(o)),
        (along**3, fam.moment3(o, v, v, v)),
        (along**4, fam.moments_along(o, v)[1]),
    )
    for values, target in checks:
        mean, se = values.mean(1), values.std(1) / k**0.5
        assert bool(((mean - target).abs() <= 4 * se + 1e-12).all())


def test_sampling_is_reproducible_and_shaped(family):
    fam, o = get_family(family), outputs(family)
    y = labels(family, o, 7, seed=3)
    assert torch.equal(y, labels(family, o, 7, seed=3))
    assert not torch.equal(y, labels(family, o, 7, seed=4))
    want = (3, 7, 3, 3) if family == "matrix_fisher" else (3, 7, o.shape[1] // 2)
    assert tuple(y.shape) == want and y.dtype == o.dtype
    fam.check_targets(y[:, 0], o)  # the family's own samples are valid targets


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_outputs_agree_with_float64(family, dtype):
    """Every method runs on float32/float16/bfloat16 outputs, returns that dtype, and agrees with float64
    on the same rounded values (the families compute in float32 or wider)."""
    fam, gen = get_family(family), torch.Generator().manual_seed(2)
    o = outputs(family).to(dtype)
    y = fam.sample(o, 3, gen)
    v = torch.randn(o.shape[0], 2, o.shape[1], generator=gen).to(dtype)
    k = torch.randn(o.shape[0], o.shape[1], o.shape[1], generator=gen)
    k = (k + k.transpose(1, 2)).to(dtype)

    def calls(o, y, v, k):
        return {
            "output_score": fam.output_score(y, o),
            "log_prob": fam.log_prob(o, y),
            "fisher_output": fam.fisher_output(o),
            "fisher_output_sqrt": fam.fisher_output_sqrt(o) @ fam.fisher_output_sqrt(o).transpose(-1, -2),
            "fisher_output_gram": fam.fisher_output_gram(o, v),
            "third_moment": fam.third_moment(o),
            "fourth_moment": fam.fourth_moment(o),
            "moment3": fam.moment3(o, v, v, v),
            "moment4": fam.moment4(o, v, v),
            "pairwise_moment4": fam.pairwise_moment4(o, v),
            "quadratic_moment": fam.quadratic_moment(o, k),
            "fisher_output_top_eigenvalue": fam.fisher_output_top_eigenvalue(o),
            "fourth_moment_top_eigenvalue": fam.fourth_moment_top_eigenvalue(o),
        }

    low, high = calls(o, y, v, k), calls(o.double(), y.double(), v.double(), k.double())
    rtol = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}[dtype]
    for name, got in low.items():
        assert got.dtype == dtype and bool(torch.isfinite(got).all()), name
        want = high[name]
        assert bool(((got.double() - want).abs() <= rtol * want.abs().max() + 1e-3).all()), name


@pytest.mark.parametrize(
    ("family", "width", "message"),
    [
        ("heteroscedastic_gaussian", 3, r"even number of outputs.*D means, then the D log-variances"),
        ("gamma", 1, r"even number of outputs.*log-means, then the D log-shapes"),
        ("matrix_fisher", 4, r"9 outputs per input.*3×3 matrix A.*row-major"),
    ],
)
def test_output_width_errors(family, width, message):
    with pytest.raises(TorchfimError, match=message):
        get_family(family).check_output(torch.zeros(2, width))


def test_target_errors():
    o = torch.zeros(2, 4, dtype=torch.float64)
    with pytest.raises(TorchfimError, match="non-finite"):
        get_family("heteroscedastic_gaussian").check_targets(torch.tensor([[0.0, float("nan")], [0.0, 1.0]]), o)
    with pytest.raises(TorchfimError, match="strictly positive"):
        get_family("gamma").check_targets(torch.tensor([[1.0, 0.0], [2.0, 1.0]]), o)
    with pytest.raises(TorchfimError, match=r"shape \(2, 2\)"):
        get_family("gamma").check_targets(torch.ones(2, 3), o)
    mf, a = get_family("matrix_fisher"), torch.zeros(2, 9)
    with pytest.raises(TorchfimError, match=r"rotation matrices.*orthonormalise"):
        mf.check_targets(torch.eye(3).expand(2, 3, 3) * 2, a)
    with pytest.raises(TorchfimError, match=r"rotation matrices.*det"):
        mf.check_targets(torch.diag(torch.tensor([1.0, 1.0, -1.0])).expand(2, 3, 3), a)
    with pytest.raises(TorchfimError, match=r"shape \(2, 3, 3\)"):
        mf.check_targets(torch.eye(3).reshape(1, 9).expand(2, 9), a)
