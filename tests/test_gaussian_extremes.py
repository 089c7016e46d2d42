"""A Gaussian family whose fixed σ puts 1/σ² beyond float32: the Î2 bound refused with torchfim's message (before, a
bare ``RuntimeError: value cannot be converted to type float without overflow`` from ``torch.full``), and in float64,
where it fits, the bound against the Hessians of the outputs by brute force; a σ whose variances (1/σ⁴) underflow
float32 warned of, against the closed form of samples_needed in float64."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import Flat
from torch import nn

import torchfim
from torchfim.families import Gaussian


def _model(dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)
    return model, torch.randn(5, 3, dtype=dtype)


@pytest.mark.parametrize("structure", ["diag", "trace"])
def test_hessian_bound_beyond_float32_is_refused_by_name(structure: str) -> None:
    model, x = _model(torch.float32)
    with pytest.raises(torchfim.TorchfimError, match="non-finite"), pytest.warns(RuntimeWarning, match="refused"):
        torchfim.variance_bound(model, x, Gaussian(sigma=1e-30), "hessian", structure)


def test_hessian_bound_at_tiny_sigma_in_float64_against_brute_force() -> None:
    """``Λ = I/σ²``: the spectral bound ``λ_max(Λ)‖h_pp‖²`` is the variance itself, ``Σᵢ ‖∇²_θ o(xᵢ)_pp‖²/(σ²n²)``."""
    model, x = _model(torch.float64)
    sigma = 1e-30
    hessians = Flat(model).output_hessians(x)  # (n, C, P, P)
    along = torch.diagonal(hessians, dim1=-2, dim2=-1)  # (n, C, P)
    want = along.square().sum((0, 1)) / sigma**2 / len(x) ** 2
    got = torchfim.variance_bound(model, x, Gaussian(sigma=sigma), "hessian", "diag")
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    traces = along.sum(-1)  # d_a = tr ∇²_θ o_a
    got_trace = torchfim.variance_bound(model, x, Gaussian(sigma=sigma), "hessian", "trace")
    assert float(got_trace) == pytest.approx(float(traces.square().sum() / sigma**2 / len(x) ** 2), rel=1e-12)


def test_variances_beyond_float32_are_warned_of() -> None:
    """σ = 1e15 with a float32 model: the Fisher (1/σ² = 1e-30) fits, but the variances (1/σ⁴ = 1e-60) underflow to
    0, and ``samples_needed`` said 1 where the float64 model and the closed form say 21, without a warning (now
    warned of, naming σ and the dtype)."""
    model, x = _model(torch.float64)
    model = model[2:]  # one Linear layer: Var(Tr Î1) = 2‖K‖²_F/σ⁴ per input (K = JJᵀ), Tr F = tr K/σ²
    x = torch.tanh(torch.randn(5, 4, dtype=torch.float64))
    sigma, rel_error = 1e15, 0.1
    jac = Flat(model).jacobians(x)  # (n, C, P)
    grams = jac @ jac.transpose(1, 2)
    n = len(x)
    variance = 2 * grams.square().sum() / sigma**4 / n**2
    trace = torch.diagonal(grams, dim1=-2, dim2=-1).sum() / sigma**2 / n
    want = int(torch.ceil(variance / (rel_error * trace) ** 2))
    assert torchfim.samples_needed(model, x, Gaussian(sigma=sigma), rel_error=rel_error) == want
    with pytest.warns(RuntimeWarning, match=r"sigma=1e\+15.*float32.*1/σ⁴ = 1e-60.*come out 0.*float64"):
        torchfim.samples_needed(model.float(), x.float(), Gaussian(sigma=sigma), rel_error=rel_error)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchfim.samples_needed(model.float(), x.float(), Gaussian(sigma=1e3), rel_error=rel_error)
