"""Parameters the outputs depend on piecewise linearly (``torchfim.engine.linearity``), and the sweeps
they spare.

A parameter reported linear must have a zero block ``∂²(wᵀo)/∂θ_p²`` (brute force: reverse over
reverse in float64, ``w`` random), on every case of the shared list and on models built to trap the
tracer; where the answer is known by hand (ReLU networks: every parameter; otherwise the last
layer) it must be found. The Î2 quantities are the same with and without the skipping, and a
network made of ReLU, pooling, BatchNorm (eval) and residual sums runs no forward-mode pass at all.
"""

from __future__ import annotations

import pytest
import test_engine_oracles as engine_oracles  # a module: its tests are not collected twice
import torch
from cases import BY_NAME, CASES, Case
from torch import Tensor, nn
from torch.func import functional_call, jacrev

import torchfim
from torchfim.engine import Batch, ModelView
from torchfim.engine import backend as backend_module
from torchfim.engine.linearity import linear_parameters

C = 3


def linear_names(model: nn.Module, x: Tensor) -> set[str]:
    view = ModelView(model)
    return {view.layout.names[i] for i in linear_parameters(view, Batch((x,), {}, x.shape[0]))}


def block_size(model: nn.Module, x: Tensor, name: str) -> float:
    """``max |∂²(wᵀo)/∂θ_p²|`` over the block of parameter ``name`` (w: fixed random weights)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        w = torch.randn(model(x).shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def projected(theta: Tensor) -> Tensor:
        return (functional_call(model, {**params, name: theta}, (x,)) * w).sum()

    return jacrev(jacrev(projected))(params[name]).abs().max().item()


class ReluResNet(nn.Module):
    """Conv stem, a residual block of conv–BatchNorm(eval)–ReLU (in place)–conv–BatchNorm, max and mean
    pooling, Linear: piecewise linear in every parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.conv1, self.bn1 = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.conv2, self.bn2 = nn.Conv2d(2, 2, 3, padding=1, bias=False), nn.BatchNorm2d(2)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(2, C)

    def forward(self, x: Tensor) -> Tensor:
        h = self.relu(self.stem(x))
        h = self.relu(h + self.bn2(self.conv2(self.relu(self.bn1(self.conv1(h))))))
        return self.head(torch.nn.functional.max_pool2d(h, 2).mean((2, 3)))


def relu_resnet() -> nn.Module:
    torch.manual_seed(0)
    model = ReluResNet().double()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


class TwoLayers(nn.Module):
    """``b(mix(a(x)))`` for a mixing function chosen per test (``s``: a spare parameter vector)."""

    def __init__(self, mix) -> None:
        super().__init__()
        self.a, self.b, self.mix = nn.Linear(3, 4), nn.Linear(4, C), mix
        self.s = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.b(self.mix(self, self.a(x), x))


def _square(m, h, x):  # h ⊙ h: quadratic in a's parameters
    return h * h + m.s


def _scaled_relu(m, h, x):  # relu(a(x) ⊙ s): linear in a's parameters and in s, each on its own
    return torch.relu(h * m.s)


def _where_leaky(m, h, x):  # a leaky ReLU written with a comparison: piecewise linear
    return torch.where(h > 0, h, 0.1 * h) + m.s


def _divide(m, h, x):  # h / (1 + |h|): not linear
    return h / (1 + h.abs())


def _reused(m, h, x):  # a applied twice: its weight enters each path twice
    return m.a(torch.relu(h)[:, :3])


def _view_tanh(m, h, x):  # tanh applied in place through a view of h: the tracer cannot follow the alias
    h.view(-1).tanh_()
    return h


#: Trap → (its mixing, the parameters reported linear, parameters whose blocks really are nonzero).
TRAPS = {
    "square": (_square, {"b.weight", "b.bias", "s"}, {"a.weight", "a.bias"}),
    "scaled_relu": (_scaled_relu, {"a.weight", "a.bias", "s", "b.weight", "b.bias"}, set()),
    "where_leaky": (_where_leaky, {"a.weight", "a.bias", "s", "b.weight", "b.bias"}, set()),
    "divide": (_divide, {"b.weight", "b.bias"}, {"a.weight", "a.bias"}),
    "reused": (_reused, {"b.weight", "b.bias"}, {"a.weight"}),
    "view_tanh": (_view_tanh, set(), {"a.weight", "a.bias"}),
}

