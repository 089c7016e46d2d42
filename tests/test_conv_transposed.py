"""Transposed convolutions and 3-d convolutions on the convolution rule, against the dense oracle.

``z = convᵀ(x; W)`` is the adjoint of ``u ↦ conv(u; W)``: the rule takes its per-sample weight
gradients as that convolution's, with the roles of input and sensitivity swapped. The oracle is the
dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from torch.func Jacobians of the whole model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import assert_equals_dense, module_rules, torchfim_messages
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.engine.modules.conv import ConvRule


class _Decoder(nn.Module):
    """conv → tanh → transposed conv (``kw``) → tanh → flatten → Linear to 3 classes."""

    def __init__(self, dims: int, size: int, **kw: object) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[dims - 1]
        transposed = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)[dims - 1]
        self.down = conv(2, 4, 2, stride=2)
        self.up = transposed(4, 2, **kw)
        with torch.no_grad():
            out = self.up(self.down(torch.zeros(1, 2, *(size,) * dims)))
        self.head = nn.Linear(out.numel(), 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.up(torch.tanh(self.down(x)))).flatten(1))


SETTINGS = {
    "plain": dict(kernel_size=2),
    "strided": dict(kernel_size=3, stride=2, padding=1, output_padding=1),
    "dilated-groups": dict(kernel_size=2, stride=2, dilation=2, groups=2, bias=False),
}


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("structure", ["diag", "blocks"])
def test_transposed_and_3d_convolutions_equal_the_dense_oracle_on_the_conv_rule(dims: int, setting: str,
                                                                              structure: str) -> None:
    torch.manual_seed(dims)
    size = 6 if dims < 3 else 4
    model = _Decoder(dims, size, **SETTINGS[setting]).double().eval()
    x = torch.randn(5, 2, *(size,) * dims, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure=structure)
    assert torchfim_messages(caught) == []
    assert_equals_dense(got, exact_fisher(model, x, "categorical"), model, structure)
    backend, rules = module_rules(model, x)
    assert not backend.moved and isinstance(rules["up"], ConvRule) and isinstance(rules["down"], ConvRule)


def test_score_diagonal_of_a_transposed_convolution_is_its_empirical_fisher_at_the_drawn_labels() -> None:
    """The score estimator's per-sample gradients (not only the squares of the exact path)."""
    torch.manual_seed(7)
    model, x = _Decoder(2, 6, **SETTINGS["strided"]).double().eval(), torch.randn(6, 2, 6, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 2, 1, 0])
    got = torchfim.fisher(model, x, estimator="empirical", targets=y, structure="diag")
    want = torchfim.fisher(model, x, estimator="empirical", targets=y, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
