"""FisherPenalty and the log-likelihood it differentiates, for the gamma and heteroscedastic Gaussian families at
extreme outputs of a float32 model (a review). Oracles: the derivatives of the log-density at 40 digits (mpmath),
and Monte Carlo means of the penalty against the exact Tr(F) in closed form, within 5 of their own standard errors."""

from __future__ import annotations

import math
import warnings

import mpmath
import pytest
import torch
from torch import nn

from torchfim.families import Gamma, HeteroscedasticGaussian
from torchfim.train import FisherPenalty


def _mp_gamma(y: float, log_mean: float, log_shape: float) -> list[float]:
    """``(u_μ, u_α, −∂²_μμ, −∂²_μα, −∂²_αα)`` of ``log p(y)`` in ``(log μ, log α)``, at 40 digits."""
    mpmath.mp.dps = 40
    alpha, mean = mpmath.exp(mpmath.mpf(log_shape)), mpmath.exp(mpmath.mpf(log_mean))
    w = alpha * mpmath.mpf(y) / mean
    u_mean, u_shape = w - alpha, alpha * (mpmath.log(w) - mpmath.digamma(alpha)) - (w - alpha)
    shape_fisher = alpha**2 * mpmath.polygamma(1, alpha) - alpha
    return [float(v) for v in (u_mean, u_shape, alpha + u_mean, -u_mean, shape_fisher - u_shape)]


@pytest.mark.parametrize(("log_shape", "dtype"), [(-3.5, torch.float32), (2.0, torch.float64), (14.0, torch.float32),
                                                  (17.0, torch.float32), (19.99, torch.float64),
                                                  (20.01, torch.float64), (30.0, torch.float64),
                                                  (40.0, torch.float64)])
def test_gamma_log_prob_derivatives_against_mpmath(log_shape, dtype):
    """The scores and Hessian that the penalty takes from ``log_prob`` by autograd, for float64 labels
    ``y = μ(1 + t/√α)`` (for small α, ``y = μe^{t}``). Before: ``α log w − w − log Γ(α)`` cancelled to the O(1)
    score (float64 u_α off by 0.015 at log-shape 30, by 780 at 40). Tolerance: 64 ε of each entry's size and of
    what the rounding of ``y/μ`` to ε leaves of it (α in ``W``, hence in u_μ and its curvatures, ``√α`` in u_α and
    ∂²_αα, where it meets δ ≈ 1/√α), plus torch's trigamma (1e-9 relative) in ∂²_αα."""
    fam, log_mean = Gamma(), 0.4
    t = torch.tensor([-3.0, -1.0, -0.2, 0.1, 1.0, 4.0], dtype=torch.float64)
    alpha = math.exp(log_shape)
    y = math.exp(log_mean) * (1 + t / math.sqrt(alpha)) if log_shape > 5 else torch.exp(log_mean + t)
    scale = torch.tensor([alpha, math.sqrt(alpha), alpha, alpha, math.sqrt(alpha)], dtype=torch.float64)
    trigamma = torch.tensor([0, 0, 0, 0, 1e-8], dtype=torch.float64)
    for label in y:
        o = torch.tensor([[log_mean, log_shape]], dtype=dtype, requires_grad=True)
        (score,) = torch.autograd.grad(fam.log_prob(o, label.reshape(1, 1, 1)).sum(), o, create_graph=True)
        curvature = [torch.autograd.grad(score[0, i], o, retain_graph=True)[0][0] for i in range(2)]
        got = torch.stack([score[0, 0], score[0, 1], -curvature[0][0], -curvature[0][1], -curvature[1][1]])
        want = torch.tensor(_mp_gamma(float(label), *o.detach()[0].tolist()), dtype=torch.float64)
        tol = 64 * torch.finfo(dtype).eps * (scale + want.abs()) + trigamma
        assert bool(((got.detach().double() - want).abs() <= tol).all()), (float(label), got, want)


