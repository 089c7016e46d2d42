"""torchfim.forecast: the Gaussian Fisher matrix against closed forms and a brute-force oracle.

Oracles: ``AᵀC⁻¹A`` and ``½ tr(C⁻¹B_a C⁻¹B_b)`` with explicit inverses for linear models, and, for
a non-linear mean and covariance, the Hessian at θ₀ of ``KL(N(μ(θ₀), C(θ₀)) ‖ N(μ(θ), C(θ)))``
by torch.func (the Fisher matrix is that Hessian; it shares no code with the library's formula).
"""

from __future__ import annotations

import doctest
import importlib
import warnings

import numpy as np
import pytest
import torch

from torchfim.errors import TorchfimError
from torchfim.forecast import (
    DERIVATIVES,
    Forecast,
    default_steps,
    forecast,
    gaussian_fisher,
    scan_steps,
    stable_inverse,
)

F64 = torch.float64


def _spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.5 * torch.eye(d, dtype=F64)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------ linear-Gaussian
@pytest.mark.parametrize("derivatives", DERIVATIVES)
def test_linear_gaussian_mean_is_exact(derivatives):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(6, 3, generator=g, dtype=F64)
    offset = torch.randn(6, generator=g, dtype=F64)
    C = _spd(6, 1)
    theta0 = torch.tensor([0.3, -1.2, 2.0], dtype=F64)
    # A linear mean has no truncation error, so a large step leaves only round-off of order ε.
    step = None if derivatives == "autograd" else 0.5
    fc = forecast(lambda t: A @ t + offset, C, theta0, derivatives=derivatives, step=step)
    assert _rel(fc.fisher, A.T @ torch.linalg.inv(C) @ A) < 1e-12


@pytest.mark.parametrize("derivatives", DERIVATIVES)
def test_linear_covariance_is_exact(derivatives):
    d = 4
    C0 = _spd(d, 2)
    B = torch.stack([_spd(d, 3) - C0, torch.diag(torch.arange(1.0, d + 1, dtype=F64))]) * 0.1
    B = (B + B.transpose(1, 2)) / 2
    theta0 = torch.tensor([0.2, 0.1], dtype=F64)
    step = None if derivatives == "autograd" else 0.05
    fc = forecast(torch.zeros(d, dtype=F64), lambda t: C0 + torch.einsum("a,aij->ij", t, B), theta0,
                  derivatives=derivatives, step=step)
    Cinv = torch.linalg.inv(C0 + torch.einsum("a,aij->ij", theta0, B))
    expected = 0.5 * torch.einsum("ij,ajk,kl,bli->ab", Cinv, B, Cinv, B)
    assert _rel(fc.fisher, expected) < 1e-12


