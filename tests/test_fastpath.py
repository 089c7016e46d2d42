"""The per-layer fast path gives the same results as the general torch.func path (issue 5, point 2)."""

from __future__ import annotations

import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, relu_mlp, tanh_mlp, tiny_cnn
from oracles import FAMILY_WIDTH
from torch import nn

import torchfim
from torchfim._fastpath import FastPath
from torchfim._functional import FunctionalModel

MODELS = {
    "tanh_mlp": (tanh_mlp, mlp_inputs),
    "relu_mlp": (relu_mlp, mlp_inputs),
    "tiny_cnn": (tiny_cnn, cnn_inputs),
}


def rel_err(a, b):
    if isinstance(a, dict):
        assert list(a) == list(b)
        return max(rel_err(a[k], b[k]) for k in a)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def both(fn, *args, **kwargs):
    return fn(*args, method="layers", **kwargs), fn(*args, method="functional", **kwargs)


@pytest.mark.parametrize("model_name", tuple(MODELS))
@pytest.mark.parametrize("structure", ["full", "diag", "trace", "layers"])
def test_fisher_paths_agree(model_name, structure, family):
    make_model, make_inputs = MODELS[model_name]
    width = FAMILY_WIDTH[family]
    model, x = make_model(width), make_inputs(5)
    targets = torchfim.families.get_family(family).sample(model(x).detach(), 1, torch.Generator().manual_seed(1))
    targets = targets[:, 0]
    for estimator in ("exact", "score", "hessian", "empirical"):
        fast, general = both(
            lambda **kw: torchfim.fisher(model, x, family=family, estimator=estimator, structure=structure,
                                         n_samples=2, targets=targets, generator=torch.Generator().manual_seed(3),
                                         **kw)
        )
        assert rel_err(fast, general) < 1e-10, estimator


@pytest.mark.parametrize("model_name", tuple(MODELS))
@pytest.mark.parametrize("structure", ["full", "diag", "trace", "layers"])
def test_variance_paths_agree(model_name, structure):
    make_model, make_inputs = MODELS[model_name]
    for family in ("categorical", "poisson"):
        model, x = make_model(FAMILY_WIDTH[family]), make_inputs(5)
        for estimator in ("score", "hessian"):
            fast, general = both(torchfim.fisher_variance, model, x, family=family, estimator=estimator,
                                 structure=structure, n_samples=3)
            assert rel_err(fast, general) < 1e-10, (family, estimator)


@pytest.mark.parametrize(
    "limits",
    [{"_GROUP_ELEMENTS": 1, "_CACHE_ELEMENTS": 1}, {"CHUNK_ELEMENTS": 1}],
    ids=["one-vector-groups-one-sample-gradients", "one-row-chunks"],
)
def test_chunked_products_agree(monkeypatch, limits):
    """Vectors back-propagated in groups, conv gradients a sample at a time, rows a sample at a time."""
    import torchfim._fastpath as fastpath

    for name, value in limits.items():
        monkeypatch.setattr(fastpath, name, value)
    for make_model, make_inputs in MODELS.values():
        model, x = make_model(5), make_inputs(6)
        for estimator in ("exact", "score"):
            for structure in ("diag", "trace"):
                fast, general = both(
                    lambda **kw: torchfim.fisher(model, x, estimator=estimator, structure=structure, n_samples=3,
                                                 generator=torch.Generator().manual_seed(2), **kw)
                )
                assert rel_err(fast, general) < 1e-10, (estimator, structure)


