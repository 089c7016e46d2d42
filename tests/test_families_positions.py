"""The Positions product family against brute force over the joint label space of tiny products.

Each position is an independent observation of the base family; the joint support is the product
of the per-position supports of ``oracles.label_support`` (exact for categorical and Bernoulli,
truncated for Poisson, exact Gauss–Hermite for the Gaussian), with a masked position contributing
a single label of probability 1 and score 0. Every method is compared in float64 to 1e-10.
"""

from __future__ import annotations

import doctest
import math

import pytest
import torch
from oracles import label_support, log_likelihood

from torchfim import TorchfimError
from torchfim.families import Bernoulli, Categorical, Gaussian, Poisson, Positions, positions_moments, positions_spectra
from torchfim.families import positions as positions_module
from torchfim.families import positions_spread as positions_spread_module

RTOL = 1e-10

# name → (base, oracle family name, position shape, base width C, mask (B, *pos))
CASES = {
    "categorical": (Categorical(), "categorical", (2,), 3, [[True, True], [True, False], [False, False]]),
    "bernoulli": (
        Bernoulli(), "bernoulli", (1, 3), 1, [[[True, True, True]], [[True, False, True]], [[False, True, False]]]
    ),
    "poisson": (Poisson(), "poisson", (2,), 1, [[True, True], [False, True]]),
    "gaussian": (Gaussian(), "gaussian", (2,), 2, [[True, True], [True, False]]),
}


@pytest.fixture(params=tuple(CASES))
def case(request: pytest.FixtureRequest) -> tuple[Positions, str, torch.Tensor]:
    base, oracle, pos, c, mask = CASES[request.param]
    mask = torch.tensor(mask)
    gen = torch.Generator().manual_seed(len(request.param))
    o = 0.7 * torch.randn(mask.shape[0], math.prod(pos) * c, generator=gen, dtype=torch.float64)
    return Positions(base, pos, mask), oracle, o


def close(got: torch.Tensor, want: torch.Tensor, rtol: float = RTOL) -> bool:
    scale = want.abs().max().clamp_min(1e-300)
    return bool(((got - want).abs() <= rtol * scale).all())


def joint_support(fam: Positions, oracle: str, o: torch.Tensor, i: int) -> tuple[torch.Tensor, ...]:
    """Joint labels (S, L, *bl), probabilities (S,) and scores (S, L·C) of input ``i``."""
    n, c = fam.length, o.shape[1] // fam.length
    keep = fam.mask[i]
    per = []
    for t in range(n):
        o_t = o[i, t * c : (t + 1) * c]
        if keep[t]:
            per.append(label_support(oracle, o_t))
        else:  # one arbitrary label (an out-of-range class for the categorical), probability 1, score 0
            junk = torch.tensor([-100]) if oracle == "categorical" else torch.full((1, c), -7.0, dtype=o.dtype)
            per.append((junk, torch.ones(1, dtype=o.dtype), torch.zeros(1, c, dtype=o.dtype)))
    grids = torch.cartesian_prod(*[torch.arange(len(p)) for _, p, _ in per]).reshape(-1, n)
    labels = torch.stack([per[t][0][grids[:, t]] for t in range(n)], dim=1)
    probs = torch.stack([per[t][1][grids[:, t]] for t in range(n)], dim=1).prod(1)
    scores = torch.cat([per[t][2][grids[:, t]] for t in range(n)], dim=1)
    return labels, probs, scores


def references(fam: Positions, oracle: str, o: torch.Tensor) -> list[dict[str, torch.Tensor]]:
    out = []
    for i in range(o.shape[0]):
        labels, probs, u = joint_support(fam, oracle, o, i)
        vec = torch.einsum("sa,sb->sab", u, u).reshape(len(probs), -1)
        out.append(
            {
                "labels": labels,
                "probs": probs,
                "u": u,
                "m1": probs @ u,
                "lam": torch.einsum("s,sa,sb->ab", probs, u, u),
                "m3": torch.einsum("s,sa,sb,sc->abc", probs, u, u, u),
                "m4": torch.einsum("s,sa,sb,sc,sd->abcd", probs, u, u, u, u),
                "m4_matrix": torch.einsum("s,sx,sy->xy", probs, vec, vec),
            }
        )
    return out


