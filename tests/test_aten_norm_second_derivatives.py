"""Second derivatives through ``torch.instance_norm`` and ``torch.native_layer_norm`` called directly (not through
``F.instance_norm``/``F.layer_norm``, which torchfim already runs as composites): torch's forward-mode rules of both
are not differentiated correctly in forward mode, and the Î2 variance of a Linear before either came out silently
wrong (on these models up to 750 % and 920 % in an entry, 180 % and 110 % in the trace). The oracle is :mod:`oracles`' float64 ``∇²_θ o``."""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import assert_hessian_variance_is_the_oracles, variance_oracle
from torch import nn

from torchfim.engine.composites import native_layer_norm


def test_native_layer_norm_gives_torchs_value_mean_and_rstd() -> None:
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 3, 4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64), None
    for got, want in zip(native_layer_norm(x, (4, 5), w, b, 1e-3), torch.native_layer_norm(x, (4, 5), w, b, 1e-3)):
        assert got.shape == want.shape
        assert torch.allclose(got, want, rtol=0, atol=1e-12)


class _Net(nn.Module):
    """Linear → (2, 3) → a direct aten norm → tanh → Linear head."""

    def __init__(self, norm: str) -> None:
        super().__init__()
        self.first, self.head, self.norm = nn.Linear(4, 6), nn.Linear(6, 3), norm
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x).reshape(-1, 2, 3)
        if self.norm == "instance":
            h = torch.instance_norm(h, None, None, None, None, True, 0.1, 1e-5, False)
        else:
            h = torch.native_layer_norm(h, (3,), self.scale, None, 1e-5)[0]
        return self.head(torch.tanh(h).flatten(1))


@pytest.mark.parametrize("norm", ["instance", "layer"])
@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_the_hessian_variance_through_a_direct_aten_norm_is_the_oracles(norm: str, backend: str) -> None:
    torch.manual_seed(0)
    model = _Net(norm).double()
    x = torch.randn(5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    oracle = variance_oracle(copy.deepcopy(model), x, "categorical", 1)
    assert_hessian_variance_is_the_oracles(model, x, oracle, backend)