def test_gaussian_fisher_direct_matches_closed_form():
    A = torch.randn(5, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    C = _spd(5, 5)
    assert _rel(gaussian_fisher(A.T, C), A.T @ torch.linalg.solve(C, A)) < 1e-13


# ---------------------------------------------------------------- non-linear: the KL Hessian oracle
X = torch.linspace(-1, 1, 5, dtype=F64)
THETA0 = torch.tensor([0.4, -0.3, 0.2], dtype=F64)


def _mean(t):
    return torch.exp(t[0] * X) + t[1] * X**2


def _cov(t):
    corr = torch.exp(-((X[:, None] - X[None, :]) ** 2) / (0.5 + t[2] ** 2))
    return torch.exp(t[1]) * corr + (0.3 + t[0] ** 2) * torch.eye(len(X), dtype=F64)


def _kl_hessian() -> torch.Tensor:
    mu0, c0 = _mean(THETA0), _cov(THETA0)

    def kl(t):
        c = _cov(t)
        diff = _mean(t) - mu0
        return 0.5 * (torch.logdet(c) + torch.trace(torch.linalg.solve(c, c0)) + diff @ torch.linalg.solve(c, diff))

    return torch.func.hessian(kl)(THETA0)


@pytest.mark.parametrize("derivatives, tol", [("autograd", 1e-12), ("stencil5", 1e-11), ("stencil3", 1e-9)])
def test_nonlinear_model_matches_kl_hessian(derivatives, tol):
    fc = forecast(_mean, _cov, THETA0, derivatives=derivatives)
    assert _rel(fc.fisher, _kl_hessian()) < tol


def test_per_parameter_steps_and_float32_parameters():
    per_parameter = forecast(_mean, _cov, THETA0, derivatives="stencil5", step=[1e-3, 2e-3, 3e-3])
    assert _rel(per_parameter.fisher, _kl_hessian()) < 1e-9
    single = forecast(lambda t: (_mean(t.double())).float(), lambda t: _cov(t.double()).float(), THETA0.float())
    assert single.fisher.dtype == F64
    assert _rel(single.fisher, _kl_hessian()) < 1e-5


def test_default_steps_follow_the_textbook_rule():
    theta = torch.tensor([0.0, -50.0], dtype=F64)
    eps = torch.finfo(F64).eps
    assert torch.allclose(default_steps(theta, "stencil3"), torch.tensor([1.0, 50.0], dtype=F64) * eps ** (1 / 3))
    assert torch.allclose(default_steps(theta, "stencil5"), torch.tensor([1.0, 50.0], dtype=F64) * eps ** (1 / 5))


# ----------------------------------------------------------------------- the result object
def test_errors_covariance_and_fixing_against_direct_inverse():
    F = _spd(4, 6) * 10
    fc = Forecast(F, names=["a", "b", "c", "d"])
    inv = torch.linalg.inv(F)
    assert _rel(fc.covariance(), inv) < 1e-12
    assert _rel(fc.marginal_errors(), inv.diagonal().sqrt()) < 1e-12
    assert _rel(fc.conditional_errors(), F.diagonal().rsqrt()) < 1e-14
    assert bool((fc.marginal_errors() >= fc.conditional_errors() * (1 - 1e-12)).all())
    corr = fc.correlation()
    assert _rel(corr, inv / torch.outer(inv.diagonal().sqrt(), inv.diagonal().sqrt())) < 1e-12
    kept = fc.fix("b", 3)
    assert kept.names == ("a", "c")
    assert torch.equal(kept.fisher, F[[0, 2]][:, [0, 2]])


def test_stable_inverse_of_badly_scaled_matrix():
    # F = D R D with units spanning 16 decades: the inverse D⁻¹R⁻¹D⁻¹ is known exactly.
    R = torch.tensor([[1.0, 0.6, 0.1], [0.6, 1.0, -0.3], [0.1, -0.3, 1.0]], dtype=F64)
    D = torch.tensor([1e-8, 1.0, 1e8], dtype=F64)
    expected = torch.linalg.inv(R) / D[:, None] / D[None, :]
    got = stable_inverse(R * D[:, None] * D[None, :])
    assert float(((got - expected) / expected).abs().max()) < 1e-12


def test_independent_data_sets_add_and_copies_scale():
    A = forecast(lambda t: t * X[:2], torch.eye(2, dtype=F64), torch.ones(2, dtype=F64))
    B = forecast(lambda t: t.flip(0), 2 * torch.eye(2, dtype=F64), torch.ones(2, dtype=F64))
    both = forecast(lambda t: torch.cat([t * X[:2], t.flip(0)]), torch.diag(torch.tensor([1.0, 1, 2, 2], dtype=F64)),
                    torch.ones(2, dtype=F64))
    assert _rel((A + B).fisher, both.fisher) < 1e-14
    assert _rel((3 * A).fisher, 3 * A.fisher) == 0
    with pytest.raises(TorchfimError, match="same parameters"):
        A + Forecast(A.fisher)
    with pytest.raises(TorchfimError, match="positive number of copies"):
        0 * A


@pytest.mark.parametrize(
    "copies", [3, 2.5, torch.tensor(3.0), torch.tensor(3), np.float64(3.0), np.float32(2.5), np.int64(3),
               np.array(3.0)], ids=repr
)
def test_a_forecast_is_scaled_from_either_side_by_any_scalar(copies):
    """Only ``3 * fc`` worked: ``fc * 3`` and ``torch.tensor(3.) * fc`` raised TypeError. Scaling means n copies
    of the data: F·n on both sides, for Python numbers, numpy scalars and 0-dim tensors and arrays alike."""
    fc = Forecast(torch.tensor([[4.0, 1.0], [1.0, 2.0]]), names=["a", "b"])
    n = float(copies)
    for scaled in (fc * copies, copies * fc):
        assert isinstance(scaled, Forecast) and scaled.names == fc.names and scaled.precision == torch.float32
        assert torch.equal(scaled.fisher, n * fc.fisher)
        assert torch.allclose(scaled.marginal_errors(), fc.marginal_errors() / n**0.5, rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "copies, match",
    [(torch.ones(2), r"one positive real number.*Tensor of shape \(2,\)"),
     (np.array([3.0, 4.0]), r"one positive real number.*ndarray of shape \(2,\)"),
     (True, "one positive real number"), (torch.tensor(True), "one positive real number"),
     (torch.tensor(-2.0), "positive number of copies"), (float("nan"), "positive number of copies")],
    ids=repr,
)
def test_scaling_by_anything_but_one_positive_number_is_refused(copies, match):
    fc = Forecast(torch.eye(2, dtype=F64))
    for scale in (lambda: fc * copies, lambda: copies * fc):
        with pytest.raises(TorchfimError, match=match):
            scale()


def test_str_lists_every_parameter_and_survives_a_singular_matrix():
    text = str(Forecast(torch.tensor([[1.0, 1.0], [1.0, 1.0]], dtype=F64), names=["amp", "bias"]))
    assert "amp" in text and "bias" in text and "singular" in text


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"theta0": torch.zeros(2, 1, dtype=F64)}, "1-D"),
        ({"theta0": torch.tensor([1, 2])}, "floating-point"),
        ({"mean": lambda t: torch.zeros(3, 1, dtype=F64)}, "1-D tensor"),
        ({"cov": torch.eye(2, dtype=F64)}, r"\(3, 3\)"),
        ({"cov": torch.diag(torch.tensor([1.0, 0.0, 1.0], dtype=F64))}, "positive definite"),
        ({"cov": torch.eye(3, dtype=F64) + torch.triu(torch.ones(3, 3, dtype=F64), 1)}, "not symmetric"),
        ({"derivatives": "stencil7"}, "unknown derivatives"),
        ({"step": 1e-3}, "only used by the stencils"),
        ({"derivatives": "stencil3", "step": -1.0}, "positive finite"),
        ({"derivatives": "stencil3", "step": [1e-3, 1e-3, 1e-3]}, "one per parameter"),
        ({"names": ["a"]}, "2 strings"),
        ({"names": "ab"}, r"names must be a sequence of 2 strings, got the string 'ab'"),  # was split into a, b
        ({"mean": "x"}, "function of theta"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    args = {"mean": lambda t: torch.stack([t[0], t[1], t[0] * t[1]]), "cov": torch.eye(3, dtype=F64),
            "theta0": torch.tensor([1.0, 2.0], dtype=F64)}
    args.update(kwargs)
    with pytest.raises(TorchfimError, match=match):
        forecast(args.pop("mean"), args.pop("cov"), args.pop("theta0"), **args)


def test_singular_fisher_names_the_parameter_or_the_degeneracy():
    no_info = forecast(lambda t: t[:1] * 2, torch.eye(1, dtype=F64), torch.ones(2, dtype=F64), names=["a", "ghost"])
    with pytest.raises(TorchfimError, match="'ghost' has no Fisher information"):
        no_info.covariance()
    degenerate = forecast(lambda t: (t[0] + t[1]) * X, torch.eye(5, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(TorchfimError, match="singular to float64 precision.*Forecast.fix"):
        degenerate.marginal_errors()


def test_an_indefinite_matrix_is_not_called_singular():
    """Eigenvalues 3 and −1: before, "singular to float64 precision (condition number inf)" and the advice to fix a
    parameter; no Fisher matrix has a negative eigenvalue, so the message says that, and where to look."""
    with pytest.raises(TorchfimError, match=r"not positive semi-definite \(the unit-free matrix has the eigenvalue -1, "
                                            r"beside 3\).*check how it was built") as caught:
        stable_inverse(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64))
    assert "singular" not in str(caught.value) and "Forecast.fix" not in str(caught.value)


def test_a_degenerate_matrix_built_in_float32_is_called_singular():
    """AᵀA with one column the sum of two others, built in float32: its smallest eigenvalue is rounding of either
    sign. Read against the float32 rounding it was built with, it is singular, never indefinite nor inverted (with
    float64's rounding alone, about half of the seeds were called indefinite, and others inverted)."""
    for seed in range(40):
        a = torch.randn(30, 6, generator=torch.Generator().manual_seed(seed))
        a[:, 3] = a[:, 0] + a[:, 1]
        with pytest.raises(TorchfimError, match="singular to float32 precision"):
            stable_inverse(a.T @ a)


@pytest.mark.parametrize(
    "matrix, match",
    [
        ([[-1.0, 0.0], [0.0, 1.0]], r"parameter 'a' has negative Fisher information \(F_aa = -1\).*check how it was built"),
        ([[1.0, 2.0], [2.0, 1.0]], r"not positive semi-definite \(the unit-free matrix has the eigenvalue -1.*check how"),
        ([[0.0, 0.5], [0.5, 1.0]], r"parameter 'a' has no Fisher information \(F_aa = 0\) but F_ab ≠ 0.*check how"),
    ],
)
def test_conditional_errors_refuse_what_marginal_errors_refuse(matrix, match):
    """conditional_errors() read 1/√F_aa off the diagonal whatever the matrix: NaN for F_aa = −1, and [1, 1] for
    the indefinite [[1, 2], [2, 1]] (eigenvalues 3 and −1), where marginal_errors() refuses. Now both refuse with
    the same message, and the table prints neither error."""
    fc = Forecast(torch.tensor(matrix, dtype=F64), names=["a", "b"])
    with pytest.raises(TorchfimError, match=match) as conditional:
        fc.conditional_errors()
    with pytest.raises(TorchfimError) as marginal:
        fc.marginal_errors()
    assert str(conditional.value) == str(marginal.value)
    assert str(fc).count("invalid") == 4


def test_conditional_errors_of_a_singular_fisher_matrix_are_still_given():
    """What conditional_errors() must keep: a singular F (fully degenerate pair; a parameter without information)
    has conditional errors 1/√F_aa, infinite for F_aa = 0, while marginal_errors() refuses."""
    degenerate = Forecast(torch.tensor([[4.0, 2.0], [2.0, 1.0]], dtype=F64))
    assert degenerate.conditional_errors().tolist() == [0.5, 1.0]
    ghost = Forecast(torch.diag(torch.tensor([0.0, 4.0], dtype=F64)))
    assert ghost.conditional_errors().tolist() == [float("inf"), 0.5]
    for fc in (degenerate, ghost):
        with pytest.raises(TorchfimError):
            fc.marginal_errors()
        assert "singular" in str(fc) and "invalid" not in str(fc)


NEAR_SINGULAR = [[1.0, 1 - 1e-7], [1 - 1e-7, 1.0]]  # in float32 the off-diagonal is 1 − 2⁻²³: R's λ_min ≈ 1.2e-7


def test_a_float32_fisher_is_judged_at_float32_precision_by_forecast():
    """Forecast converts F to float64 for the arithmetic; before, that also made it judge singularity at float64,
    so a float32 matrix that stable_inverse calls singular gave marginal errors of 2048 without a word. Now every
    route to F⁻¹ (and what is derived from it) refuses it as stable_inverse does, and keeps refusing after fix,
    addition and scaling; the same numbers given in float64 are inverted (oracle: the 2×2 inverse by hand)."""
    f32 = torch.tensor(NEAR_SINGULAR)
    with pytest.raises(TorchfimError, match="singular to float32 precision"):
        stable_inverse(f32)
    fc = Forecast(f32, names=["a", "b"])
    for route in (fc.marginal_errors, fc.covariance, fc.correlation, (2 * fc).marginal_errors,
                  (fc + fc).marginal_errors):
        with pytest.raises(TorchfimError, match="singular to float32 precision.*Forecast.fix"):
            route()
    assert fc.diagnostics().unstable and fc.diagnostics().max_relative_change == float("inf")
    assert "singular" in str(fc)
    assert fc.precision == torch.float32 and fc.fisher.dtype == F64
    with pytest.raises(TorchfimError, match="singular to float32 precision"):
        Forecast(f32.double(), precision=torch.float32).marginal_errors()
    in_f64 = f32.double()
    a, b = float(in_f64[0, 0]), float(in_f64[0, 1])
    by_hand = torch.tensor([[a, -b], [-b, a]], dtype=F64) / (a * a - b * b)
    assert _rel(Forecast(in_f64).covariance(), by_hand) < 1e-8
    # a float32 matrix of three parameters whose degeneracy sits in a block: fixing keeps the precision
    three = torch.eye(3)
    three[:2, :2] = f32
    assert Forecast(three).fix(2).precision == torch.float32
    with pytest.raises(TorchfimError, match="float32 precision"):
        Forecast(three).fix(2).marginal_errors()
    assert Forecast(three).fix(1).marginal_errors().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("derivatives", DERIVATIVES)
def test_a_degenerate_float32_forecast_is_refused_not_inverted(derivatives):
    """μ = (θ₀ + θ₁ + 1e-4 θ₁²)·x at θ = (1, 1): ∂μ/∂θ₁ = 1.0002·∂μ/∂θ₀, exactly rank one. With θ in float32 the
    stencils' noise made F invertible in float64 and the marginal errors came out near 1e5 with no error (stencil3;
    only diagnostics() said UNSTABLE), and even the exactly singular F was called singular "to float64 precision". Now the forecast knows F came from float32 and refuses it; a well-posed float32
    forecast (θ₁ entering as θ₁²) is still inverted, to the closed form AᵀA."""
    x = torch.linspace(0, 1, 10)  # float32, as in the trial
    fc = forecast(lambda t: (t[0] + t[1] + 1e-4 * t[1] ** 2) * x, torch.eye(10), torch.ones(2), derivatives=derivatives)
    with pytest.raises(TorchfimError, match="singular to float32 precision"):
        fc.marginal_errors()
    assert fc.precision == torch.float32
    fine = forecast(lambda t: torch.cat([t[0] * x, t[1] ** 2 * x]), torch.eye(20), torch.ones(2),
                    derivatives=derivatives)
    expected = torch.diag(torch.tensor([1.0, 4.0], dtype=F64)) * float((x.double() ** 2).sum())
    assert _rel(torch.linalg.inv(fine.covariance()), expected) < 1e-3


def test_autograd_failure_suggests_the_stencils():
    def through_numpy(t):
        return torch.from_numpy(t.numpy() ** 2)

    with pytest.raises(TorchfimError, match="stencil5"):
        forecast(through_numpy, torch.eye(1, dtype=F64), torch.ones(1, dtype=F64))
    fc = forecast(through_numpy, torch.eye(1, dtype=F64), torch.ones(1, dtype=F64), derivatives="stencil5")
    assert abs(float(fc.fisher) - 4.0) < 1e-9  # (∂θ²/∂θ)² at θ = 1


def test_autograd_silently_cut_by_float_is_caught_at_inversion():
    def cut(t):  # float() hides θ from autograd: the derivative comes out as zero
        return torch.tensor([float(t[0]), 1.0], dtype=F64)

    with pytest.warns(RuntimeWarning, match=r"autograd's derivative along θ\[0\] differs from a finite difference"):
        fc = forecast(cut, torch.eye(2, dtype=F64), torch.ones(1, dtype=F64))
    with pytest.raises(TorchfimError, match="autograd lost track of it"):
        fc.marginal_errors()


@pytest.mark.parametrize(
    "name", ["torchfim.forecast", "torchfim.forecast.gaussian", "torchfim.forecast.stability",
             "torchfim.forecast.result", "torchfim.forecast.stepscan", "torchfim.forecast.ellipse",
             "torchfim.forecast.counts_in_cells", "torchfim.forecast.derivatives"]
)
def test_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0


def _emulator() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5)).double()