@pytest.mark.parametrize("log_shape", [-3.0, 17.0])
def test_gamma_labels_of_float32_outputs_carry_their_scores(log_shape):
    """Labels are float64 whatever the outputs' dtype, so their scores are the draws' (``sample_scores``, from the
    same random numbers). Before: float32 labels below its smallest normal number were raised to it (1.1 % of them
    at log-shape −3) and u_α was rounded away at log-shape 17. Tolerance: float64 rounding of the labels, as in
    test_families_extremes (ε·α(2 + |log α − log μ|) on u_α's W), and float32's of the returned scores."""
    fam, o = Gamma(), torch.tensor([[0.3, log_shape]])
    y = fam.sample(o, 4000, torch.Generator().manual_seed(5))
    u = fam.sample_scores(o, 4000, torch.Generator().manual_seed(5))
    assert y.dtype == torch.float64
    alpha = math.exp(log_shape)
    tol = 64 * torch.finfo(torch.float64).eps * alpha * (2 + abs(log_shape - 0.3)) + 1e-6 * (1 + u.abs())
    assert bool(((fam.output_score(y, o) - u).abs() <= tol).all())


def test_gamma_labels_below_float64_are_named_once():
    """Below log-shape −5 some draws fall below float64's range: the labels raised to it are named, once for the
    call site however often it draws."""
    fam, o = Gamma(), torch.tensor([[0.0, -6.0]], dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        for seed in range(3):
            y = fam.sample(o, 2000, torch.Generator().manual_seed(seed))
    assert bool((y > 0).all())
    named = [w for w in caught if "smallest normal number" in str(w.message)]
    assert len(named) == 1 and "float64" in str(named[0].message), [str(w.message) for w in caught]


class _OneHalf(nn.Module):
    """``[a, b]`` with one half ``Linear(x)`` (weight 0, bias ``level``) and the other fixed at ``other``."""

    def __init__(self, level: float, other: float, learned_first: bool) -> None:
        super().__init__()
        self.linear, self.other, self.first = nn.Linear(3, 1), other, learned_first
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.fill_(level)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        learned, fixed = self.linear(x), torch.full_like(x[:, :1], self.other)
        return torch.cat([learned, fixed] if self.first else [fixed, learned], -1)


def _penalty_ratio(model: nn.Module, family: str, fisher_entry: float, calls: int, batch: int) -> tuple[float, float]:
    """``(z, ratio)``: the mean of ``calls`` trace penalties on ``batch`` inputs against ``E[P_t] = Tr(F_B)``, in
    standard errors of the mean and as a ratio. Each input's Fisher is ``fisher_entry·(‖x‖² + 1)`` (one learned
    output with weight 0, its Jacobian ``(x, 1)``); the inputs are fixed across the draws."""
    x = torch.randn(batch, 3, generator=torch.Generator().manual_seed(0))
    expected = fisher_entry * float((x.double().pow(2).sum(1) + 1).mean())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the log-shape or log-variance output is a constant (a misread check)
        values = torch.tensor([float(FisherPenalty(model, family=family, alpha=1.0, kind="trace",
                                                   generator=torch.Generator().manual_seed(r))(x, step=0))
                               for r in range(calls)], dtype=torch.float64)
    return float((values.mean() - expected) / (values.std() / math.sqrt(calls))), float(values.mean() / expected)


@pytest.mark.parametrize("log_shape", [-3.5, -3.0, 14.0, 17.0])
def test_gamma_trace_penalty_at_extreme_shapes_is_unbiased(log_shape):
    """A float32 model learning the log-shape (log-mean fixed). Before (mean penalty over Tr(F)): 0.63 at log-shape
    −3.5, 0.89 at −3 (float32 labels clipped at its smallest normal number), 1.8 at 14 and 357 at 17 (u_α cancelled
    in float32)."""
    mpmath.mp.dps = 40
    alpha = mpmath.exp(log_shape)
    shape_fisher = float(alpha**2 * mpmath.polygamma(1, alpha) - alpha)
    z, ratio = _penalty_ratio(_OneHalf(log_shape, 0.3, learned_first=False), "gamma", shape_fisher, 20, 2000)
    assert abs(z) < 5, (z, ratio)


@pytest.mark.parametrize("log_shape", [-3.5, 17.0])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize(("grad_method", "rtol"), [("exact", 1e-4), ("finite_difference", 1e-2)])
def test_gamma_penalty_value_and_gradient_match_the_draws_scores(log_shape, kind, grad_method, rtol):
    """Float64 brute force from the exact scores of the penalty's own draws (``sample_scores`` with the generator
    seeded alike draws what its one ``sample`` call draws): for the log-shape ``o_i = wᵀx_i + b``, ``J_i = (x_i, 1)``,
    ``g_i = −u_i J_i`` and ``H_i = (Λ_i − u_i) J_i J_iᵀ`` (``−∂²log p/∂o²``), so ``P_t = (1/B) Σ ‖g_i‖²`` with
    gradient ``(2/B) Σ H_i g_i``, and ``P_b = ‖g‖²`` with ``g`` the mean of the ``g_i`` and gradient ``2 H g``.
    Before: the values were 0.6 (log-shape −3.5, clipped labels) and 300 (17) times the brute force's."""
    model = _OneHalf(log_shape, 0.3, learned_first=False)
    with torch.no_grad():
        model.linear.weight.copy_(torch.tensor([[0.3, -0.2, 0.1]]))
    x = torch.randn(64, 3, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the constant log-mean output (a misread check)
        pen = FisherPenalty(model, family="gamma", alpha=1.0, kind=kind, grad_method=grad_method,
                            generator=torch.Generator().manual_seed(7))
        term = pen(x, step=0)
        term.backward()
    o = model(x).detach().double()
    fam = Gamma()
    u = fam.sample_scores(o, 1, torch.Generator().manual_seed(7))[:, 0, 1]
    lam = fam.fisher_output(o)[:, 1, 1]
    jac = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    if kind == "trace":
        value = (u**2 * jac.pow(2).sum(1)).mean()
        grad = (2 * (lam - u) * -u * jac.pow(2).sum(1)).unsqueeze(1).mul(jac).mean(0)
    else:
        g = (-u.unsqueeze(1) * jac).mean(0)
        value = g.pow(2).sum()
        grad = 2 * ((lam - u).unsqueeze(1) * jac).T.mm(jac).div(len(x)).mv(g)
    got = torch.cat([model.linear.weight.grad.flatten(), model.linear.bias.grad]).double()
    assert math.isclose(float(term.detach()), float(value), rel_tol=1e-4), (float(term.detach()), float(value))
    assert float((got - grad).abs().max()) <= rtol * float(grad.abs().max()), (got, grad)


@pytest.mark.parametrize("mean", [0.3, 3.0])
def test_heteroscedastic_penalty_with_sigma_below_float32_spacing_is_unbiased(mean):
    """A float32 model learning the mean, log σ² = −36 (σ = 1.5e-8, below float32's spacing at μ). Before: the
    labels y = μ + σz were float32, and the mean penalty over Tr(F) was 1.3 at μ = 0.3 and 0 at μ = 3 (y = μ)."""
    log_var = -36.0
    z, ratio = _penalty_ratio(_OneHalf(mean, log_var, learned_first=True), "heteroscedastic_gaussian",
                              math.exp(-log_var), 20, 2000)
    assert abs(z) < 5, (z, ratio)


def test_heteroscedastic_labels_are_float64():
    """Whatever the outputs' dtype, as the gamma labels and the Poisson counts."""
    fam = HeteroscedasticGaussian()
    assert fam.sample(torch.tensor([[3.0, -36.0]]), 2, torch.Generator().manual_seed(0)).dtype == torch.float64
