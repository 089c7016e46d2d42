"""Parameters of unusual layouts are the same parameters: a weight stored transposed (non-contiguous), one whose
elements share memory (stride 0, ``nn.Parameter(w.expand(5, 4))``) and one that views another's storage give the
Fisher and Î2's variance of the model with ordinary copies of them. The functional backend's second derivatives
refused the stride-0 weight with torch's bare "more than one element of the written-to tensor refers to a single
memory location". The oracle is the float64 Jacobian and Hessian of :mod:`oracles` on the ordinary copy."""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import assert_hessian_variance_is_the_oracles, exact_fisher, variance_oracle
from torch import nn

import torchfim


def _pair(kind: str) -> tuple[nn.Module, nn.Module]:
    """(the model with the unusual parameter, the same model with an ordinary contiguous copy of it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    w = model[0].weight.detach()
    if kind == "transposed":
        model[0].weight = nn.Parameter(w.t().contiguous().t())
    elif kind == "stride-0":
        model[0].weight = nn.Parameter(w[:1].expand(5, 4))
    else:  # the second layer's bias views a row of the first layer's weight
        model[2].bias = nn.Parameter(w[1, :3])
    plain = copy.deepcopy(model)
    plain[0].weight = nn.Parameter(model[0].weight.detach().clone())
    plain[2].bias = nn.Parameter(model[2].bias.detach().clone())
    return model, plain


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("kind", ["transposed", "stride-0", "view"])
def test_a_parameter_of_an_unusual_layout_has_the_oracles_fisher_and_variance(kind: str, backend: str) -> None:
    model, plain = _pair(kind)
    x = torch.randn(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oracle = variance_oracle(plain, x, "categorical", 1)
    full = torchfim.fisher(model, x, structure="full", backend=backend)
    assert torch.allclose(full, exact_fisher(plain, x, "categorical"), rtol=1e-10, atol=1e-15)
    assert_hessian_variance_is_the_oracles(model, x, oracle, backend)
    estimates = [torchfim.fisher(m, x, estimator="hessian", n_samples=2, backend=backend,
                                 generator=torch.Generator().manual_seed(2)) for m in (model, plain)]
    assert torch.allclose(estimates[0], estimates[1], rtol=1e-10, atol=1e-15)
