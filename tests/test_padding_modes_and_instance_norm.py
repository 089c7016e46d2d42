"""Convolutions that pad their input themselves, and InstanceNorm with affine parameters, on their rules.

Reflect, replicate and circular padding, and ``padding='same'`` (asymmetric where the kernel's extent is
even), make a convolution the same linear map of its padded input: the convolution rule pads the recorded
input the same way. InstanceNorm with ``affine=True`` is ``x̂ ⊙ γ + β`` per channel, ``x̂`` by each
sample's own statistics (or the running ones, where it tracks them in eval mode): the norm rule. Before,
each went to the generic rule. The oracle is the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of :mod:`oracles`.
"""

from __future__ import annotations

import pytest
import torch
from engine_checks import assert_matches_functional, assert_quietly_equals_dense
from torch import nn

from torchfim.engine.modules.conv import ConvRule
from torchfim.engine.modules.norm import NormRule

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
INSTANCE = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
PADDINGS = {
    "reflect": dict(kernel_size=3, padding=1, padding_mode="reflect"),
    "replicate": dict(kernel_size=3, padding=2, padding_mode="replicate", stride=2),
    "circular": dict(kernel_size=3, padding=1, padding_mode="circular", groups=2),
    "same-even": dict(kernel_size=4, padding="same"),
    "same-dilated-reflect": dict(kernel_size=3, padding="same", dilation=2, padding_mode="reflect"),
}


class _Net(nn.Module):
    """layer → tanh → (InstanceNorm) → flatten → Linear to ``classes``."""

    def __init__(self, dims: int, size: int, classes: int, norm: dict | None = None, **conv: object) -> None:
        super().__init__()
        self.conv = CONV[dims - 1](2, 4, **conv)
        self.norm = INSTANCE[dims - 1](4, affine=True, **norm) if norm is not None else nn.Identity()
        with torch.no_grad():
            out = self.norm(self.conv(torch.zeros(2, 2, *(size,) * dims)))
        self.head = nn.Linear(out[0].numel(), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.conv(x))).flatten(1))


def _model(dims: int, classes: int = 3, norm: dict | None = None, **conv: object) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(dims)
    size = 6 if dims < 3 else 4
    model = _Net(dims, size, classes, norm, **conv).double()
    if norm is not None:
        with torch.no_grad():  # affine parameters and running statistics away from their defaults
            model.norm.weight.uniform_(0.5, 1.5)
            model.norm.bias.normal_()
            if norm.get("track_running_stats"):
                model.norm.running_mean.normal_()
                model.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(5, 2, *(size,) * dims, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    return model.eval(), x


def _assert_quietly_on_rules(model: nn.Module, x: torch.Tensor, structure: str, rules: dict[str, type]) -> None:
    backend, found = assert_quietly_equals_dense(model, x, structure)
    assert {path: type(found[path]) for path in rules} == rules and not backend.moved and not backend.demoted


@pytest.mark.parametrize("classes", [3, 8], ids=["grouped-gradient", "patches"])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("padding", list(PADDINGS))
def test_convolutions_that_pad_their_input_keep_the_conv_rule(padding: str, dims: int, classes: int) -> None:
    """Diagonal (both of the rule's ways to square: the grouped weight gradient, and the patches it builds
    for 7 vectors) and blocks, against the dense oracle."""
    settings = dict(PADDINGS[padding])
    if dims == 3 and padding == "same-dilated-reflect":
        settings["dilation"] = 1  # a 4-wide input cannot reflect a padding of 2
    model, x = _model(dims, classes, **settings)
    for structure in ("diag", "blocks"):
        _assert_quietly_on_rules(model, x, structure, {"conv": ConvRule})


@pytest.mark.parametrize("track", [False, True], ids=["own-statistics", "running-statistics"])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_instance_norm_with_affine_parameters_keeps_the_norm_rule(dims: int, track: bool) -> None:
    model, x = _model(dims, norm=dict(track_running_stats=track), kernel_size=3, padding=1)
    for structure in ("diag", "full"):
        _assert_quietly_on_rules(model, x, structure, {"conv": ConvRule, "norm": NormRule})


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_padded_convolutions_and_instance_norm_give_the_whole_model_backends_estimators(estimator: str) -> None:
    model, x = _model(2, norm=dict(), **PADDINGS["circular"])
    assert_matches_functional(model, x, estimator, torch.randint(0, 3, (len(x),)))
