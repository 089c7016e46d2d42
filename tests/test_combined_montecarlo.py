"""Monte Carlo checks of docs/math.md §8: the shared-label covariance and the combined estimator.

The first test draws labels with ``torch.distributions`` (not torchfim's samplers), forms each
label's terms ``Z1 = (uᵀj_p)²`` and ``Z2 = −uᵀh_pp`` (and the trace terms ``uᵀJJᵀu``, ``−uᵀd``) from
``torch.func`` derivatives, and compares their sample covariance with :func:`fisher_covariance`.
The second runs ``torchfim.fisher(..., estimator="combined")`` over many generator seeds. Every
tolerance is a multiple of the Monte Carlo standard error of the quantity compared.
"""

from __future__ import annotations

import pytest
import torch
from cases import tanh_mlp
from oracles import FAMILY_WIDTH
from torch import distributions as dist
from torch.func import hessian, jacrev

import torchfim
from torchfim.combined import combined_variance
from torchfim.covariance import fisher_covariance

N = 4


def _inputs() -> torch.Tensor:
    return torch.randn(N, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _scores(family: str, o: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """``draws`` output scores ``u = ∇_o log p(y|o)`` for one output ``o`` (C,), written by hand."""
    torch.manual_seed(seed)  # one seed per input: the inputs' labels are independent
    if family == "categorical":
        p = torch.softmax(o, 0)
        return torch.eye(len(o), dtype=o.dtype)[dist.Categorical(probs=p).sample((draws,))] - p
    if family == "bernoulli":
        p = torch.sigmoid(o)
        return dist.Bernoulli(probs=p).sample((draws,)) - p
    if family == "poisson":
        return dist.Poisson(torch.exp(o)).sample((draws,)) - torch.exp(o)
    return torch.randn(draws, len(o), dtype=o.dtype)  # gaussian, σ = 1: u = y − o


def _sample_covariance(z1: torch.Tensor, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample covariance over dim 0 and its standard error."""
    prod = (z1 - z1.mean(0)) * (z2 - z2.mean(0))
    r = z1.shape[0]
    return prod.sum(0) / (r - 1), prod.std(0) / r**0.5


@pytest.mark.parametrize("family", list(FAMILY_WIDTH))
def test_covariance_against_sampled_labels(family: str) -> None:
    model, x, draws = tanh_mlp(FAMILY_WIDTH[family]), _inputs(), 40_000
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f(th: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        params, start = {}, 0
        for name, p in model.named_parameters():
            params[name] = th[start : start + p.numel()].view(p.shape)
            start += p.numel()
        return torch.func.functional_call(model, params, (inputs,))

    jac = jacrev(lambda th: f(th, x))(theta)  # (n, C, P)
    hess = torch.stack([hessian(lambda th, i=i: f(th, x[i : i + 1])[0])(theta) for i in range(N)])  # (n, C, P, P)
    cov_diag, var_diag = (torch.zeros(theta.numel(), dtype=torch.float64) for _ in range(2))
    cov_trace, var_trace = (torch.zeros((), dtype=torch.float64) for _ in range(2))
    for i, o in enumerate(f(theta, x).detach()):
        u = _scores(family, o, draws, seed=i)  # (R, C)
        uj = u @ jac[i]  # (R, P)
        c, se = _sample_covariance(uj**2, -u @ torch.diagonal(hess[i], dim1=-2, dim2=-1))
        cov_diag, var_diag = cov_diag + c, var_diag + se**2
        c, se = _sample_covariance(uj.square().sum(1), -u @ torch.einsum("app->a", hess[i]))
        cov_trace, var_trace = cov_trace + c, var_trace + se**2
    got_diag = fisher_covariance(model, x, family=family, structure="diag")
    got_trace = fisher_covariance(model, x, family=family, structure="trace")
    scale = 1e-12 * max(1.0, float(cov_diag.abs().max()))
    assert bool(((got_diag - cov_diag / N**2).abs() <= 4.5 * var_diag.sqrt() / N**2 + scale).all())
    assert abs(float(got_trace - cov_trace / N**2)) <= 4.5 * float(var_trace.sqrt()) / N**2 + scale
    if family != "gaussian":  # the check has teeth: the covariance is resolved, not lost in the noise
        assert abs(float(got_trace)) > 4.5 * float(var_trace.sqrt()) / N**2


@pytest.mark.parametrize("family", ["categorical", "poisson"])
def test_combined_over_seeds(family: str) -> None:
    """Over many generator seeds the combined trace and diagonal entries average to the exact Fisher
    (4 SE of the mean) and scatter with the closed-form variance (4 SE of the sample variance).

    ``k = 8`` labels per input keep the fourth moment of each draw moderate: with one Poisson label the
    scatter is so heavy-tailed that the sample's own standard error of its variance is unreliable."""
    model, x, seeds, k = tanh_mlp(FAMILY_WIDTH[family]), _inputs(), 160, 8
    for structure in ("trace", "diag"):
        draws = torch.stack([torchfim.fisher(model, x, family=family, estimator="combined", structure=structure,
                                             n_samples=k, generator=torch.Generator().manual_seed(s))
                             for s in range(seeds)])
        exact = torchfim.fisher(model, x, family=family, structure=structure)
        var = combined_variance(model, x, family=family, structure=structure, n_samples=k)
        mean_err, se_mean = (draws.mean(0) - exact).abs(), (var / seeds).sqrt()
        assert bool((mean_err <= 4 * se_mean + 1e-12).all()), float((mean_err / se_mean).max())
        centred = (draws - exact) ** 2  # the exact mean is known: an unbiased variance estimate per draw
        se_var = centred.std(0) / seeds**0.5
        assert bool(((centred.mean(0) - var).abs() <= 4 * se_var + 1e-12 * float(var.max())).all())
        assert float(var.max()) > 0
