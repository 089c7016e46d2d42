"""torchfim.forecast.scan_steps on models whose derivatives are known in closed form.

Every stencil derivative is compared with the analytic one (error measured in the Fisher norm the
scan itself uses, ‖D‖² = ∂μᵀC⁻¹∂μ + ½ tr(C⁻¹∂C C⁻¹∂C)): steps on the plateau must be accurate, the
flagged ones must not be, and the plateau's upper end must sit where the stencil's leading
truncation term predicts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchfim.errors import TorchfimError
from torchfim.forecast import forecast, gaussian_fisher, scan_steps

F64 = torch.float64
THETA0 = torch.tensor([0.3, 1.2], dtype=F64)
NOISE = torch.tensor([0.5, 1.0, 2.0], dtype=F64)


def _mean(t):
    return torch.stack([t[0].exp(), t[1].sin(), t[0] * t[1] ** 2])


def _cov(t):
    return torch.diag(NOISE * torch.stack([t[0].exp(), 1 + t[1] ** 2, torch.ones((), dtype=t.dtype)]))


def _exact_derivatives(a: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = float(THETA0[0]), float(THETA0[1])
    if a == 0:
        mean, cov_diagonal = [math.exp(x), 0.0, y**2], [math.exp(x), 0.0, 0.0]
    else:
        mean, cov_diagonal = [0.0, math.cos(y), 2 * x * y], [0.0, 2 * y, 0.0]
    return torch.tensor(mean, dtype=F64), torch.diag(NOISE * torch.tensor(cov_diagonal, dtype=F64))


def _errors(scan, a: int) -> torch.Tensor:
    """Relative error of the derivative with each step, in the Fisher norm."""
    mean_true, cov_true = _exact_derivatives(a)
    p = scan[a]
    diff = gaussian_fisher(p.mean_derivatives - mean_true, _cov(THETA0), p.cov_derivatives - cov_true)
    size = gaussian_fisher(mean_true[None], _cov(THETA0), cov_true[None])
    return (torch.diagonal(diff) / size[0, 0]).sqrt()


@pytest.mark.parametrize("stencil, best", [("stencil3", 1e-9), ("stencil5", 1e-11)])
def test_plateau_holds_the_accurate_steps_and_the_chosen_one_is_best(stencil, best):
    scan = scan_steps(_mean, _cov, THETA0, stencil=stencil)
    assert scan.found
    for a in range(2):
        errors, p = _errors(scan, a), scan[a]
        on_plateau = ~(p.round_off | p.truncation)
        assert float(errors[on_plateau].max()) < 3 * p.rtol
        chosen = int((p.steps == p.step).nonzero())
        assert bool(on_plateau[chosen]) and float(errors[chosen]) < best
        assert math.isclose(float(p.information[chosen]), float(gaussian_fisher(*_as_rows(a))[0, 0]), rel_tol=1e-9)


def _as_rows(a: int):
    mean_true, cov_true = _exact_derivatives(a)
    return mean_true[None], _cov(THETA0), cov_true[None]


@pytest.mark.parametrize("stencil", ["stencil3", "stencil5"])
def test_too_small_step_is_flagged_round_off_and_too_large_truncation(stencil):
    scan = scan_steps(_mean, _cov, THETA0, stencil=stencil)
    for a in range(2):
        errors, p = _errors(scan, a), scan[a]
        s = float(THETA0[a].abs().clamp_min(1))
        tiny = int((p.steps - 1e-12 * s).abs().argmin())
        huge = int((p.steps - s).abs().argmin())
        assert bool(p.round_off[tiny]) and not bool(p.truncation[tiny])
        assert bool(p.truncation[huge]) and not bool(p.round_off[huge])
        # and they are flagged for a reason: their derivatives are wrong well beyond rtol
        assert float(errors[tiny]) > 3 * p.rtol and float(errors[huge]) > 1e3 * p.rtol
        # flags are ordered: round-off below the plateau, truncation above it
        lo, hi = p.plateau
        assert p.round_off.nonzero().flatten().tolist() == list(range(lo))
        assert p.truncation.nonzero().flatten().tolist() == list(range(hi + 1, len(p.steps)))


@pytest.mark.parametrize("stencil, constant", [("stencil3", (10 - 1) / 6), ("stencil5", (100 - 1) / 30)])
def test_plateau_ends_where_the_truncation_term_reaches_rtol(stencil, constant):
    # For f = exp, |D(√10 h) − D(h)| / |D| ≈ constant · h^m (m = 2 or 4): the leading truncation term.
    order = 2 if stencil == "stencil3" else 4
    scan = scan_steps(torch.exp, torch.eye(1, dtype=F64), torch.tensor([0.5], dtype=F64), stencil=stencil)
    p = scan[0]
    predicted_ok = constant * p.steps[:-1] ** order <= p.rtol  # pair (h, √10 h) agrees to rtol
    last_pair = int(predicted_ok.nonzero().max())
    assert p.plateau[1] == last_pair + 1
    assert 1e-12 < float(p.steps[p.plateau[0]]) < 1e-8  # round-off ~ ε/h reaches 1e-6 near h ~ 1e-10


def test_scanned_steps_give_a_forecast_as_good_as_autograd():
    scan = scan_steps(_mean, _cov, THETA0, stencil="stencil5", names=["x", "y"])
    numeric = forecast(_mean, _cov, THETA0, derivatives=scan.stencil, step=scan.steps).fisher
    exact = forecast(_mean, _cov, THETA0).fisher
    assert float((numeric - exact).abs().max() / exact.abs().max()) < 1e-11
    assert scan["y"] is scan[1]
    text, table = str(scan), scan["x"].table()
    assert "x" in text and "y" in text and "NONE" not in text
    assert "round-off" in table and "truncation" in table and "<- chosen" in table


def test_noisy_model_has_no_plateau():
    def noisy(t):  # θ plus pseudo-random noise of size 1e-3 that varies on scales of 1e-13
        return t + 1e-3 * torch.frac(torch.sin(t * 1e8) * 43758.5453)

    scan = scan_steps(noisy, torch.eye(1, dtype=F64), torch.tensor([0.7], dtype=F64))
    p = scan[0]
    assert not p.found and not scan.found
    assert p.plateau[0] == p.plateau[1]
    assert "NONE FOUND" in str(scan)


def test_explicit_step_grids():
    steps = torch.tensor([1e-1, 1e-4, 1e-7], dtype=F64)
    scan = scan_steps(_mean, _cov, THETA0, steps=steps)
    assert torch.equal(scan[0].steps, steps.sort().values)
    per_parameter = torch.stack([steps, steps * 2])
    assert torch.equal(scan_steps(_mean, _cov, THETA0, steps=per_parameter)[1].steps, (steps * 2).sort().values)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"stencil": "autograd"}, "unknown stencil"),
        ({"rtol": 0.0}, "rtol"),
        ({"steps": torch.tensor([1e-3, 1e-4])}, "at least 3"),
        ({"steps": torch.tensor([1e-3, -1e-4, 1e-5])}, "positive"),
        # a step given twice agreed with itself exactly: 0.5, 0.5, 0.5 was a plateau (found=True) at a step far too large
        ({"steps": torch.tensor([0.5, 0.5, 0.5])}, "steps must be distinct"),
        ({"steps": torch.tensor([1e-5, 0.3, 0.5, 0.3])}, "steps must be distinct"),
        ({"steps": torch.ones(3, 4)}, r"shape \(2, K"),
    ],
)
def test_bad_scan_input(kwargs, match):
    with pytest.raises(TorchfimError, match=match):
        scan_steps(_mean, _cov, THETA0, **kwargs)


def test_rtol_may_be_a_numpy_number_or_a_0_dim_tensor():
    """np.float64(1e-6) and torch.tensor(1e-6) were refused as "must be a relative change in (0, 1)".
    Oracle: the scan with the same rtol as a float."""
    want = scan_steps(_mean, _cov, THETA0, rtol=1e-6)
    for rtol in (np.float64(1e-6), torch.tensor(1e-6, dtype=F64)):
        got = scan_steps(_mean, _cov, THETA0, rtol=rtol)
        assert torch.equal(got.steps, want.steps) and got[0].rtol == 1e-6


# ------------------------------------------------------------- steps lost to rounding (user trial)
LINE = torch.linspace(0, 1, 10, dtype=F64)
LINE_INFORMATION = float((LINE**2).sum())  # F_aa = Σ x_i² for μ = θ·x with unit noise: 3.5185…


@pytest.mark.parametrize("dtype, offset", [(torch.float32, 0.0), (F64, 1e9)])
def test_steps_lost_to_rounding_are_round_off_and_never_chosen(dtype, offset):
    """μ = offset + θ·x at θ = 1. Below some step, θ ± h rounds back to θ (float32) or the change of μ is below
    μ's rounding (float64, μ ≈ 1e9): the stencil derivative is exactly 0 at every such step. Before, those zeros
    "agreed" with each other, formed the longest plateau, and the scan chose h = 1e-12 with F_aa = 0 and
    found=True. Oracle: the analytic F_aa = Σ x² at the chosen step; every step with a zero derivative, or where
    θ + h == θ in the dtype, flagged round-off."""
    x = LINE.to(dtype)
    scan = scan_steps(lambda t: offset + t[0] * x, torch.eye(10, dtype=dtype), torch.tensor([1.0], dtype=dtype))
    p = scan[0]
    assert scan.found and p.found
    chosen = int((p.steps == p.step).nonzero())
    assert math.isclose(float(p.information[chosen]), LINE_INFORMATION, rel_tol=1e-5)
    lost = (p.information == 0) | torch.tensor([float(torch.tensor(1.0, dtype=dtype) + h) == 1.0 for h in p.steps])
    assert int(lost.sum()) >= 8 and bool(p.round_off[lost].all()) and not bool(p.resolved[lost].any())
    assert not bool(lost[p.plateau[0]:p.plateau[1] + 1].any())
    # the round-off steps are labelled so in the table, the plateau's are not
    lines = p.table().splitlines()[1:]
    assert all(line.split()[3] == "round-off" for line, gone in zip(lines, lost.tolist(), strict=True) if gone)
    # and the chosen steps give the right forecast (before: "no Fisher information … autograd lost track of it")
    fc = forecast(lambda t: offset + t[0] * x, torch.eye(10, dtype=dtype), torch.tensor([1.0], dtype=dtype),
                  derivatives="stencil3", step=scan.steps)
    assert math.isclose(float(fc.fisher[0, 0]), LINE_INFORMATION, rel_tol=1e-5)
    assert p.reason == ""


def test_no_resolved_step_is_no_plateau_with_a_reason():
    """μ = 1e20 + θ·x in float64: no step up to θ's size moves μ beyond its rounding (ulp of 1e20 ≈ 1.6e4), so
    every derivative is 0. Before: found=True and a step of 1e-12. Now: found=False, every step round-off, a
    reason that names the rounding, and asking for the steps raises it."""
    scan = scan_steps(lambda t: 1e20 + t[0] * LINE, torch.eye(10, dtype=F64), torch.tensor([1.0], dtype=F64))
    p = scan[0]
    assert not scan.found and not p.found and not bool(p.resolved.any()) and bool(p.round_off.all())
    assert "rounding error at every step" in p.reason and "NONE FOUND" in str(scan)
    with pytest.raises(TorchfimError, match="no step can be chosen for parameter 'θ\\[0\\]'.*rounding"):
        _ = scan.steps


def test_a_step_that_rounds_back_to_theta_is_refused_by_the_stencils():
    """θ = 1 in float32 with h = 1e-12: θ ± h == θ, the stencil's derivative is 0, and the forecast then said
    "no Fisher information … autograd lost track of it". Now the step itself is refused, with the fix."""
    with pytest.raises(TorchfimError, match="below the resolution of torch.float32.*scan_steps finds one"):
        forecast(lambda t: t[0] * LINE.float(), torch.eye(10), torch.tensor([1.0]), derivatives="stencil3", step=1e-12)


@pytest.mark.parametrize("stencil", ["stencil3", "stencil5"])
def test_the_stencils_divide_by_the_step_that_theta_takes(stencil):
    """μ = θ·x in float32 at θ = 3.3 with h = 1e-3: θ + h rounds to θ + h', |h' − h| up to ulp(θ)/2 = 1.2e-7, so
    dividing by h (as before) put F_aa = (∂μ)ᵀ∂μ off by up to 2·1.2e-7/1e-3 per point (measured 1.5e-4 relative
    with stencil3, 3.8e-4 with stencil5). The stencil's points lie k·h' from θ: dividing by h' leaves only the
    rounding of μ = θ·x itself (measured 3e-8)."""
    x = LINE.float()
    fc = forecast(lambda t: t[0] * x, torch.eye(10), torch.tensor([3.3]), derivatives=stencil, step=1e-3)
    assert math.isclose(float(fc.fisher[0, 0]), LINE_INFORMATION, rel_tol=1e-5)


def test_steps_at_which_the_model_is_nan_are_unresolved_not_an_error():
    """gaussian_fisher refuses NaN derivatives; the scan reads a step whose points leave the model's domain as
    unresolved (√(θ − 0.4999) at θ = 0.5: NaN for h > 1e-4). Oracle: autograd's F_aa = Σx²/(4(θ − 0.4999))."""
    x = torch.linspace(0, 1, 4, dtype=F64)
    theta = torch.tensor([0.5], dtype=F64)
    scan = scan_steps(lambda t: torch.sqrt(t[0] - 0.4999) * x, torch.eye(4, dtype=F64), theta)
    assert scan.found and not bool(scan[0].resolved[-1])
    chosen = scan[0].information[scan[0].steps == scan.steps[0]]
    assert abs(float(chosen) / float(x.square().sum() / (4 * 1e-4)) - 1) < 1e-6
