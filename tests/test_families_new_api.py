"""The new families end to end through the public API, against brute force in float64.

Brute force: full ``torch.func`` Jacobians and output Hessians of a tiny tanh MLP (``oracles.Flat``)
with ``Λ`` and ``E[u⊗u⊗u⊗u]`` from the quadrature oracles of ``oracles_new``.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from oracles import Flat, blocks
from oracles_new import NEW_FAMILIES, NEW_WIDTH, label_moments, log_likelihood
from torch.func import grad, hessian, jacrev, vmap

import torchfim
from torchfim import TorchfimError
from torchfim.families import Gaussian, get_family

N_INPUTS = 3


def model_for(family: str) -> torch.nn.Module:
    model = tanh_mlp(NEW_WIDTH[family], seed=2)
    if family == "matrix_fisher":
        with torch.no_grad():  # singular values of order 1–3 rather than a nearly uniform law
            model[-1].weight.mul_(4.0)
            model[-1].bias.copy_(2.0 * torch.eye(3, dtype=torch.float64).reshape(9))
    return model


_ORACLE: dict[str, dict[str, torch.Tensor]] = {}


def oracle(family: str) -> dict[str, torch.Tensor]:
    """Jacobians, output Hessians, outputs, Λ and fourth moments for the family's model (cached)."""
    if family not in _ORACLE:
        model, x = model_for(family), mlp_inputs(N_INPUTS)
        flat = Flat(model)
        outs = flat.outputs(x)
        moments = [label_moments(family, o, hessians=False) for o in outs]
        _ORACLE[family] = {
            "jac": flat.jacobians(x),
            "hess": flat.output_hessians(x),
            "outputs": outs,
            "lam": torch.stack([m["m2"] for m in moments]),
            "m4": torch.stack([m["m4"] for m in moments]),
        }
    return _ORACLE[family]


def brute_variances(family: str, k: int) -> dict[str, torch.Tensor]:
    """``Var`` of Î1 and Î2 entries and traces (DESIGN §4) with ``k`` labels per input."""
    ref = oracle(family)
    jac, hess, lam, m4 = ref["jac"], ref["hess"], ref["lam"], ref["m4"]
    per_input = torch.einsum("ncp,ncd,ndq->npq", jac, lam, jac)
    gram = torch.einsum("nap,nbp->nab", jac, jac)
    traces = torch.einsum("naii->na", hess)
    scale = 1.0 / (N_INPUTS**2 * k)
    return {
        "score": scale * (torch.einsum("nabcd,nap,nbp,ncq,ndq->pq", m4, jac, jac, jac, jac) - (per_input**2).sum(0)),
        "hessian": scale * torch.einsum("napq,nab,nbpq->pq", hess, lam, hess),
        "score_trace": scale
        * (torch.einsum("nabcd,nab,ncd->", m4, gram, gram) - (torch.einsum("npp->n", per_input) ** 2).sum()),
        "hessian_trace": scale * torch.einsum("na,nab,nb->", traces, lam, traces),
        "fisher": per_input.mean(0),
    }