@pytest.mark.parametrize("derivatives", ["autograd", "stencil5"])
def test_an_emulator_made_in_inference_mode_is_forecast(derivatives):
    """A neural emulator of the mean loaded for evaluation (``torch.inference_mode()``) made every forecast raise
    "Inference tensors cannot be saved for backward"; nothing here needs a backward graph. Oracle: ``JᵀC⁻¹J``
    with ``J`` the twin's Jacobian by reverse mode."""
    with torch.inference_mode():
        made = _emulator()
    theta0, cov = torch.tensor([0.3, 0.7], dtype=torch.float64), 0.1 * torch.eye(5, dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(_emulator(), theta0)
    want = jac.T @ torch.linalg.solve(cov, jac)
    got = forecast(lambda t: made(t), cov, theta0, derivatives=derivatives).fisher
    assert torch.allclose(got, want, rtol=1e-12 if derivatives == "autograd" else 1e-7, atol=0)
    assert scan_steps(lambda t: made(t), cov, theta0).steps.shape == (2,)


def test_symmetry_is_judged_at_the_precision_the_fisher_came_in():
    """A Fisher made in float32 as JᵀC⁻¹J by two different routes is asymmetric at ~1e-7 of its largest entry:
    before, the float64 tolerance (1e-10) refused it. Now float32 takes 64ε of round-off and float64 keeps 1e-10;
    an asymmetry of 1e-3 is refused in both, with its size named."""
    base = torch.tensor([[4.0, 1.0], [1.0, 2.0]], dtype=F64)
    nudged = base + torch.tensor([[0.0, 4e-7 * 4], [0.0, 0.0]], dtype=F64)  # 4e-7 of the largest entry, once
    fc = Forecast(nudged.float(), names=["a", "b"])
    assert fc.precision == torch.float32
    assert _rel(fc.fisher, fc.fisher.T) == 0 and _rel(fc.fisher, base) < 1e-6
    with pytest.raises(TorchfimError, match=r"must be symmetric, but F − Fᵀ reaches 1.6e-06"):
        Forecast(nudged)
    with pytest.raises(TorchfimError, match=r"reaches 0.004.*torch.float32's round-off.*\(F \+ F.T\) / 2"):
        Forecast((base + torch.tensor([[0.0, 4e-3], [0.0, 0.0]], dtype=F64)).float())


# ------------------------------------------------------------------------------ from a review
def test_a_forecast_from_lists_is_read_in_float64():
    """Lists went through torch.as_tensor, float32: [[1, 0.99999999], …] became singular, 1e8 + 1 lost its 1, and
    θ₀ = [0.3, 1.0] differed from forecast()'s, so a + b was refused. Oracle: numpy in float64."""
    F = [[1.0, 0.99999999], [0.99999999, 1.0]]
    fc = Forecast(F)
    assert fc.precision == F64
    want = np.sqrt(np.diag(np.linalg.inv(np.array(F, dtype=np.float64))))
    assert np.allclose(fc.marginal_errors().numpy(), want, rtol=1e-6, atol=0)
    assert float(Forecast([[1e8 + 1.0, 3.0], [3.0, 2.0]]).fisher[0, 0]) == 1e8 + 1.0
    x = torch.linspace(0, 1, 5, dtype=F64)
    a = forecast(lambda t: t[0] + t[1] * x, torch.eye(5, dtype=F64), [0.3, 1.0])
    b = Forecast(torch.eye(2, dtype=F64), theta0=(0.3, 1.0))
    assert b.theta0.dtype == F64 and torch.equal(a.theta0, b.theta0)
    ones = np.ones(5)
    brute = np.stack([ones, x.numpy()], axis=1)
    assert np.allclose((a + b).fisher.numpy(), brute.T @ brute + np.eye(2), rtol=1e-14, atol=0)


def test_a_term_read_out_with_item_is_warned_not_dropped_silently():
    """``.item()`` under torch.func.jvp does not fail: the term is a constant to autograd, and the forecast came out
    wrong without a word (σ 3.0 and 3.5 for 2.36 and 1.43). Now the 5-point check warns with the fix; the same model
    in torch operations does not warn. Oracle: μ is linear in θ, so F = JᵀJ with J by hand."""
    x = torch.linspace(0, 1, 5, dtype=F64)
    theta0, C = torch.tensor([0.5, 1.0], dtype=F64), torch.eye(5, dtype=F64)
    jac = torch.stack([x, x**2 + x**3], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # torch's first forward-mode call may warn of its own
        good = forecast(lambda t: t[0] * x + t[1] * x**2 + t[1] * x**3, C, theta0, names=["a", "b"])
    assert _rel(good.fisher, jac.T @ jac) < 1e-14
    with pytest.warns(RuntimeWarning, match=r"along b differs.*\.item\(\).*derivatives='stencil5'"):
        forecast(lambda t: t[0] * x + t[1] * x**2 + t[1].item() * x**3, C, theta0, names=["a", "b"])
    stencil = forecast(lambda t: t[0] * x + t[1] * x**2 + t[1].item() * x**3, C, theta0, derivatives="stencil5")
    assert _rel(stencil.fisher, jac.T @ jac) < 1e-9


def test_the_stencil_check_can_be_left_out_for_a_costly_model():
    """``check=False``: no evaluation of the model beyond autograd's (the check takes four per parameter), so no
    warning for a model that leaves torch either; ``check`` must be a bool."""
    x = torch.linspace(0, 1, 5, dtype=F64)
    theta0, C = torch.tensor([0.5, 1.0], dtype=F64), torch.eye(5, dtype=F64)
    calls = []

    def mean(t):
        calls.append(1)
        return t[0] * x + t[1] * x**2 + t[1].item() * x**3

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        forecast(mean, C, theta0, check=False)
    unchecked = len(calls)
    with pytest.warns(RuntimeWarning, match="along"):
        forecast(mean, C, theta0)
    assert len(calls) - unchecked == unchecked + 4 * 2
    with pytest.raises(TorchfimError, match="check must be True or False"):
        forecast(mean, C, theta0, check="no")


@pytest.mark.parametrize("cov", [torch.diag(torch.tensor([1, 2, 3])), lambda t: torch.diag(torch.tensor([1, 2, 3]))])
def test_an_integer_covariance_is_read_as_float64(cov):
    """An integer covariance raised torch.finfo's TypeError. Oracle: JᵀC⁻¹J with C⁻¹ by hand."""
    x = torch.linspace(0, 1, 3, dtype=F64)
    jac = torch.stack([torch.ones(3, dtype=F64), x], dim=1)
    want = jac.T @ torch.diag(torch.tensor([1.0, 1 / 2, 1 / 3], dtype=F64)) @ jac
    for derivatives in DERIVATIVES:
        got = forecast(lambda t: t[0] + t[1] * x, cov, torch.tensor([0.0, 1.0], dtype=F64), derivatives=derivatives)
        assert _rel(got.fisher, want) < 1e-9
    assert _rel(gaussian_fisher(jac.T, torch.diag(torch.tensor([1, 2, 3]))), want) < 1e-14
    assert scan_steps(lambda t: t[0] + t[1] * x, cov, torch.tensor([0.0, 1.0], dtype=F64)).found


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: Forecast(torch.eye(2, dtype=F64), theta0="ab"), "theta0 must be a 1-D tensor of parameter values"),
        (lambda: Forecast("ab"), r"a Fisher matrix must be a real \(P, P\) tensor"),
        (lambda: default_steps(torch.zeros(2, dtype=F64), "stencil7"), "unknown stencil 'stencil7'.*'stencil5'"),
        (lambda: stable_inverse(torch.ones(2, 3, dtype=F64)), r"must be square \(P, P\), got shape \(2, 3\)"),
        (lambda: stable_inverse(torch.ones(3, dtype=F64)), r"must be square \(P, P\), got shape \(3,\)"),
        (lambda: stable_inverse(torch.tensor([[1.0, 5.0], [0.0, 1.0]], dtype=F64)), r"must be symmetric.*\(F \+ F.T\)"),
        (lambda: stable_inverse(torch.diag(torch.tensor([1.0, -1.0], dtype=F64)), ["a"]),
         r"names must be 2 strings, one per parameter, got \('a',\)"),
    ],
)
def test_bad_matrices_and_names_are_refused_with_the_fix(call, match):
    """Each of these ended in a bare TypeError, KeyError, RuntimeError or IndexError."""
    with pytest.raises(TorchfimError, match=match):
        call()