def strided_cnn(width: int, seed: int = 0) -> nn.Module:
    """Convolutions with strides, rectangular kernels, dilation and no bias, on 2×7×6 inputs."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 3, (2, 3), stride=(2, 1), padding=(0, 1)), nn.Tanh(),  # → 3×3×6
        nn.Conv2d(3, 2, 3, dilation=2, padding=2, bias=False), nn.Tanh(),  # → 2×3×6
        nn.Conv2d(2, 2, 2, stride=3), nn.Tanh(),  # → 2×1×2
        nn.Flatten(), nn.Linear(4, width),
    ).double()


@pytest.mark.parametrize("structure", ["diag", "trace", "layers"])
def test_strided_convolutions_agree(structure):
    """Strides, rectangular kernels, dilation and a missing bias, with one and several labels per input."""
    model = strided_cnn(4)
    x = torch.randn(5, 2, 7, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    for estimator, k in (("score", 1), ("score", 2), ("exact", 1), ("hessian", 1)):
        fast, general = both(
            lambda **kw: torchfim.fisher(model, x, estimator=estimator, structure=structure, n_samples=k,
                                         generator=torch.Generator().manual_seed(4), **kw)
        )
        assert rel_err(fast, general) < 1e-10, (estimator, k)
    fast, general = both(torchfim.fisher_variance, model, x, estimator="score", structure=structure)
    assert rel_err(fast, general) < 1e-10


@pytest.mark.parametrize(
    "conv",
    [{"kernel_size": 3, "padding": 1}, {"kernel_size": (2, 3), "stride": (2, 1), "padding": (0, 1)},
     {"kernel_size": 3, "dilation": 2, "padding": 2}, {"kernel_size": 2, "stride": 3}],
)
def test_conv_patches_reproduce_the_convolution(conv):
    from torchfim._fastpath import _Layer

    torch.manual_seed(0)
    layer = nn.Conv2d(3, 4, **conv).double()
    a = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    patches = _Layer("conv", layer, 0, 1).patches(a)
    ref = torch.nn.functional.unfold(a, layer.kernel_size, dilation=layer.dilation, padding=layer.padding,
                                     stride=layer.stride).transpose(1, 2)
    assert torch.equal(patches, ref)
    z = layer(a)
    rebuilt = (patches @ layer.weight.reshape(4, -1).T + layer.bias).transpose(1, 2).reshape(z.shape)
    torch.testing.assert_close(rebuilt, z, rtol=1e-12, atol=1e-12)


def test_bounds_use_the_fast_path_consistently():
    from torchfim.variance import _variance

    model, x = tanh_mlp(3, seed=4), mlp_inputs(6)
    for estimator, modes in (("score", ("spectral", "kurtosis")), ("hessian", ("spectral",))):
        for mode in modes:
            for structure in ("diag", "trace", "layers"):
                fast = _variance(model, x, "categorical", estimator, structure, 1, mode, False, "layers")
                general = _variance(model, x, "categorical", estimator, structure, 1, mode, False, "functional")
                assert rel_err(fast, general) < 1e-10


def test_which_models_take_the_fast_path():
    mlp = FunctionalModel(tanh_mlp(3))
    assert FastPath.build(mlp) is not None
    norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    assert FastPath.build(FunctionalModel(norm)) is None  # LayerNorm's affine parameters
    frozen_norm = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 3)).double()
    frozen_norm[1].requires_grad_(False)
    assert FastPath.build(FunctionalModel(frozen_norm)) is not None


class SharedLayer(nn.Module):
    """Applies the same Linear twice: per-sample gradients sum over both uses."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(3, 3).double()
        self.head = nn.Linear(3, 2).double()

    def forward(self, x):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


def test_layer_used_twice_falls_back_to_general_path():
    model, x = SharedLayer(), mlp_inputs(5)
    auto = torchfim.fisher(model, x, structure="full")
    general = torchfim.fisher(model, x, structure="full", method="functional")
    assert rel_err(auto, general) < 1e-12
    with pytest.raises(torchfim.TorchfimError, match="method='layers' needs"):
        torchfim.fisher(model, x, method="layers")


def test_sequence_linear_and_strided_conv():
    """Linear on (B, T, d) inputs and a strided, dilated convolution: several positions per sample."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    for estimator in ("exact", "hessian"):
        for structure in ("diag", "trace", "layers"):
            fast, general = both(
                lambda **kw: torchfim.fisher(seq, x, estimator=estimator, structure=structure,
                                             generator=torch.Generator().manual_seed(0), **kw)
            )
            assert rel_err(fast, general) < 1e-10
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=2, dilation=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(2 * 3 * 3, 3)).double()
    xi = cnn_inputs(4)
    for structure in ("diag", "full"):
        fast, general = both(torchfim.fisher_variance, conv, xi, estimator="score", structure=structure)
        assert rel_err(fast, general) < 1e-10
