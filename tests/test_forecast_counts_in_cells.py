"""Multi-tracer counts in cells: the generic forecast against the closed form, FKP, and simulation.

Three independent routes meet here: the library's generic Gaussian Fisher matrix (autograd or
stencils through ``CountsInCells.covariance``), the closed form of ``multi_tracer_fisher`` (derived
by hand, docs/forecast.md), and the Hessian of the Gaussian KL divergence by torch.func. The
covariance model itself is checked on simulated Poisson counts, with a tolerance set by the
simulation's own standard errors.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from torchfim.errors import TorchfimError
from torchfim.forecast import CountsInCells, fkp_fisher, multi_tracer_fisher, scan_steps

F64 = torch.float64
ROOT = Path(__file__).resolve().parents[1]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


THREE = CountsInCells(densities=[500.0, 100.0, 20.0], biases=[1.0, 2.0, 3.0], power=0.01)


@pytest.mark.parametrize("derivatives, tol", [("autograd", 1e-13), ("stencil5", 1e-11), ("stencil3", 1e-9)])
def test_generic_forecast_reproduces_the_closed_form(derivatives, tol):
    closed = multi_tracer_fisher(THREE.densities, THREE.biases, THREE.power)
    assert _rel(THREE.forecast(derivatives=derivatives).fisher, closed) < tol


def test_closed_form_equals_the_kl_hessian():
    c0 = THREE.covariance(THREE.theta0)

    def kl(t):  # zero means: only the covariance part of KL(N(0, C0) ‖ N(0, C(θ)))
        c = THREE.covariance(t)
        return 0.5 * (torch.logdet(c) + torch.trace(torch.linalg.solve(c, c0)))

    hessian = torch.func.hessian(kl)(THREE.theta0)
    assert _rel(multi_tracer_fisher(THREE.densities, THREE.biases, THREE.power), hessian) < 1e-12


@pytest.mark.parametrize("derivatives", ["autograd", "stencil5"])
@pytest.mark.parametrize("density, bias, power", [(500.0, 1.0, 0.01), (3.0, 1.7, 0.2), (1e4, 0.8, 1e-5)])
def test_single_tracer_is_the_fkp_formula(derivatives, density, bias, power):
    cells = CountsInCells([density], [bias], power)
    step = None
    if derivatives == "stencil5":  # the workflow the docs recommend: scan, then use the plateau steps
        step = scan_steps(torch.zeros(1, dtype=F64), cells.covariance, cells.theta0, stencil="stencil5").steps
    fc = cells.forecast(derivatives=derivatives, step=step)
    x = density * bias**2 * power
    expected = fkp_fisher(x)
    assert abs(float(fc.fix("ln b1").fisher) / float(expected) - 1) < 1e-10
    # ln b enters C only through b², so its information is that of ln P times 2² ...
    assert abs(float(fc.fix("ln P").fisher) / float(4 * expected) - 1) < 1e-10
    # ... and the two are exactly degenerate: the diagnostics must say so.
    assert fc.diagnostics().unstable
    with pytest.raises(TorchfimError, match="singular"):
        fc.covariance()


def test_multi_tracer_reduces_to_fkp_when_other_tracers_vanish():
    fc = CountsInCells([500.0, 1e-12, 1e-12], [1.0, 2.0, 3.0], 0.01).forecast()
    amplitude = fc.fix("ln b1", "ln b2", "ln b3")
    assert abs(float(amplitude.fisher) / float(fkp_fisher(5.0)) - 1) < 1e-10


def test_tracers_with_equal_bias_add_their_densities():
    # Two tracers of the same bias carry, about ln P, exactly the information of their union.
    split = CountsInCells([300.0, 200.0], [1.5, 1.5], 0.02).forecast().fix("ln b1", "ln b2")
    merged = CountsInCells([500.0], [1.5], 0.02).forecast().fix("ln b1")
    assert abs(float(split.fisher) / float(merged.fisher) - 1) < 1e-12


def test_degenerate_direction_is_the_null_space():
    # Scaling P by e^{2t} and every bias by e^{-t} leaves C unchanged.
    direction = torch.tensor([-1.0, -1.0, -1.0, 2.0], dtype=F64)
    F = THREE.forecast().fisher
    assert float((F @ direction).abs().max()) < 1e-12 * float(F.abs().max())


def test_bias_ratio_error_falls_like_one_over_root_density_while_a_bias_saturates():
    def errors(scale):
        fc = CountsInCells([500.0 * scale, 100.0 * scale], [1.0, 2.0], 0.01).forecast().fix("ln P")
        ratio = torch.tensor([1.0, -1.0], dtype=F64)
        return float(fc.marginal_errors()[0]), float(ratio @ fc.covariance() @ ratio) ** 0.5

    (b_10, r_10), (b_1000, r_1000) = errors(10.0), errors(1000.0)
    assert abs(r_10 / r_1000 / 10 - 1) < 0.01            # ∝ 1/√n̄: no cosmic-variance floor
    assert abs(b_1000 - 0.5**0.5) < 1e-3 and b_10 / b_1000 < 1.02  # floor: 1ᵀF1 → 2 per cell


def test_simulated_counts_have_the_model_covariance():
    cells = CountsInCells(densities=[500.0, 100.0, 20.0], biases=[1.0, 1.5, 2.0], power=0.01)
    counts = cells.sample(100_000, generator=torch.Generator().manual_seed(1))
    centred = counts - counts.mean(0)
    products = centred[:, :, None] * centred[:, None, :]
    simulated = products.mean(0)
    stderr = products.std(0) / len(counts) ** 0.5
    model = cells.covariance(cells.theta0)
    pulls = (simulated - model) / stderr
    assert float(pulls.abs().max()) < 4.5  # 6 distinct entries, each within 4.5 standard errors
    assert torch.allclose(counts.mean(0), cells.densities, rtol=0.01)


def test_sampling_refuses_rates_that_could_go_negative():
    with pytest.raises(TorchfimError, match="too large"):
        CountsInCells([10.0], [3.0], 0.1).sample(10, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "args, match",
    [(([1.0, 2.0], [1.0], 0.1), "one entry per tracer"), (([1.0], [-1.0], 0.1), "positive"),
     (([1.0], [1.0], 0.0), "power"),
     # from a review: non-finite biases and power gave an all-NaN matrix, and forecast() blamed a theta0
     (([100.0], [math.inf], 0.01), r"biases must be positive and finite, got \[100.0\] and \[inf\]"),
     (([100.0], [math.nan], 0.01), "biases must be positive and finite"),
     (([100.0], [1.0], math.inf), "power must be a positive finite number"),
     (([100.0], [1.0], math.nan), "power must be a positive finite number")],
)
def test_bad_tracers(args, match):
    with pytest.raises(TorchfimError, match=match):
        CountsInCells(*args)


def test_bad_tracers_are_refused_by_the_closed_forms_too():
    """multi_tracer_fisher returned all NaN for an infinite bias or power; fkp_fisher(−1) was inf and fkp_fisher(−0.5)
    0.5 (a negative n̄P, information out of nothing); sample(−1) raised a bare RuntimeError."""
    with pytest.raises(TorchfimError, match="biases must be positive and finite"):
        multi_tracer_fisher(torch.tensor([100.0]), torch.tensor([math.inf]), 0.01)
    with pytest.raises(TorchfimError, match="power must be a positive finite number"):
        multi_tracer_fisher(torch.tensor([100.0]), torch.tensor([1.0]), math.inf)
    for bad in (-1.0, -0.5, math.inf, math.nan, torch.tensor([1.0, -1.0])):
        with pytest.raises(TorchfimError, match=r"signal_to_noise \(n̄P, or n̄b²P\) must be finite and non-negative"):
            fkp_fisher(bad)
    assert float(fkp_fisher(0.0)) == 0.0 and float(fkp_fisher(3.0)) == 0.5 * (3 / 4) ** 2
    # a 0-dim tensor is a power as good as a float (errors.real_number); oracle: the same model from the float
    assert torch.equal(multi_tracer_fisher(torch.tensor([100.0]), torch.tensor([1.0]), torch.tensor(0.01, dtype=F64)),
                       multi_tracer_fisher(torch.tensor([100.0]), torch.tensor([1.0]), 0.01))
    with pytest.raises(TorchfimError, match="n_cells must be a non-negative integer"):
        CountsInCells([100.0], [1.0], 0.01).sample(-1, torch.Generator())


def test_example_runs_and_reports_the_fkp_limit(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    script = ROOT / "examples" / "forecast_counts_in_cells.py"
    proc = subprocess.run([sys.executable, str(script)], check=False, cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "UNSTABLE" in out and "stencil5 step scan" in out
    fkp_lines = [line for line in out.splitlines() if "FKP" in line]
    assert len(fkp_lines) == 2
    assert all(float(line.rsplit("difference", 1)[1]) < 1e-10 for line in fkp_lines)
    assert list(tmp_path.iterdir()) == []  # writes nothing unless asked