def test_stable_inverse_takes_numpy_as_forecast_does():
    """A NumPy array (as Forecast takes) raised AttributeError. Oracle: numpy's inverse in float64."""
    F = np.array([[4.0, 2.0], [2.0, 3.0]])
    assert np.allclose(stable_inverse(F).numpy(), np.linalg.inv(F), rtol=1e-14, atol=0)
    assert stable_inverse([[4.0, 2.0], [2.0, 3.0]]).dtype == F64


@pytest.mark.parametrize("entry", ["scan_steps", "forecast"])
def test_a_function_that_fails_at_theta0_is_named_with_its_error_chained(entry):
    """A mean reading a parameter θ₀ lacks raised a bare IndexError from inside the user's lambda; the first call of
    each function is the one that names it, with θ₀'s shape; the original error stays the cause."""
    x, C, theta0 = torch.linspace(0, 1, 5, dtype=F64), torch.eye(5, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64)
    call = scan_steps if entry == "scan_steps" else forecast
    with pytest.raises(TorchfimError, match=r"the mean function mean\(theta0\) raised IndexError: index 2 .*"
                                            r"theta0 of shape \(2,\) \(2 parameters") as failed:
        call(lambda t: t[0] + t[2] * x, C, theta0)
    assert isinstance(failed.value.__cause__, IndexError)

    def cov(t):
        raise ValueError("no emulator loaded")

    with pytest.raises(TorchfimError, match=r"the covariance function cov\(theta0\) raised ValueError: no emulator"):
        call(lambda t: t[0] + t[1] * x, cov, theta0)


@pytest.mark.parametrize("derivatives", DERIVATIVES)
def test_a_function_that_fails_after_its_first_call_raises_as_it_is(derivatives):
    """Only the first call is wrapped: a later failure (a stencil's point, forward mode) is not a mismatch with θ₀."""
    x, calls = torch.linspace(0, 1, 5, dtype=F64), []

    def mean(t):
        calls.append(1)
        if len(calls) > 1:
            raise KeyError("lookup table exhausted")
        return t[0] + t[1] * x

    with pytest.raises(KeyError, match="lookup table exhausted"):
        forecast(mean, torch.eye(5, dtype=F64), torch.tensor([0.0, 1.0], dtype=F64), derivatives=derivatives)
