"""Brute-force float64 oracles written independently of torchfim's internals.

Everything here is built from full ``torch.func`` Jacobians and Hessians of the
flattened parameter vector and from log-likelihoods written out by hand, so a
test that compares torchfim against these functions checks it against the
definitions, not against itself.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian, jacrev

FAMILY_WIDTH = {"categorical": 3, "bernoulli": 1, "gaussian": 2, "poisson": 2}


def log_likelihood(family: str, o: Tensor, y: Tensor) -> Tensor:
    """``log p(y | o)`` for one output vector ``o`` (C,) and one label, written by hand."""
    if family == "categorical":
        return o[y] - torch.logsumexp(o, 0)
    if family == "bernoulli":
        return (y * o - torch.log1p(torch.exp(o))).sum()
    if family == "gaussian":
        return -0.5 * ((y - o) ** 2).sum() - 0.5 * o.numel() * math.log(2 * math.pi)
    if family == "poisson":
        return (y * o - torch.exp(o) - torch.lgamma(y + 1)).sum()
    raise KeyError(family)


def any_label(family: str, width: int) -> Tensor:
    """A valid label, used where the result must not depend on the label."""
    if family == "categorical":
        return torch.tensor(0)
    return torch.ones(width, dtype=torch.float64)


def output_fisher(family: str, o: Tensor) -> Tensor:
    """``Λ(o) = −∇²_o log p(y|o)`` by autodiff (independent of y for these families)."""
    y = any_label(family, o.numel())
    return -hessian(lambda out: log_likelihood(family, out, y))(o)


class Flat:
    """``model`` as a function of one flat parameter vector (all parameters trainable)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.buffers = dict(model.named_buffers())
        self.theta = torch.cat([p.detach().reshape(-1) for _, p in self.named])

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        params, start = {}, 0
        for name, p in self.named:
            params[name] = theta[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return functional_call(self.model, {**self.buffers, **params}, (x,))

    def jacobians(self, x: Tensor) -> Tensor:
        """Per-sample Jacobians ``(n, C, P)``."""
        return jacrev(lambda th: self(th, x))(self.theta)

    def output_hessians(self, x: Tensor) -> Tensor:
        """Per-sample output Hessians ``∇²_θ o_a(xᵢ)``, shape ``(n, C, P, P)``."""
        return torch.stack([hessian(lambda th, i=i: self(th, x[i : i + 1])[0])(self.theta) for i in range(len(x))])

    def outputs(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self(self.theta, x)


def exact_fisher(model: nn.Module, x: Tensor, family: str) -> Tensor:
    """``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from full Jacobians, dense ``(P, P)``."""
    flat = Flat(model)
    jac = flat.jacobians(x)
    lam = torch.stack([output_fisher(family, o) for o in flat.outputs(x)])
    return torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) / len(x)


def empirical_fisher(model: nn.Module, x: Tensor, y: Tensor, family: str) -> Tensor:
    """Mean of outer products of true-label parameter scores, dense ``(P, P)``."""
    flat = Flat(model)
    scores = torch.stack(
        [
            jacrev(lambda th, i=i: log_likelihood(family, flat(th, x[i : i + 1])[0], y[i]))(flat.theta)
            for i in range(len(x))
        ]
    )
    return scores.T @ scores / len(x)


def blocks(full: Tensor, model: nn.Module) -> dict[str, Tensor]:
    """Per-parameter diagonal blocks of a dense ``(P, P)`` matrix."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            out[name] = full[start : start + p.numel(), start : start + p.numel()]
            start += p.numel()
    return out


def true_targets(family: str, o: Tensor, generator: torch.Generator) -> Tensor:
    """Arbitrary valid targets (not drawn from the model) for the empirical Fisher."""
    n, width = o.shape
    if family == "categorical":
        return torch.randint(0, width, (n,), generator=generator)
    if family == "bernoulli":
        return torch.randint(0, 2, (n, 1), generator=generator).double()
    if family == "gaussian":
        return torch.randn(n, width, generator=generator, dtype=torch.float64)
    return torch.randint(0, 5, (n, width), generator=generator).double()


def label_support(family: str, o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Labels, their probabilities and hand-written output scores ``u`` for one output ``o`` (C,).

    Exact enumeration for the discrete families (Poisson truncated at 80 counts: refused where the
    mass beyond is above 1e-13, rates above about 35), and an 8-point Gauss–Hermite product rule,
    exact for polynomials of degree ≤ 15, for the Gaussian.
    """
    import numpy as np

    c = o.shape[0]
    if family == "categorical":
        labels = torch.arange(c)
        probs = torch.softmax(o, 0)
        return labels, probs, torch.eye(c, dtype=o.dtype) - probs
    if family == "bernoulli":
        p = torch.sigmoid(o)
        labels = torch.tensor([[0.0], [1.0]], dtype=o.dtype)
        return labels, torch.cat([1 - p, p]), labels - p
    if family == "poisson":
        counts = torch.arange(80, dtype=o.dtype)
        beyond = 1 - torch.exp(counts[:, None] * o - torch.exp(o) - torch.lgamma(counts[:, None] + 1)).sum(0)
        assert float(beyond.max()) < 1e-13, f"Poisson rates {torch.exp(o).tolist()} too large for the 80-count oracle"
        labels = torch.cartesian_prod(*[counts] * c).reshape(-1, c)
        logp = (labels * o - torch.exp(o) - torch.lgamma(labels + 1)).sum(1)
        return labels, torch.exp(logp), labels - torch.exp(o)
    nodes, weights = np.polynomial.hermite_e.hermegauss(8)
    nodes, weights = torch.tensor(nodes, dtype=o.dtype), torch.tensor(weights / weights.sum(), dtype=o.dtype)
    noise = torch.cartesian_prod(*[nodes] * c).reshape(-1, c)
    probs = torch.cartesian_prod(*[weights] * c).reshape(-1, c).prod(1)
    return o + noise, probs, noise


def fourth_moments(family: str, o: Tensor) -> Tensor:
    """``E[u_a u_b u_c u_d]`` (C, C, C, C) by enumeration or quadrature."""
    _, probs, u = label_support(family, o)
    return torch.einsum("s,sa,sb,sc,sd->abcd", probs, u, u, u, u)


def variance_oracle(model: nn.Module, x: Tensor, family: str, k: int) -> dict[str, Tensor]:
    """Dense variances of Î1 and Î2 entries and of their traces from full derivatives."""
    flat = Flat(model)
    jac, hess = flat.jacobians(x), flat.output_hessians(x)
    outs = flat.outputs(x)
    lam = torch.stack([output_fisher(family, o) for o in outs])
    m4 = torch.stack([fourth_moments(family, o) for o in outs])
    per_input = torch.einsum("ncp,ncd,ndq->npq", jac, lam, jac)
    second = torch.einsum("nabcd,nap,nbp,ncq,ndq->pq", m4, jac, jac, jac, jac)
    gram = torch.einsum("nap,nbp->nab", jac, jac)
    scale = 1.0 / (len(x) ** 2 * k)
    traces = torch.einsum("naii->na", hess)
    return {
        "score": scale * (second - (per_input**2).sum(0)),
        "hessian": scale * torch.einsum("napq,nab,nbpq->pq", hess, lam, hess),
        "score_trace": scale
        * (torch.einsum("nabcd,nab,ncd->", m4, gram, gram) - (torch.einsum("npp->n", per_input) ** 2).sum()),
        "hessian_trace": scale * torch.einsum("na,nab,nb->", traces, lam, traces),
        "jacobians": jac,
        "hessians": hess,
        "lam": lam,
        "m4": m4,
        "per_input": per_input,
    }


def flat_function(model: nn.Module):
    """``(f, θ)``: ``f(θ, x)`` is the model's output flattened per input (positions side by side) as a
    function of its trainable parameters θ (frozen parameters and buffers held fixed)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    fixed = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    fixed.update(dict(model.named_buffers()))
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def f(th: Tensor, x: Tensor) -> Tensor:
        params, start = {}, 0
        for name, p in named:
            params[name] = th[start : start + p.numel()].view(p.shape)
            start += p.numel()
        out = functional_call(model, {**fixed, **params}, (x,))
        return out.reshape(out.shape[0], -1)

    return f, theta



def penalty_definition(log_p, params: list[Tensor], n: int, kind: str, alpha: float) -> list[Tensor]:
    """Value and gradient of the Fisher penalty from its definition by double backprop: ``log_p(rows)`` is
    the summed log-likelihood of the sampled labels of the inputs ``rows`` (a slice);
    ``"batch_gradient"``: ``α‖∇_θ (1/n) Σᵢ −log p‖²``, ``"trace"``: ``α (1/n) Σᵢ ‖∇_θ log p(xᵢ)‖²``."""
    if kind == "batch_gradient":
        g = torch.autograd.grad(-log_p(slice(None)) / n, params, create_graph=True)
        value = alpha * sum(t.pow(2).sum() for t in g)
    else:
        value = 0
        for i in range(n):
            g = torch.autograd.grad(log_p(slice(i, i + 1)), params, create_graph=True)
            value = value + alpha * sum(t.pow(2).sum() for t in g) / n
    return [value.detach(), *[t.detach() for t in torch.autograd.grad(value, params)]]


def joint_label_support(family: str, outs: Tensor, observed: Tensor, c: int) -> tuple[Tensor, Tensor, Tensor]:
    """One input's block-diagonal output Fisher ``Λ`` (L·C × L·C) over its observed positions, and the joint
    support of its positions' labels (independent given the input), enumerated: the probability of every
    combination of one support point per position ``(S,)`` and its concatenated scores ``u`` ``(S, L·C)``. A masked
    position (``observed[t]`` False) has ``Λ = 0`` and a single label of score 0.

    ``outs``: the input's outputs flattened, ``(L·C,)``; ``observed``: ``(L,)`` bool.
    """
    positions = observed.shape[0]
    lam = torch.zeros(positions * c, positions * c, dtype=torch.float64)
    supports = []
    for t in range(positions):
        block = slice(t * c, (t + 1) * c)
        if observed[t]:
            lam[block, block] = output_fisher(family, outs[block])
            _, probs, u = label_support(family, outs[block])
        else:
            probs, u = torch.ones(1, dtype=torch.float64), torch.zeros(1, c, dtype=torch.float64)
        supports.append((probs, u))
    combos = torch.cartesian_prod(*[torch.arange(len(p)) for p, _ in supports]).reshape(-1, positions)
    prob = torch.stack([supports[t][0][combos[:, t]] for t in range(positions)]).prod(0)
    u = torch.cat([supports[t][1][combos[:, t]] for t in range(positions)], dim=1)
    return lam, prob, u


def assert_hessian_variance_is_the_oracles(model: nn.Module, x: Tensor, oracle: dict[str, Tensor],
                                           backend: str) -> None:
    """``fisher_variance(estimator="hessian")`` of ``model`` on ``x``, diagonal and trace, equals ``oracle``'s
    (:func:`variance_oracle` with one label) to 1e-8: the second derivatives through the model are right."""
    import torchfim

    diag = torchfim.fisher_variance(model, x, estimator="hessian", structure="diag", backend=backend)
    trace = torchfim.fisher_variance(model, x, estimator="hessian", structure="trace", backend=backend)
    assert torch.allclose(diag, torch.diagonal(oracle["hessian"]), rtol=1e-8, atol=1e-16)
    assert torch.allclose(trace, oracle["hessian_trace"], rtol=1e-8, atol=0)


def assert_hessian_bound_holds(model: nn.Module, x: Tensor, oracle: dict[str, Tensor]) -> None:
    """``variance_bound(estimator="hessian", structure="diag")`` is at least ``oracle``'s variance everywhere."""
    import torchfim

    bound = torchfim.variance_bound(model, x, estimator="hessian", structure="diag")
    assert bool((bound >= torch.diagonal(oracle["hessian"]) * (1 - 1e-9)).all())