@pytest.fixture(params=NEW_FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


def test_exact_fisher_matches_brute_force(family):
    ref = oracle(family)
    want = torch.einsum("ncp,ncd,ndq->pq", ref["jac"], ref["lam"], ref["jac"]) / N_INPUTS
    model, x = model_for(family), mlp_inputs(N_INPUTS)
    full = torchfim.fisher(model, x, family=family, structure="full")
    # The oracle's Λ is a quadrature (the gamma one good to ~1e-10 relative), hence the tolerance.
    atol = 1e-10 * float(want.abs().max())
    assert torch.allclose(full, want, rtol=1e-8, atol=atol)
    for backend in ("auto", "functional"):
        diag = torchfim.fisher(model, x, family=family, structure="diag", backend=backend)
        assert torch.allclose(diag, torch.diagonal(want), rtol=1e-8, atol=atol)
    trace = torchfim.fisher(model, x, family=family, structure="trace")
    assert math.isclose(float(trace), float(torch.trace(want)), rel_tol=1e-8)
    got_blocks = torchfim.fisher(model, x, family=family, structure="blocks")
    for name, block in blocks(want, model).items():
        assert torch.allclose(got_blocks[name], block, rtol=1e-8, atol=atol)


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_sampled_estimators_are_unbiased(family, estimator):
    """Diagonal and trace within 4 standard errors (from the brute-force variances) of the exact Fisher."""
    k = 400
    model, x = model_for(family), mlp_inputs(N_INPUTS)
    ref = brute_variances(family, k)
    diag = torchfim.fisher(model, x, family=family, estimator=estimator, structure="diag", n_samples=k,
                           generator=torch.Generator().manual_seed(21))
    se = torch.diagonal(ref[estimator]).clamp_min(0).sqrt()
    exact = torch.diagonal(ref["fisher"])  # a quadrature: exact to ~1e-10 relative
    assert bool(((diag - exact).abs() <= 4 * se + 1e-9 * exact.abs()).all())
    trace = torchfim.fisher(model, x, family=family, estimator=estimator, structure="trace", n_samples=k,
                            generator=torch.Generator().manual_seed(22))
    gap = abs(float(trace) - float(torch.trace(ref["fisher"])))
    assert gap <= 4 * math.sqrt(float(ref[f"{estimator}_trace"])) + 1e-9 * float(torch.trace(ref["fisher"]))


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_fisher_variance_matches_brute_force(family, estimator):
    """For every family, canonical or not: the ``hessian`` estimator uses Λ as output curvature."""
    model, x, k = model_for(family), mlp_inputs(N_INPUTS), 3
    ref = brute_variances(family, k)
    full = torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure="full", n_samples=k)
    scale = float(ref[estimator].abs().max())
    assert torch.allclose(full, ref[estimator], rtol=1e-7, atol=1e-9 * scale)
    diag = torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure="diag", n_samples=k)
    assert torch.allclose(diag, torch.diagonal(ref[estimator]), rtol=1e-7, atol=1e-9 * scale)
    trace = torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure="trace", n_samples=k)
    assert math.isclose(float(trace), float(ref[f"{estimator}_trace"]), rel_tol=1e-7)


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_bounds_and_samples_needed(family, estimator):
    model, x = model_for(family), mlp_inputs(N_INPUTS)
    ref = brute_variances(family, 1)
    for structure in ("diag", "trace"):
        bound = torchfim.variance_bound(model, x, family=family, estimator=estimator, structure=structure)
        exact = torch.diagonal(ref[estimator]) if structure == "diag" else ref[f"{estimator}_trace"]
        assert bool((bound >= exact * (1 - 1e-9) - 1e-14).all())
    k = torchfim.samples_needed(model, x, family=family, estimator=estimator, structure="trace", rel_error=0.05)
    want = math.ceil(float(ref[f"{estimator}_trace"]) / (0.05 * float(torch.trace(ref["fisher"]))) ** 2 * (1 - 1e-12))
    assert k == max(1, want)


def test_empirical_fisher_with_targets(family):
    """Targets through check_targets; the result is the mean of outer products of hand-written scores."""
    model, x = model_for(family), mlp_inputs(N_INPUTS)
    flat = Flat(model)
    y = get_family(family).sample(flat.outputs(x), 1, torch.Generator().manual_seed(5))[:, 0]

    def log_p(theta: torch.Tensor, i: int) -> torch.Tensor:
        return log_likelihood(family, flat(theta, x[i : i + 1])[0], y[i])

    scores = torch.stack([jacrev(log_p)(flat.theta, i) for i in range(N_INPUTS)])
    got = torchfim.fisher(model, x, family=family, estimator="empirical", structure="full", targets=y)
    assert torch.allclose(got, scores.T @ scores / N_INPUTS, rtol=1e-9, atol=1e-13)


