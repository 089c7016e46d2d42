"""Cov(Î1, Î2) with shared labels and the combined estimator against brute force (docs/math.md §8).

The oracle flattens each input's outputs to one vector (positions side by side), builds full
``torch.func`` Jacobians and Hessians, and enumerates the joint label space for the second, third
and fourth moments of the output score: nothing of torchfim's engine or families is used (the
extra families, which the enumeration does not cover, take their third moments from the family).
"""

from __future__ import annotations

import doctest

import pytest
import torch
from cases import BY_NAME, Case, token_mask
from oracles import FAMILY_WIDTH, flat_function, label_support
from torch.func import hessian, jacrev

import torchfim
from torchfim import combined as combined_module
from torchfim import covariance as covariance_module
from torchfim.combined import combined_variance, optimal_weight, weighted_variance
from torchfim.covariance import fisher_covariance
from torchfim.families import Family, Gaussian, get_family

N = 4
PAIRS = [("tanh_mlp", f) for f in FAMILY_WIDTH] + [
    ("relu_mlp", "categorical"), ("custom", "poisson"), ("strided_cnn", "bernoulli"), ("tied", "categorical"),
    ("frozen", "gaussian"), ("tokens", "categorical"), ("residual_bn", "bernoulli"),
]
IDS = [f"{c}-{f}" for c, f in PAIRS]