def test_second_and_fourth_moments_match_enumeration(case):
    fam, oracle, o = case
    refs = references(fam, oracle, o)
    gen = torch.Generator().manual_seed(3)
    v = torch.randn(o.shape[0], 3, o.shape[1], generator=gen, dtype=o.dtype)
    w = torch.randn(o.shape[0], 3, o.shape[1], generator=gen, dtype=o.dtype)
    k = torch.randn(o.shape[0], o.shape[1], o.shape[1], generator=gen, dtype=o.dtype)
    k = k + k.transpose(1, 2)
    lam, root, m4 = fam.fisher_output(o), fam.fisher_output_sqrt(o), fam.fourth_moment(o)
    second, fourth = fam.moments_along(o, v)
    moment4, pairwise, spread = fam.moment4(o, v, w), fam.pairwise_moment4(o, v), fam.pairwise_spread(o, v)
    quad, bilinear, gram = fam.quadratic_moment(o, k), fam.fisher_output_bilinear(o, v, w), fam.fisher_output_gram(o, v)
    for i, ref in enumerate(refs):
        assert ref["m1"].abs().max() < 1e-12
        assert close(lam[i], ref["lam"]) and close(root[i] @ root[i].T, ref["lam"])
        assert close(m4[i], ref["m4"])
        proj_v, proj_w = ref["u"] @ v[i].T, ref["u"] @ w[i].T  # (S, m)
        p = ref["probs"].unsqueeze(-1)
        assert close(second[i], (p * proj_v**2).sum(0)) and close(fourth[i], (p * proj_v**4).sum(0))
        assert close(moment4[i], (p * proj_v**2 * proj_w**2).sum(0))
        assert close(pairwise[i], torch.einsum("s,sp,sq->pq", ref["probs"], proj_v**2, proj_v**2))
        mean = torch.einsum("s,sp,sq->pq", ref["probs"], proj_v, proj_v)
        assert close(spread[i], pairwise[i] - mean**2)
        assert close(quad[i], torch.einsum("abcd,ab,cd->", ref["m4"], k[i], k[i]))
        assert close(bilinear[i], (p * proj_v * proj_w).sum(0))
        assert close(gram[i], torch.einsum("s,sp,sq->pq", ref["probs"], proj_v, proj_v))


def test_third_moments_match_enumeration(case):
    fam, oracle, o = case
    gen = torch.Generator().manual_seed(5)
    a, b, c = (torch.randn(o.shape[0], 2, o.shape[1], generator=gen, dtype=o.dtype) for _ in range(3))
    third, along = fam.third_moment(o), fam.moment3(o, a, b, c)
    for i, ref in enumerate(references(fam, oracle, o)):
        assert torch.allclose(third[i], ref["m3"], rtol=RTOL, atol=1e-12)
        want = torch.einsum("abc,ma,mb,mc->m", ref["m3"], a[i], b[i], c[i])
        assert torch.allclose(along[i], want, rtol=RTOL, atol=1e-12)


def test_spectra_match_enumeration_and_the_bound_holds(case, monkeypatch):
    fam, oracle, o = case
    refs = references(fam, oracle, o)
    exact_lam = torch.stack([torch.linalg.eigvalsh(r["lam"])[-1] for r in refs])
    exact_m4 = torch.stack([torch.linalg.eigvalsh(r["m4_matrix"])[-1] for r in refs])
    assert close(fam.fisher_output_top_eigenvalue(o), exact_lam)
    assert close(fam.fourth_moment_top_eigenvalue(o), exact_m4)
    fam.dense_top_width = 0  # the structured upper bound instead of the dense eigen-solve
    bound = fam.fourth_moment_top_eigenvalue(o)
    assert bool((bound >= exact_m4 * (1 - 1e-12) - 1e-15).all())
    single = fam.mask.sum(1) <= 1  # one observed position: the bound is exact
    assert close(bound[single], exact_m4[single])
    assert bool((bound <= 3 * exact_m4 + 1e-15).all())
    monkeypatch.setattr(positions_spectra, "CHUNK_ELEMENTS", 0)  # ‖Λ_t‖_F replaced by √μ_t
    looser = fam.fourth_moment_top_eigenvalue(o)
    assert bool((looser >= bound * (1 - 1e-12)).all()) and close(looser[single], exact_m4[single])
    assert bool((looser > bound * (1 + 1e-6)).any())  # the fallback taken (a patch that missed left it equal)


