"""torchfim.forecast's Gaussian Fisher matrix against closed forms and a brute-force oracle, by autograd and the
stencils: steps, the check of autograd against a stencil, and the mean and covariance functions it is given.

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
from forecast_cases import F64, X, _rel, _spd

from torchfim.errors import TorchfimError
from torchfim.forecast import (
    DERIVATIVES,
    Forecast,
    default_steps,
    forecast,
    gaussian_fisher,
    scan_steps,
)


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


@pytest.mark.parametrize(
    "args, match",
    [  # a NaN or Inf derivative gave an all-NaN F; a list an AttributeError; a complex one its real part, silently
        ((torch.tensor([[np.nan, 1.0]], dtype=F64), torch.eye(2, dtype=F64)), "mean_jacobian has non-finite"),
        ((torch.tensor([[0.0, 1.0]], dtype=F64), torch.eye(2, dtype=F64), torch.full((1, 2, 2), np.inf, dtype=F64)),
         "cov_jacobian has non-finite"),
        (([[0.0, 1.0]], torch.eye(2, dtype=F64)), "mean_jacobian must be a real tensor, got list"),
        ((torch.tensor([[0.0, 1.0]], dtype=F64), [[1.0, 0.0], [0.0, 1.0]]), "cov must be a real tensor, got list"),
        ((torch.tensor([[0.0, 1j]]), torch.eye(2, dtype=F64)), "real tensor, got a torch.complex64 tensor"),
    ],
)
def test_gaussian_fisher_refuses_what_has_no_fisher_matrix(args, match):
    with pytest.raises(TorchfimError, match=match):
        gaussian_fisher(*args)


# ---------------------------------------------------------------- non-linear: the KL Hessian oracle
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
    with pytest.raises(TorchfimError, match="theta0 must be a floating-point tensor"):  # was torch.finfo's TypeError
        default_steps(torch.tensor([1, 2]), "stencil3")


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
        # a complex mean or covariance lost its imaginary part in the float64 assembly, silently
        ({"mean": lambda t: torch.stack([t[0], t[1], t[0] * t[1]]).to(torch.complex128)}, "mean must .* real tensor"),
        ({"cov": torch.eye(3, dtype=torch.complex128) * (1 + 1j)}, "cov must .* real tensor"),
    ],
)
def test_bad_input_raises_a_clear_error(kwargs, match):
    args = {"mean": lambda t: torch.stack([t[0], t[1], t[0] * t[1]]), "cov": torch.eye(3, dtype=F64),
            "theta0": torch.tensor([1.0, 2.0], dtype=F64)}
    args.update(kwargs)
    with pytest.raises(TorchfimError, match=match):
        forecast(args.pop("mean"), args.pop("cov"), args.pop("theta0"), **args)


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
