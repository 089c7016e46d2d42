"""torchfim.forecast: inversion diagnostics against perturbation theory, and the confidence ellipses.

For ``F = [[1, ρ], [ρ, 1]]`` perturbed to ``F_ab (1 + ε g_ab)``, first-order perturbation theory
gives ``δσ_1/σ_1 = ε (2ρ² g_12 − g_11 − ρ² g_22) / (2(1 − ρ²))``: the amplification grows like
``1/(1 − ρ²)``, the unit-free condition number. The tests check the measured amplification
against that law, its linearity in ε, and the condition numbers against numpy.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from torchfim.errors import TorchfimError
from torchfim.forecast import (
    ONE_SIGMA,
    TWO_SIGMA,
    Forecast,
    delta_chi2,
    ellipse_points,
    inversion_diagnostics,
)

F64 = torch.float64


def _pair(rho: float, scales=(1.0, 1.0)) -> torch.Tensor:
    s = torch.tensor(scales, dtype=F64)
    return torch.tensor([[1.0, rho], [rho, 1.0]], dtype=F64) * s[:, None] * s[None, :]


def test_diagonal_fisher_is_stable_and_moves_by_half_the_perturbation():
    diag = inversion_diagnostics(torch.diag(torch.tensor([1.0, 1e-6, 1e6], dtype=F64)), eps=1e-4)
    # F diagonal: σ'_a/σ_a = (1 + ε g_aa)^(-1/2), so the amplification is about max|g|/2 over 300 normals.
    assert 0.3 < diag.amplification < 3
    assert not diag.unstable
    assert math.isclose(diag.condition_number, 1e12, rel_tol=1e-12)
    assert math.isclose(diag.unit_free_condition_number, 1.0, rel_tol=1e-12)


@pytest.mark.parametrize("rho", [0.9, 0.99, 0.999])
def test_amplification_follows_first_order_perturbation_theory(rho):
    # Units must not matter: the same correlation with scales 1e-5 and 1e5.
    diag = inversion_diagnostics(_pair(rho, (1e-5, 1e5)), eps=1e-6)
    # max over 100 trials of |2ρ²g12 − g11 − ρ²g22| / 2, a normal of s.d. √(1 + 5ρ⁴)/2 ≈ 1.2: in [1, 5]
    scaled = diag.amplification * (1 - rho**2)
    assert 1.0 < scaled < 5.0
    assert math.isclose(diag.unit_free_condition_number, (1 + rho) / (1 - rho), rel_tol=1e-9)


@pytest.mark.parametrize("rho", [0.0, 0.5, -0.9, 0.99])
def test_one_marginal_error_moves_as_the_documented_first_order_law(rho):
    """``δσ_1/σ_1 = ε (2ρ² g_12 − g_11 − ρ² g_22) / (2(1 − ρ²))`` for each entry perturbed alone (the docs had
    ``− g_22``: perturbing ``F_22`` of an uncorrelated pair cannot move ``σ_1 = 1/√F_11``), with units 1e-3 and 1e3."""
    eps, F = 1e-7, _pair(rho, (1e-3, 1e3))
    sigma = Forecast(F).marginal_errors()[0]
    for g11, g12, g22 in ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.3, -1.2, 0.7)):
        g = torch.tensor([[g11, g12], [g12, g22]], dtype=F64)
        moved = Forecast(F * (1 + eps * g)).marginal_errors()[0]
        law = eps * (2 * rho**2 * g12 - g11 - rho**2 * g22) / (2 * (1 - rho**2))
        assert float(moved / sigma - 1) == pytest.approx(law, rel=1e-4, abs=1e-12)


def test_relative_change_is_linear_in_eps_for_small_perturbations():
    F = _pair(0.95)
    small = inversion_diagnostics(F, eps=1e-7, generator=torch.Generator().manual_seed(3))
    smaller = inversion_diagnostics(F, eps=1e-8, generator=torch.Generator().manual_seed(3))
    assert math.isclose(small.max_relative_change / smaller.max_relative_change, 10.0, rel_tol=1e-3)


def test_unstable_flag_separates_mild_from_strong_degeneracy():
    assert not inversion_diagnostics(_pair(0.5)).unstable
    strong = inversion_diagnostics(_pair(0.99))  # 0.1% in F moves σ by ~10%
    assert strong.unstable and strong.max_relative_change > 0.05
    assert "UNSTABLE" in str(strong) and "stable" in str(inversion_diagnostics(_pair(0.5)))


def test_singular_fisher_is_unstable_with_infinite_condition_number():
    diag = Forecast(torch.ones(2, 2, dtype=F64)).diagnostics()
    assert diag.unstable and math.isinf(diag.max_relative_change) and math.isinf(diag.condition_number)


def test_condition_numbers_and_eigenvalues_match_numpy():
    g = torch.Generator().manual_seed(7)
    a = torch.randn(4, 4, generator=g, dtype=F64)
    F = a @ a.T + 0.1 * torch.eye(4, dtype=F64)
    diag = Forecast(F).diagnostics()
    assert math.isclose(diag.condition_number, float(np.linalg.cond(F.numpy())), rel_tol=1e-9)
    d = 1 / np.sqrt(np.diag(F.numpy()))
    unit_free = float(np.linalg.cond(F.numpy() * np.outer(d, d)))
    assert math.isclose(diag.unit_free_condition_number, unit_free, rel_tol=1e-9)
    assert np.allclose(diag.eigenvalues.numpy(), np.linalg.eigvalsh(F.numpy()), rtol=1e-12)


def test_default_generator_is_reproducible_and_a_seed_changes_the_draws():
    F = _pair(0.9)
    assert inversion_diagnostics(F).max_relative_change == inversion_diagnostics(F).max_relative_change
    other = inversion_diagnostics(F, generator=torch.Generator().manual_seed(99))
    assert other.max_relative_change != inversion_diagnostics(F).max_relative_change


@pytest.mark.parametrize("kwargs, match", [({"eps": 0.0}, "eps"), ({"n_trials": 0}, "n_trials"),
                                           ({"tolerance": -1.0}, "tolerance"),
                                           ({"generator": 3}, "generator must be a torch.Generator")])  # TypeError
def test_bad_diagnostics_input(kwargs, match):
    with pytest.raises(TorchfimError, match=match):
        inversion_diagnostics(_pair(0.5), **kwargs)


# ------------------------------------------------------------------------------------ ellipses
def test_sigma_levels_give_the_textbook_delta_chi2():
    assert math.isclose(delta_chi2(ONE_SIGMA), 2.2958, abs_tol=1e-4)
    assert math.isclose(delta_chi2(TWO_SIGMA), 6.1801, abs_tol=1e-4)
    with pytest.raises(TorchfimError, match="probability"):
        delta_chi2(1.0)


def test_ellipse_points_lie_on_the_contour_and_match_the_semi_axes():
    S = torch.tensor([[0.04, -0.03], [-0.03, 0.09]], dtype=F64)
    center = torch.tensor([1.0, -2.0], dtype=F64)
    pts = ellipse_points(S, center, level=TWO_SIGMA, n_points=4001)
    offset = pts - center
    quad = torch.einsum("ni,ij,nj->n", offset, torch.linalg.inv(S), offset)
    assert float((quad / delta_chi2(TWO_SIGMA) - 1).abs().max()) < 1e-12
    # Semi-major axis from the closed form for a 2x2 covariance (Coe 2009, eq. 2).
    sx2, sy2, sxy = 0.04, 0.09, -0.03
    a2 = (sx2 + sy2) / 2 + math.sqrt((sx2 - sy2) ** 2 / 4 + sxy**2)
    assert math.isclose(float(offset.norm(dim=1).max()), math.sqrt(delta_chi2(TWO_SIGMA) * a2), rel_tol=1e-6)


def test_plot_ellipse_draws_each_level_from_the_marginal_block():
    matplotlib = pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    F = torch.tensor([[4.0, 1.0, 0.5], [1.0, 3.0, 0.2], [0.5, 0.2, 2.0]], dtype=F64)
    fc = Forecast(F, theta0=torch.tensor([0.1, 0.2, 0.3], dtype=F64), names=["a", "b", "c"])
    ax = fc.plot_ellipse("a", "c", Figure().subplots(), color="k")
    ellipses = [line for line in ax.get_lines() if line.get_label().endswith("%")]
    assert [line.get_label() for line in ellipses] == ["68.3%", "95.4%"]
    assert [line.get_linestyle() for line in ellipses] == ["-", "--"]
    block = torch.linalg.inv(F)[[0, 2]][:, [0, 2]]
    expected = ellipse_points(block, [0.1, 0.3], TWO_SIGMA)
    assert np.allclose(ellipses[1].get_xydata(), expected.numpy(), rtol=1e-12, atol=1e-14)
    assert ax.get_xlabel() == "a" and ax.get_ylabel() == "c"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    new_ax = fc.plot_ellipse(0, 1)
    assert len(new_ax.get_lines()) == 3
    plt.close(new_ax.figure)
    with pytest.raises(TorchfimError, match="two different parameters"):
        fc.plot_ellipse("a", 0)


def test_plot_without_matplotlib_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(TorchfimError, match="pip install matplotlib"):
        Forecast(torch.eye(2, dtype=F64)).plot_ellipse(0, 1)


def test_forecast_imports_without_matplotlib():
    code = ("import sys; sys.modules['matplotlib'] = None; import torchfim.forecast as f, torch; "
            "print(f.Forecast(torch.eye(2, dtype=torch.float64)).marginal_errors().tolist())")
    out = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[1.0, 1.0]"


# ------------------------------------------------------------------------------ from a review
ASYMMETRIC = torch.tensor([[1.0, 5.0], [0.0, 1.0]], dtype=F64)
WITH_NAN = torch.tensor([[1.0, math.nan], [math.nan, 1.0]], dtype=F64)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: inversion_diagnostics(ASYMMETRIC), r"must be symmetric, but F − Fᵀ reaches 5.*\(F \+ F.T\) / 2"),
        (lambda: inversion_diagnostics(WITH_NAN), "non-finite entries"),
        (lambda: inversion_diagnostics(torch.ones(2, 3, dtype=F64)), r"square \(P, P\), got shape \(2, 3\)"),
        (lambda: inversion_diagnostics(torch.ones(3, dtype=F64)), r"square \(P, P\), got shape \(3,\)"),
        (lambda: inversion_diagnostics("F"), r"real \(P, P\) tensor"),
        (lambda: ellipse_points(torch.tensor([[1.0, 5.0], [-5.0, 1.0]], dtype=F64), [0.0, 0.0]),
         r"cov2 .* must be symmetric, but S − Sᵀ reaches 10"),
        (lambda: ellipse_points(WITH_NAN, [0.0, 0.0]), "cov2 .* non-finite entries"),
        (lambda: ellipse_points(torch.ones(2, 3, dtype=F64), [0.0, 0.0]), r"2x2 covariance.*shape \(2, 3\)"),
        (lambda: ellipse_points("S", [0.0, 0.0]), r"real \(P, P\) tensor"),
        (lambda: ellipse_points(torch.eye(2, dtype=F64), [0.0, 0.0, 0.0]), "center must be two finite numbers"),
        (lambda: ellipse_points(torch.eye(2, dtype=F64), [0.0, 0.0], n_points=-1), "n_points must be a positive"),
        (lambda: ellipse_points(torch.eye(2, dtype=F64), [0.0, 0.0], n_points=0), "n_points must be a positive"),
    ],
)
def test_matrices_that_are_no_fisher_or_covariance_are_refused(call, match):
    """Both symmetrised an asymmetric matrix silently (inversion_diagnostics even of NaN, ellipse_points drew the
    unit circle for [[1, 5], [−5, 1]]); non-square input, a centre of 3 and n_points ≤ 0 ended in bare errors."""
    with pytest.raises(TorchfimError, match=match):
        call()


def test_numpy_and_numbers_of_numpy_or_torch_are_accepted():
    """np.float32(0.68) and torch.tensor(0.68) were "not a probability"; a NumPy matrix raised AttributeError.
    Oracle: −2 ln(1 − p) in float64, and the diagnostics of the same matrix as a tensor."""
    assert delta_chi2(np.float32(0.68)) == -2 * math.log1p(-float(np.float32(0.68)))
    assert delta_chi2(torch.tensor(0.68, dtype=F64)) == -2 * math.log1p(-0.68)
    F = _pair(0.9)
    want = inversion_diagnostics(F, eps=1e-3, tolerance=0.01)
    got = inversion_diagnostics(F.numpy(), eps=np.float64(1e-3), n_trials=np.int64(100), tolerance=torch.tensor(0.01, dtype=F64))
    assert got.max_relative_change == want.max_relative_change and got.tolerance == 0.01
    assert torch.equal(got.eigenvalues, want.eigenvalues)


def test_plot_ellipse_takes_the_users_keywords_and_one_level():
    """label= ("multiple values"), ls= and c= (both the alias and the default) and levels=0.9 ("not iterable")
    raised TypeError. Now the user's keywords override the defaults, and a label names the innermost ellipse."""
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    fc = Forecast(_pair(0.5), theta0=torch.tensor([0.1, 0.2], dtype=F64), names=["a", "b"])
    ax = fc.plot_ellipse("a", "b", Figure().subplots(), label="mine", ls=":", c="red", lw=3)
    lines = ax.get_lines()
    assert [line.get_label() for line in lines[:2]] == ["mine", "_nolegend_"]
    assert all(line.get_linestyle() == ":" and line.get_color() == "red" for line in lines[:2])
    assert lines[0].get_linewidth() == 3 and lines[2].get_color() == "red"
    one = fc.plot_ellipse("a", "b", Figure().subplots(), levels=0.9).get_lines()
    assert [line.get_label() for line in one[:-1]] == ["90.0%"]
    block = torch.linalg.inv(_pair(0.5))
    assert np.allclose(one[0].get_xydata(), ellipse_points(block, [0.1, 0.2], 0.9).numpy(), rtol=1e-12, atol=1e-14)
    with pytest.raises(TorchfimError, match="both ls= and linestyle="):
        fc.plot_ellipse("a", "b", Figure().subplots(), ls=":", linestyle="-")