def test_positions_sum_over_positions():
    """A (B, 2, 2D) heteroscedastic output: two independent observations per input, Fisher summed over them."""
    torch.manual_seed(3)
    layers = (torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 8), torch.nn.Unflatten(1, (2, 4)))
    model = torch.nn.Sequential(*layers).double()
    x = mlp_inputs(N_INPUTS)
    flat = Flat(model)
    jac, outs = flat.jacobians(x), flat.outputs(x)  # (n, 2, 4, P), (n, 2, 4)
    lam = torch.diag_embed(torch.cat([torch.exp(-outs[..., 2:]), torch.full_like(outs[..., 2:], 0.5)], -1))
    want = torch.einsum("ntcp,ntcd,ntdq->pq", jac, lam, jac) / N_INPUTS
    got = torchfim.fisher(model, x, family="heteroscedastic_gaussian", structure="full")
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("family", ["heteroscedastic_gaussian", "gamma"])
def test_negative_hessian_estimator_of_non_canonical_families(family):
    """The literal negative Hessian ``−∇²_θ log p(y|x)`` (label-dependent output curvature) is also
    unbiased, with per-label variance ``h̃ᵀΛh̃``, ``h̃_a = ∇²_θ o_a − JᵀΓ_aJ`` (``Γ`` from score_curvature).

    Checked on the diagonal entries of one input by Monte Carlo: mean within 4.5 SE of ``JᵀΛJ`` and
    sample variance within 4.5 SE of the formula; the chain-rule form against ``torch.func.hessian``.
    """
    fam, model, x = get_family(family), model_for(family), mlp_inputs(1)
    flat = Flat(model)
    o = flat.outputs(x)
    jac, hess = flat.jacobians(x)[0], flat.output_hessians(x)[0]  # (C, P), (C, P, P)
    k = 20000
    y = fam.sample(o, k, torch.Generator().manual_seed(8))[0]  # (k, D)
    u = vmap(grad(lambda out, yy: log_likelihood(family, out, yy)), in_dims=(None, 0))(o[0], y)
    h_out = -vmap(hessian(lambda out, yy: log_likelihood(family, out, yy)), in_dims=(None, 0))(o[0], y)
    diag = torch.einsum("cp,kcd,dp->kp", jac, h_out, jac) - torch.einsum("ka,app->kp", u, hess)
    literal = -hessian(lambda th: log_likelihood(family, flat(th, x)[0], y[0]))(flat.theta)
    assert torch.allclose(diag[0], torch.diagonal(literal), rtol=1e-9, atol=1e-12)
    lam, gamma = fam.fisher_output(o)[0], fam.score_curvature(o)[0]
    tilde = torch.diagonal(hess, dim1=-2, dim2=-1) - torch.einsum("cp,acd,dp->ap", jac, gamma, jac)  # (C, P)
    mean, centred = diag.mean(0), (diag - diag.mean(0)) ** 2
    gap = (mean - torch.einsum("cp,cd,dp->p", jac, lam, jac)).abs()
    assert bool((gap <= 4.5 * diag.std(0) / k**0.5 + 1e-12).all())
    formula = torch.einsum("ap,ab,bp->p", tilde, lam, tilde)
    assert bool(((centred.mean(0) - formula).abs() <= 4.5 * centred.std(0) / k**0.5 + 1e-12).all())


@pytest.mark.parametrize("kind", ["trace", "batch_gradient"])
def test_fisher_penalty_value_and_gradient(family, kind):
    """FisherPenalty (log_prob under torch.func and double backward) against the hand-written likelihood."""
    model, x = model_for(family), mlp_inputs(N_INPUTS)
    generator = torch.Generator().manual_seed(0)
    pen = torchfim.train.FisherPenalty(model, family=family, alpha=1.0, kind=kind, generator=generator)
    value = pen(x, step=0)
    grads = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, list(model.parameters()))])
    flat = Flat(model)
    y = get_family(family).sample(flat.outputs(x), 1, torch.Generator().manual_seed(0))[:, 0]

    def log_p(theta: torch.Tensor, i: int) -> torch.Tensor:
        return log_likelihood(family, flat(theta, x[i : i + 1])[0], y[i])

    def penalty(theta: torch.Tensor) -> torch.Tensor:
        if kind == "trace":
            return sum((grad(log_p)(theta, i) ** 2).sum() for i in range(N_INPUTS)) / N_INPUTS
        return (grad(lambda th: -sum(log_p(th, i) for i in range(N_INPUTS)) / N_INPUTS)(theta) ** 2).sum()

    theta = flat.theta.clone().requires_grad_(True)
    want = penalty(theta)
    want_grad = torch.autograd.grad(want, theta)[0]
    assert math.isclose(float(value.detach()), float(want.detach()), rel_tol=1e-10)
    assert torch.allclose(grads, want_grad, rtol=1e-8, atol=1e-12 * float(want_grad.abs().max()))


@pytest.mark.parametrize(("given", "family"), [
    (torch.nn.CrossEntropyLoss(), "categorical"), (torch.nn.functional.cross_entropy, "categorical"),
    ("classif_logits", "categorical"), ("classification", "categorical"), (torch.nn.BCEWithLogitsLoss, "bernoulli"),
    ("classif_binary_logits", "bernoulli"), (torch.nn.MSELoss(), "gaussian"), ("regression", "gaussian"),
    (torch.nn.PoissonNLLLoss(), "poisson"), (torch.nn.GaussianNLLLoss(), "heteroscedastic_gaussian"),
])
def test_a_loss_or_another_librarys_name_is_refused_with_its_family(given, family) -> None:
    """A loss (module, class or function) or BackPACK/laplace-torch/nngeometry's name for the output distribution
    is refused with the family it stands for (the message listed the names only)."""
    with pytest.raises(TorchfimError, match=rf"pass family='{family}' \(torchfim takes the distribution of the outputs"):
        get_family(given)


def test_a_family_class_is_refused_with_how_to_instantiate_it() -> None:
    with pytest.raises(TorchfimError, match=r"Gaussian is the class, pass an instance, e\.g\. Gaussian\(\)"):
        get_family(Gaussian)