def _derivatives(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flat outputs (n, W), Jacobians (n, W, P) and output Hessians (n, W, P, P) by torch.func."""
    f, theta = flat_function(model)
    with torch.no_grad():
        outs = f(theta, x)
    jac = jacrev(lambda th: f(th, x))(theta)
    hess = torch.stack([hessian(lambda th, i=i: f(th, x[i : i + 1])[0])(theta) for i in range(len(x))])
    return outs, jac, hess


def _moments(family: str, outs: torch.Tensor, c: int, mask: torch.Tensor) -> list[torch.Tensor]:
    """Λ, T and M of the concatenated score per input, by enumerating the joint labels of the positions."""
    lam, third, fourth = [], [], []
    for i in range(outs.shape[0]):
        probs, u = torch.ones(1, dtype=torch.float64), torch.zeros(1, 0, dtype=torch.float64)
        for t in range(outs.shape[1] // c):
            if mask[i, t]:
                p_t, u_t = label_support(family, outs[i, t * c : (t + 1) * c])[1:]
            else:  # a masked position is one label with score 0
                p_t, u_t = torch.ones(1, dtype=torch.float64), torch.zeros(1, c, dtype=torch.float64)
            probs = (probs[:, None] * p_t[None, :]).reshape(-1)
            u = torch.cat([u.repeat_interleave(len(p_t), 0), u_t.repeat(len(u), 1)], 1)
        lam.append(torch.einsum("s,sa,sb->ab", probs, u, u))
        third.append(torch.einsum("s,sa,sb,sc->abc", probs, u, u, u))
        fourth.append(torch.einsum("s,sa,sb,sc,sd->abcd", probs, u, u, u, u))
    return [torch.stack(m) for m in (lam, third, fourth)]


def _closed_forms(jac: torch.Tensor, hess: torch.Tensor, lam: torch.Tensor, third: torch.Tensor,
                  fourth: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """V1, V2, C12 (dense P×P) and their trace versions for one label per input (docs/math.md §3, §8.2)."""
    scale = 1.0 / len(jac) ** 2
    per_input = torch.einsum("nap,nab,nbq->npq", jac, lam, jac)
    gram = torch.einsum("nap,nbp->nab", jac, jac)
    traces = torch.einsum("napp->na", hess)
    res = {
        "exact": per_input.mean(0),
        "v2": scale * torch.einsum("napq,nab,nbpq->pq", hess, lam, hess),
        "c12": -scale * torch.einsum("nabc,nap,nbq,ncpq->pq", third, jac, jac, hess),
        "v2_trace": scale * torch.einsum("na,nab,nb->", traces, lam, traces),
        "c12_trace": -scale * torch.einsum("nabc,nab,nc->", third, gram, traces),
    }
    if fourth is not None:
        second = torch.einsum("nabcd,nap,nbp,ncq,ndq->pq", fourth, jac, jac, jac, jac)
        res["v1"] = scale * (second - (per_input**2).sum(0))
        res["v1_trace"] = scale * (torch.einsum("nabcd,nab,ncd->", fourth, gram, gram)
                                   - (torch.einsum("npp->n", per_input) ** 2).sum())
    return res


def _best(v1: torch.Tensor, v2: torch.Tensor, c12: torch.Tensor) -> torch.Tensor:
    """``min_w Var(wÎ1 + (1−w)Î2) = (V1V2 − C12²)/D``; ``min(V1, V2)`` where ``D`` vanishes."""
    d = v1 + v2 - 2 * c12
    small = d <= 1e-9 * (v1.abs() + v2.abs() + 1e-300)
    return torch.where(small, torch.minimum(v1, v2), (v1 * v2 - c12**2) / torch.where(small, 1.0, d))


_CACHE: dict[tuple[str, str], dict] = {}


def _oracle(case_name: str, family: str) -> dict:
    if (case_name, family) not in _CACHE:
        case: Case = BY_NAME[case_name]
        c = 4 if case_name == "tied" else FAMILY_WIDTH[family]
        model, x = case.build(c), case.inputs(N)
        outs, jac, hess = _derivatives(model, x)
        positions = outs.shape[1] // c
        mask = token_mask(x) if case.positions else torch.ones(N, positions, dtype=torch.bool)
        res = _closed_forms(jac, hess, *_moments(family, outs, c, mask))
        res.update(model=model, x=x, kwargs={"mask": mask} if case.positions else {})
        res["best"], res["best_trace"] = _best(res["v1"], res["v2"], res["c12"]), _best(
            res["v1_trace"], res["v2_trace"], res["c12_trace"])
        _CACHE[(case_name, family)] = res
    return _CACHE[(case_name, family)]


def _view(full: torch.Tensor, structure: str, model: torch.nn.Module):
    if structure == "full":
        return full
    if structure == "diag":
        return torch.diagonal(full)
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = full[start : start + p.numel(), start : start + p.numel()]
            start += p.numel()
    return out


def _want(res: dict, key: str, structure: str):
    return res[f"{key}_trace"] if structure == "trace" else _view(res[key], structure, res["model"])


def _flat(value) -> torch.Tensor:
    return torch.cat([v.reshape(-1) for v in value.values()]) if isinstance(value, dict) else value.reshape(-1)


def _close(got, want, tol: float, scale: float | None = None) -> float:
    got, want = _flat(got), _flat(want)
    assert got.shape == want.shape
    err = float((got - want).abs().max())
    assert err <= tol * (scale if scale is not None else max(1.0, float(want.abs().max()))), err
    return err


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("case_name,family", PAIRS, ids=IDS)
def test_covariance_matches_oracle(case_name: str, family: str, backend: str) -> None:
    res = _oracle(case_name, family)
    for structure in ("diag", "trace", "blocks", "full"):
        got = fisher_covariance(res["model"], res["x"], family=family, structure=structure, n_samples=3,
                                backend=backend, **res["kwargs"])
        want = _want(res, "c12", structure)
        _close(got, want / 3 if not isinstance(want, dict) else {k: v / 3 for k, v in want.items()}, 1e-8)
    if family == "gaussian":  # no third moments: the covariance vanishes identically
        assert float(_flat(res["c12"]).abs().max()) < 1e-15


@pytest.mark.parametrize("case_name,family", PAIRS, ids=IDS)
def test_combined_variance_matches_oracle_and_beats_both(case_name: str, family: str) -> None:
    res = _oracle(case_name, family)
    for structure in ("diag", "trace", "blocks"):
        got = combined_variance(res["model"], res["x"], family=family, structure=structure, **res["kwargs"])
        v1, v2 = _flat(_want(res, "v1", structure)), _flat(_want(res, "v2", structure))
        scale = max(1e-300, float(torch.maximum(v1.abs(), v2.abs()).max()))
        _close(got, _want(res, "best", structure), 1e-8, scale)
        assert bool((_flat(got) <= torch.minimum(v1, v2) + 1e-10 * scale).all())
        assert bool((_flat(got) >= 0).all())


@pytest.mark.parametrize("case_name,family", PAIRS[:5] + PAIRS[-2:], ids=IDS[:5] + IDS[-2:])
def test_combined_estimate_is_the_weighted_pair_from_the_same_labels(case_name: str, family: str) -> None:
    """With one generator seed, score and hessian draw the labels combined draws: the estimate must be
    ``w·Î1 + (1 − w)·Î2`` of those, with ``w`` from the oracle's V1, V2, C12."""
    res, k = _oracle(case_name, family), 3
    for structure in ("diag", "trace", "full"):
        def run(estimator: str, *, structure: str = structure, **extra):
            return torchfim.fisher(res["model"], res["x"], family=family, estimator=estimator, structure=structure,
                                   n_samples=k, generator=torch.Generator().manual_seed(11), **res["kwargs"], **extra)

        est, stderr = run("combined", return_stderr=True)
        v1, v2, c12 = (_flat(_want(res, key, structure)) for key in ("v1", "v2", "c12"))
        w = optimal_weight(v1, v2, c12)
        _close(est, w * _flat(run("score")) + (1 - w) * _flat(run("hessian")), 1e-8)
        _close(stderr**2, _flat(_want(res, "best", structure)) / k, 1e-8,
               max(1e-300, float(torch.maximum(v1, v2).max()) / k))


@pytest.mark.parametrize("case_name,family", [p for p in PAIRS if p[0] in ("tanh_mlp", "tokens", "custom")])
def test_combined_estimator_unbiased(case_name: str, family: str) -> None:
    """Every diagonal entry and the trace within 4 closed-form standard errors of the exact value."""
    res, k = _oracle(case_name, family), 400
    for structure in ("diag", "trace"):
        est = torchfim.fisher(res["model"], res["x"], family=family, estimator="combined", structure=structure,
                              n_samples=k, generator=torch.Generator().manual_seed(3), **res["kwargs"])
        exact = res["exact"].trace() if structure == "trace" else torch.diagonal(res["exact"])
        se = (_want(res, "best", structure) / k).sqrt()
        slack = 4 * se + 1e-10 * max(1.0, float(exact.abs().max()))
        assert bool(((est - exact).abs() <= slack).all()), float(((est - exact).abs() / se).max())


def test_optimal_weight_cases() -> None:
    """``w*`` and ``V(w*)`` on hand-made triples: the formula, the D = 0 case and unresolvable D."""
    v1 = torch.tensor([2.0, 1.0, 1.0, 0.0, 1 - 1e-12, 1.0, 4.0], dtype=torch.float64)
    v2 = torch.tensor([1.0, 2.0, 1.0, 0.0, 1 + 1e-12, 0.0, 1.0], dtype=torch.float64)
    c12 = torch.tensor([0.5, 1.0, 1.0, 0.0, 1.0, 0.0, 1.5], dtype=torch.float64)
    w = optimal_weight(v1, v2, c12)
    # (2,1,.5): w = .5/2; (1,2,1): w = 1 → Î1; D = 0: Î2; D at round-off: the smaller endpoint (Î1);
    # V2 = C12 = 0: Î2 (exact); (4,1,1.5): D = 2, w = −1/4 (outside [0, 1]: extrapolation is best).
    assert w.tolist() == [0.25, 1.0, 0.0, 0.0, 1.0, 0.0, -0.25]
    v = weighted_variance(w, v1, v2, c12)
    assert torch.allclose(v, torch.tensor([0.875, 1.0, 1.0, 0.0, 1 - 1e-12, 0.0, 0.875], dtype=torch.float64))
    # Random Cauchy–Schwarz-valid triples: V(w*) = (V1V2 − C12²)/D ≤ min(V1, V2).
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 1000, 3, generator=g, dtype=torch.float64)
    v1, v2, c12 = (a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)
    v = weighted_variance(optimal_weight(v1, v2, c12), v1, v2, c12)
    assert torch.allclose(v, (v1 * v2 - c12**2) / (v1 + v2 - 2 * c12), rtol=1e-12, atol=0)
    assert bool((v <= torch.minimum(v1, v2) * (1 + 1e-12)).all())