class InPlaceAfterNorm(nn.Module):
    """conv – BatchNorm(eval) – ReLU(inplace) – conv – tanh – mean – Linear: the BatchNorm's weight is
    curved (tanh), and along it alone forward-mode AD meets an in-place ReLU on an immutable zero tangent."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn = nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2)
        self.conv2, self.head = nn.Conv2d(2, 2, 3, padding=1), nn.Linear(2, c)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.nn.functional.relu(self.bn(self.conv1(x)), inplace=True)
        return self.head(torch.tanh(self.conv2(h)).mean((2, 3)))


def in_place_after_norm(c: int) -> nn.Module:
    torch.manual_seed(0)
    model = InPlaceAfterNorm(c).double()
    model.bn.weight.data.uniform_(0.5, 1.5)
    return model.eval()


#: Known by hand: what the tracer must find.
EXPECTED = {
    "relu_mlp": {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"},
    "maxpool_cnn": {"0.weight", "0.bias", "4.weight", "4.bias"},
    "tanh_mlp": {"4.weight", "4.bias"},
    "residual_bn": {"head.weight", "head.bias"},
    "encoder": {"head.weight", "head.bias"},
    "tied": {"out.bias"},
    "tokens": {"head.weight", "head.bias"},
    "gru": {"head.weight", "head.bias"},
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_parameter_reported_linear_has_a_zero_hessian_block(case) -> None:
    model, x = case.build(C), case.inputs(4)
    linear = linear_names(model, x)
    if case.name in EXPECTED:
        assert linear == EXPECTED[case.name]
    for name in linear:
        assert block_size(model, x, name) < 1e-12, name


def test_a_relu_resnet_is_linear_in_every_parameter_and_a_tanh_mlp_is_not() -> None:
    model, x = relu_resnet(), torch.randn(4, 1, 6, 6, dtype=torch.float64)
    names = {n for n, _ in model.named_parameters()}
    assert linear_names(model, x) == names
    assert max(block_size(model, x, n) for n in names) < 1e-12
    tanh = BY_NAME["tanh_mlp"]
    assert block_size(tanh.build(C), tanh.inputs(4), "0.weight") > 1e-3  # the oracle sees a nonzero block


@pytest.mark.parametrize("trap", sorted(TRAPS))
def test_products_divisions_reuse_and_aliased_changes_are_found(trap) -> None:
    mix, expected, curved = TRAPS[trap]
    torch.manual_seed(1)
    model, x = TwoLayers(mix).double(), torch.randn(5, 3, dtype=torch.float64)
    linear = linear_names(model, x)
    assert linear == expected
    for name in linear:
        assert block_size(model, x, name) < 1e-12, name
    for name in curved:  # what each trap hides really curves the outputs
        assert block_size(model, x, name) > 1e-6, name


def _second_order_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    for name in ("output_hessian_diagonals", "hessian_columns", "output_hessian_columns"):
        for cls in backend_module.Backend.__subclasses__():
            original = getattr(cls, name)

            def spy(self, *args, _original=original, _name=name):
                calls.append(_name)
                return _original(self, *args)

            monkeypatch.setattr(cls, name, spy)
    return calls


def _hessian_quantities(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    out = {}
    for structure in ("diag", "trace", "blocks", "full"):
        gen = torch.Generator().manual_seed(0)
        out[f"fisher {structure}"] = torchfim.fisher(model, x, estimator="hessian", structure=structure, generator=gen)
        out[f"variance {structure}"] = torchfim.fisher_variance(model, x, estimator="hessian", structure=structure)
        out[f"covariance {structure}"] = torchfim.fisher_covariance(model, x, structure=structure)
    out["bound diag"] = torchfim.variance_bound(model, x, estimator="hessian", structure="diag")
    return out


def _flat(value: object) -> Tensor:
    value = getattr(value, "value", value)
    if isinstance(value, dict):
        return torch.cat([v.reshape(-1) for v in value.values()])
    return torch.as_tensor(value).reshape(-1)


@pytest.mark.parametrize("model_name", ["relu_resnet", "tanh_mlp", "strided_cnn"])
def test_skipping_changes_no_result_and_spares_the_sweeps(model_name, monkeypatch) -> None:
    if model_name == "relu_resnet":
        model, x = relu_resnet(), torch.randn(5, 1, 6, 6, dtype=torch.float64)
    else:
        model, x = BY_NAME[model_name].build(C), BY_NAME[model_name].inputs(5)
    calls = _second_order_calls(monkeypatch)
    skipped = _hessian_quantities(model, x)
    skipped_calls = list(calls)
    calls.clear()
    monkeypatch.setattr(backend_module, "linear_parameters", lambda view, batch: frozenset())
    swept = _hessian_quantities(model, x)
    for key in swept:
        torch.testing.assert_close(_flat(skipped[key]), _flat(swept[key]), rtol=1e-12, atol=1e-14, msg=key)
    if model_name == "relu_resnet":  # only the full structure's cross blocks remain
        assert set(skipped_calls) == {"hessian_columns", "output_hessian_columns"}
        assert len(skipped_calls) < len(calls) / 2
    else:
        assert len(skipped_calls) < len(calls)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_in_place_ops_after_a_layer_linear_in_one_tensor_match_the_oracle(backend) -> None:
    """Directions along the BatchNorm's weight fall back to tangents over all of θ (else torch raises)."""
    case = Case("in_place_after_norm", in_place_after_norm,
                lambda n: torch.randn(n, 1, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64),
                ("categorical",))
    assert "bn.weight" not in linear_names(case.build(C), case.inputs(4))
    engine_oracles.test_variances(case, "categorical", backend)
