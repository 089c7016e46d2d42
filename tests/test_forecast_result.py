"""torchfim.forecast's result: marginal and conditional errors, covariance, correlation and fixed parameters
against a direct inverse; data sets added and copies scaled; and stable_inverse, which refuses a singular or
indefinite Fisher matrix at the precision it came in (float32 or float64), naming the parameter or the fix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from forecast_cases import F64, X, _rel, _spd

from torchfim.errors import TorchfimError
from torchfim.forecast import DERIVATIVES, Forecast, default_steps, forecast, stable_inverse


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