def test_degenerate_entries_take_the_hessian_estimator() -> None:
    """A logistic model at p = 1/2 everywhere: V1 = V2 = C12 = 0 (D = 0), so w = 0 and the combined
    estimate is Î2, which equals the exact Fisher with zero standard error."""
    model = torch.nn.Linear(3, 1).double()
    torch.nn.init.zeros_(model.weight), torch.nn.init.zeros_(model.bias)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    est, se = torchfim.fisher(model, x, family="bernoulli", estimator="combined", structure="full", n_samples=2,
                              generator=torch.Generator().manual_seed(1), return_stderr=True)
    exact = torchfim.fisher(model, x, family="bernoulli", structure="full")
    assert torch.allclose(est, exact, rtol=0, atol=1e-15) and float(se.abs().max()) == 0.0


@pytest.mark.parametrize("family", ["heteroscedastic_gaussian", "gamma"])
def test_covariance_other_families(family: str) -> None:
    """Families beyond the classic four: the engine's contraction against the family's dense third moment."""
    model, x = BY_NAME["tanh_mlp"].build(2), BY_NAME["tanh_mlp"].inputs(N)
    outs, jac, hess = _derivatives(model, x)
    fam = get_family(family)
    third = fam.third_moment(outs).to(torch.float64)
    want = {**_closed_forms(jac, hess, fam.fisher_output(outs), third, None), "model": model}
    for structure in ("diag", "trace", "full"):
        _close(fisher_covariance(model, x, family=family, structure=structure), _want(want, "c12", structure), 1e-8)
    v1 = torchfim.fisher_variance(model, x, family=family, estimator="score", structure="diag")
    v2 = torchfim.fisher_variance(model, x, family=family, estimator="hessian", structure="diag")
    got = combined_variance(model, x, family=family, structure="diag")
    assert bool((got <= torch.minimum(v1, v2) + 1e-12 * float(v1.abs().max())).all())
    assert float((torch.minimum(v1, v2) - got).max()) > 0  # the combination gains somewhere