def test_scores_and_log_prob_match_enumeration_and_autograd(case):
    fam, oracle, o = case
    c = o.shape[1] // fam.length
    for i, ref in enumerate(references(fam, oracle, o)):
        one = Positions(fam.base, fam.positions, fam.mask[i : i + 1])
        oi = o[i : i + 1].clone().requires_grad_(True)
        labels = ref["labels"].unsqueeze(0)  # (1, S, L, *bl): S labels as extra leading dims
        u = one.output_score(labels, oi)
        assert close(u[0], ref["u"])
        log_p = one.log_prob(oi, labels)
        (grad,) = torch.autograd.grad(log_p.sum(), oi)
        assert close(grad[0], ref["u"].sum(0))
        want = torch.zeros(len(ref["probs"]), dtype=o.dtype)
        for t in range(fam.length):
            if fam.mask[i, t]:
                o_t = o[i, t * c : (t + 1) * c]
                want += torch.stack([log_likelihood(oracle, o_t, y[t]) for y in ref["labels"]])
        assert close(log_p[0].detach(), want)
        if oracle != "gaussian":  # quadrature weights are not densities
            assert abs(float(log_p.detach().exp().sum()) - 1) < 1e-10
        assert torch.allclose(one.nll(oi, labels), -log_p.mean())