class _NoThirdMoment(Gaussian):
    """A family that does not provide third moments."""

    third_moment = Family.third_moment
    moment3 = Family.moment3


def test_family_without_third_moments_is_a_clear_error() -> None:
    model, x = BY_NAME["tanh_mlp"].build(2), BY_NAME["tanh_mlp"].inputs(N)
    with pytest.raises(torchfim.TorchfimError, match="does not provide third moments"):
        torchfim.fisher(model, x, family=_NoThirdMoment(), estimator="combined")
    with pytest.raises(torchfim.TorchfimError, match="unknown estimator 'combine'.*'combined'"):
        torchfim.fisher(model, x, estimator="combine")


def test_docstring_examples() -> None:
    for module in (combined_module, covariance_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_combined_and_covariance_ignore_the_callers_autocast() -> None:
    """Like every engine computation they run with autocast off (a bfloat16 autocast would change them)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(8, 3)
    want = (torchfim.fisher_covariance(model, x), torchfim.combined_variance(model, x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = (torchfim.fisher_covariance(model, x), torchfim.combined_variance(model, x))
    for a, b in zip(got, want):
        assert a.dtype == torch.float32
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-9)


def test_empty_inputs_are_refused_by_every_pass() -> None:
    """The combined pass goes through the same engine pass as the others, so it refuses no inputs too."""
    model = torch.nn.Linear(3, 2)
    empty = torch.zeros(0, 3)
    for call in (lambda: torchfim.fisher(model, empty, estimator="combined"),
                 lambda: torchfim.combined_variance(model, empty),
                 lambda: torchfim.fisher_covariance(model, empty)):
        with pytest.raises(torchfim.TorchfimError, match="inputs is empty"):
            call()


def test_optimal_weight_takes_ints_and_integer_tensors_as_numbers() -> None:
    """Python ints and floats, integer tensors and a mix give the formula in float64 (and the default dtype where no
    input is a floating tensor); a complex or bool input is refused by name (before: AttributeError 'int' object has
    no attribute 'dtype', and finfo's TypeError for integer tensors)."""
    def formula(v1, v2, c12):  # the module docstring's w* and V(w*) in float64, D > 0 here
        v1, v2, c12 = (torch.as_tensor(v, dtype=torch.float64) for v in (v1, v2, c12))
        w = (v2 - c12) / (v1 + v2 - 2 * c12)
        return w, w**2 * v1 + (1 - w) ** 2 * v2 + 2 * w * (1 - w) * c12

    triples = [(2, 1, 0), (2.0, 1.0, 0.5), (torch.tensor([2, 4]), torch.tensor([1, 1]), torch.tensor([0, 1])),
               (torch.tensor([2.0, 4.0], dtype=torch.float64), 1, torch.tensor([0, 1]))]
    for v1, v2, c12 in triples:
        w = optimal_weight(v1, v2, c12)
        want_w, want_v = formula(v1, v2, c12)
        floating = [v.dtype for v in (v1, v2, c12) if isinstance(v, torch.Tensor) and v.is_floating_point()]
        assert w.dtype == (floating[0] if floating else torch.get_default_dtype())
        rtol = 1e-15 if w.dtype == torch.float64 else 1e-7
        assert torch.allclose(w.double(), want_w, rtol=rtol, atol=0)
        assert torch.allclose(weighted_variance(w, v1, v2, c12).double(), want_v, rtol=10 * rtol, atol=0)
    with pytest.raises(torchfim.TorchfimError, match=r"optimal_weight: v2 must be a real tensor or a real number"):
        optimal_weight(1.0, 1j, 0.0)
    with pytest.raises(torchfim.TorchfimError, match=r"weighted_variance: w must be a real"):
        weighted_variance(torch.tensor([True]), 1.0, 2.0, 0.0)