def test_sampling_matches_moments_and_is_reproducible(case):
    """Sample means of u and uuᵀ agree with 0 and Λ within 5 standard errors."""
    fam, _, o = case
    k = 20000
    y = fam.sample(o, k, torch.Generator().manual_seed(7))
    label = tuple(fam.base._label_shape(o[:, : o.shape[1] // fam.length]))
    assert tuple(y.shape) == (o.shape[0], k, fam.length) + label
    assert torch.equal(y, fam.sample(o, k, torch.Generator().manual_seed(7)))
    u = fam.output_score(y, o)
    outer = torch.einsum("nka,nkb->nkab", u, u)
    for values, target in ((u, torch.zeros_like(o)), (outer, fam.fisher_output(o))):
        mean, se = values.mean(1), values.std(1) / k**0.5
        assert bool(((mean - target).abs() <= 5 * se + 1e-12).all())


JUNK = {"categorical": -100, "bernoulli": 7.0, "poisson": -1.0, "gaussian": math.nan}


def test_targets_are_canonical_and_masked_ones_unchecked(case):
    fam, oracle, o = case
    y = fam.sample(o, 1, torch.Generator().manual_seed(1))[:, 0]  # (B, L, *bl)
    junk = y.clone().to(torch.long if oracle == "categorical" else torch.float64)
    junk[~fam.mask.reshape(len(o), -1)] = JUNK[oracle]
    for shape in (junk.shape, (len(o), *fam.positions) + junk.shape[2:]):
        canonical = fam.check_targets(junk.reshape(shape), o)
        assert canonical.shape == y.shape
        keep = fam.mask.reshape(len(o), -1)
        assert torch.equal(canonical[keep].to(y.dtype), y[keep])
        assert bool(torch.isfinite(fam.log_prob(o, canonical)).all())
        assert torch.equal(fam.output_score(canonical, o), fam.output_score(junk, o))
    if oracle == "bernoulli":
        assert fam.check_targets(junk.squeeze(-1), o).shape == y.shape
    flat = Positions(fam.base, fam.length, fam.mask)  # as the engine builds it: L positions in a row
    assert torch.equal(flat.check_targets(junk.reshape((len(o), *fam.positions) + junk.shape[2:]), o), canonical)
    observed = junk.clone()
    observed[fam.mask.reshape(len(o), -1).nonzero()[0].tolist()] = JUNK[oracle]
    with pytest.raises(TorchfimError):
        fam.check_targets(observed, o)


def test_masked_outputs_may_be_non_finite(case):
    """Padding positions can carry NaN/Inf outputs: the checks skip them and nothing leaks."""
    fam, _, o = case
    dirty = o.clone().reshape(len(o), fam.length, -1)
    dirty[~fam.mask.reshape(len(o), -1)] = math.nan
    dirty = dirty.reshape(len(o), -1)
    fam.check_output(dirty)
    assert torch.equal(fam.fisher_output(dirty), fam.fisher_output(o))
    assert torch.equal(fam.fourth_moment_top_eigenvalue(dirty), fam.fourth_moment_top_eigenvalue(o))
    y = fam.sample(dirty, 3, torch.Generator().manual_seed(2))
    assert bool(torch.isfinite(fam.output_score(y, dirty)).all())
    with pytest.raises(TorchfimError, match="non-finite outputs"):
        fam.check_output(torch.full_like(o, math.nan))


def test_chunked_accumulation_matches(case, monkeypatch):
    fam, _, o = case
    v = torch.randn(o.shape[0], 3, o.shape[1], generator=torch.Generator().manual_seed(9), dtype=o.dtype)
    whole = fam.pairwise_moment4(o, v), fam.fisher_output_gram(o, v), fam.pairwise_spread(o, v)
    monkeypatch.setattr(positions_module, "_CHUNK_ELEMENTS", 1)  # one position per chunk
    monkeypatch.setattr(positions_spread_module, "CHUNK_ELEMENTS", 1)
    chunked = fam.pairwise_moment4(o, v), fam.fisher_output_gram(o, v), fam.pairwise_spread(o, v)
    for a, b in zip(whole, chunked):
        assert close(b, a, rtol=1e-13)


@pytest.mark.parametrize("max_entries", [1, 7, 40, None])
def test_root_blocks_are_the_columns_of_the_block_diagonal_root(case, max_entries):
    """Blocks of one column, of a few columns within a position, of several positions, and whole."""
    fam, _, o = case
    blocks = list(fam.fisher_output_sqrt_blocks(o, max_entries))
    assert torch.equal(torch.cat(blocks, -1), fam.fisher_output_sqrt(o))
    column = o.shape[0] * o.shape[1]
    assert all(b.numel() <= max(max_entries or positions_module.SQRT_BLOCK_ENTRIES, column) for b in blocks)


def test_root_blocks_leave_out_positions_no_input_observes():
    gen = torch.Generator().manual_seed(3)
    o = torch.randn(2, 3 * 4, generator=gen, dtype=torch.float64)
    fam = Positions(Categorical(), 3, torch.tensor([[True, False, True], [False, False, True]]))
    blocks = torch.cat(list(fam.fisher_output_sqrt_blocks(o, 5)), -1)
    assert blocks.shape == (2, 12, 2 * 3)  # positions 0 and 2, each C − 1 = 3 columns
    assert close(blocks @ blocks.transpose(1, 2), fam.fisher_output(o), rtol=1e-13)


def test_root_blocks_of_a_language_model_batch_come_without_the_whole_root():
    """16 sequences of 64 tokens over 500 classes: the whole root would hold 16·32000·31936 numbers (65 GB
    in float32); its first block is built from one position's roots and stays under the block size."""
    o = torch.randn(16, 64 * 500, generator=torch.Generator().manual_seed(5))
    first = next(Positions(Categorical(), 64).fisher_output_sqrt_blocks(o))
    assert first.shape[:2] == (16, 64 * 500) and first.numel() <= positions_module.SQRT_BLOCK_ENTRIES
    roots = Categorical().fisher_output_sqrt(o[:, :500])
    assert torch.equal(first[:, :500], roots[..., : first.shape[-1]]) and not bool(first[:, 500:].any())


def test_errors_name_the_fix(monkeypatch):
    fam = Positions(Categorical(), (2,), torch.tensor([[True, False]]))
    with pytest.raises(TorchfimError, match=r"\(batch, 2·C\)"):
        fam.check_output(torch.zeros(1, 5))
    with pytest.raises(TorchfimError, match="per mini-batch"):
        fam.fisher_output(torch.zeros(3, 6))
    with pytest.raises(TorchfimError, match="at least 2 logits"):
        Positions(Categorical(), 3).check_output(torch.zeros(1, 3))
    with pytest.raises(TorchfimError, match="mask must be a bool tensor"):
        Positions(Categorical(), (2,), torch.ones(1, 3, dtype=torch.bool))
    with pytest.raises(TorchfimError, match="base Family instance"):
        Positions("categorical", (2,))  # type: ignore[arg-type]
    with pytest.raises(TorchfimError, match="must have shape"):
        fam.check_targets(torch.zeros(1, 3, dtype=torch.long), torch.zeros(1, 6))
    monkeypatch.setattr(positions_moments, "DENSE_MOMENT_LIMIT", 10)
    with pytest.raises(TorchfimError, match="structure-aware moment4"):
        fam.fourth_moment(torch.zeros(1, 6))


def test_fourth_top_bound_for_many_positions_without_dense_tensor():
    """L = 64 positions of 10 classes: no (L·C)⁴ tensor; the bound is between the largest
    single-position value (a lower bound on the exact one) and the trivial bound E‖u‖⁴."""
    gen = torch.Generator().manual_seed(4)
    o = 2 * torch.randn(2, 64 * 10, generator=gen, dtype=torch.float64)
    mask = torch.rand(2, 64, generator=gen) < 0.7
    fam = Positions(Categorical(), (8, 8), mask)
    bound = fam.fourth_moment_top_eigenvalue(o)
    rows = o.reshape(-1, 10)
    single = Categorical().fourth_moment_top_eigenvalue(rows).reshape(2, 64).where(mask, 0.0).amax(1)
    eye = torch.eye(640, dtype=o.dtype).expand(2, -1, -1)
    trivial = fam.quadratic_moment(o, eye)
    assert bool((bound >= single).all()) and bool((bound <= trivial).all())


def test_docstring_example_runs():
    assert doctest.testmod(positions_module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0
