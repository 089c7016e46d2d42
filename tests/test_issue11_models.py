"""Issue 11, what the engine reads of a model: its parameters read afresh at every call (item 3, engine level:
replaced by data assignment, converted, shared with the view, the user's modules never run or swapped), and the
check for models that mix samples (item 7). Each test reproduces the case the issue describes.
"""

from __future__ import annotations

import math
import types

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim import TorchfimError
from torchfim.engine import ModelView


def oracle_diag(model: nn.Module, x: torch.Tensor, family: str = "categorical") -> torch.Tensor:
    return torch.diagonal(exact_fisher(model, x, family))


# ------------------------------------------------------------------ item 3: parameters read afresh
def test_fisher_reads_parameters_replaced_by_data_assignment() -> None:
    """``p.data = new`` gives new storage; the next call computes with it (checked against the oracle)."""
    model, x = tanh_mlp(3, seed=30), mlp_inputs(7, seed=31)
    before = torchfim.fisher(model, x)
    new = torch.Generator().manual_seed(32)
    for p in model.parameters():
        p.data = 2.0 * torch.randn(p.shape, generator=new, dtype=p.dtype)
    after = torchfim.fisher(model, x)
    assert torch.allclose(after, oracle_diag(model, x), rtol=1e-10, atol=1e-14)
    assert not torch.allclose(after, before, rtol=1e-3)


def test_fisher_follows_dtype_conversions_of_the_model() -> None:
    """``model.float()`` then ``model.double()``: each call computes in the model's current dtype."""
    model, x = tanh_mlp(3, seed=33), mlp_inputs(7, seed=34)
    model.float()
    single = torchfim.fisher(model, x, structure="trace")
    assert single.dtype == torch.float32
    model.double()
    double = torchfim.fisher(model, x, structure="trace")
    assert double.dtype == torch.float64
    assert math.isclose(float(double), float(oracle_diag(model, x).sum()), rel_tol=1e-12)
    assert math.isclose(float(single), float(double), rel_tol=1e-5)


def test_view_shares_parameter_tensors_and_sees_in_place_updates() -> None:
    """The engine's private module tree holds the user's very parameter tensors (nothing copied), so an
    optimiser's in-place update is read by a view built before it; the module objects are its own."""
    model, x = tanh_mlp(3, seed=35), mlp_inputs(5, seed=36)
    view = ModelView(model)
    assert view.model is not model and view.model[0] is not model[0]
    assert all(a is b for a, b in zip(view.model.parameters(), model.parameters()))
    with torch.no_grad():
        model[4].bias.add_(1.5)
    batch = next(iter(torchfim.engine.batches(x, None, view.device, view.dtype)))
    assert torch.equal(view.outputs(batch), model(x).detach())


class _Scaled(nn.Module):
    """Reads a plain attribute (a settings object) and calls a child held outside ``_modules`` too."""

    def __init__(self) -> None:
        super().__init__()
        self.settings = types.SimpleNamespace(scale=1.0)
        self.lin = nn.Linear(3, 3)
        object.__setattr__(self, "alias", self.lin)  # a second reference the module registry never sees

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.settings.scale * self.alias(x)


def test_view_shares_attributes_and_points_aliases_at_its_copies() -> None:
    """Only the module objects and their registries are the view's own: a settings object changed in
    place after a first computation is read by the next one, and a module held by a plain attribute is
    the view's copy of it (so the engine's hooks see its calls)."""
    model, x = _Scaled().double(), mlp_inputs(5, seed=39)
    view = ModelView(model)
    assert view.model.alias is view.model.lin and view.model.lin is not model.lin
    assert view.model.settings is model.settings
    first = torchfim.fisher(model, x, family="gaussian")  # Λ = I: the Fisher scales with scale²
    model.settings.scale = 3.0
    assert torch.allclose(torchfim.fisher(model, x, family="gaussian"), 9.0 * first, rtol=1e-10)
    assert torch.allclose(first, torch.cat([x.square().sum(0).repeat(3) / 5, torch.ones(3)]), rtol=1e-10)


#: What :class:`_Probe` reports to (module level: a deep copy of the model must not copy it).
_WATCH: dict[str, object] = {}


class _Probe(nn.Module):
    """Records which module objects run their forward, and whether the user's parameter is in place."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _WATCH:
            _WATCH["log"].append((id(self), _WATCH["user"].inner.weight is _WATCH["weight"]))
        return self.head(torch.tanh(self.inner(x)))


@pytest.mark.parametrize(("estimator", "backend"), [("exact", "auto"), ("hessian", "auto"), ("score", "functional")])
def test_engine_never_runs_or_swaps_the_users_modules(estimator: str, backend: str) -> None:
    """Hooks and ``functional_call`` act on the engine's private copy: the user's module objects are never
    called, and their parameter attributes stay the user's tensors throughout."""
    torch.manual_seed(37)
    model, x = _Probe().double(), mlp_inputs(5, seed=38)
    log: list = []
    _WATCH.update(log=log, user=model, weight=model.inner.weight)
    try:
        got = torchfim.fisher(model, x, estimator="exact", backend=backend)
        torchfim.fisher(model, x, estimator=estimator, backend=backend, n_samples=2,
                        generator=torch.Generator().manual_seed(0))
        if estimator == "hessian":
            torchfim.fisher_variance(model, x, estimator="hessian", backend=backend)
    finally:
        _WATCH.clear()
    assert log and all(caller != id(model) for caller, _ in log)
    assert all(intact for _, intact in log)
    assert not model._forward_hooks and not model.inner._forward_hooks
    assert torch.allclose(got, oracle_diag(model, x), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------ item 7: models that mix samples
class _Centred(nn.Module):
    """``x − x.mean(0)``: each output depends on the whole batch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x - x.mean(0))


class _MixesRow(nn.Module):
    """Adds input 0 to input ``row`` of every batch large enough to have one: only that row mixes."""

    def __init__(self, row: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)
        self.row = row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.row:
            x = torch.cat([x[: self.row], x[self.row : self.row + 1] + x[:1], x[self.row + 1 :]])
        return self.lin(x)


@pytest.mark.parametrize("call", [
    lambda m, b: torchfim.fisher(m, b),
    lambda m, b: torchfim.fisher_variance(m, b, estimator="score", structure="trace"),
])
def test_centring_model_is_refused_when_the_first_batch_has_one_input(call) -> None:
    torch.manual_seed(46)
    x = mlp_inputs(6, seed=47)
    with pytest.raises(TorchfimError, match="depends on the other samples in its batch"):
        call(_Centred().double(), [x[:1], x[1:]])


def test_mixing_of_the_fourth_sample_is_caught() -> None:
    """The old check compared the first two samples only; mixing that touches the fourth is caught."""
    torch.manual_seed(48)
    with pytest.raises(TorchfimError, match="depends on the other samples"):
        torchfim.fisher(_MixesRow(3).double(), mlp_inputs(8, seed=49))


def test_independence_check_runs_the_last_samples_reversed_across_batches() -> None:
    """Four samples in all are checked, from the first batches with ≥ 2 inputs, each time the last rows
    of a batch in reverse order as one extra forward, fewer than the batch (here sample 2 alone, then
    9, 8, 7), and the first check also runs its batch's first sample alone (1); no later sample is; an
    independent model passes and gets the oracle's value."""
    model, x = tanh_mlp(3, seed=50), mlp_inputs(10, seed=51)
    calls: list[list[int]] = []

    def note(module: nn.Module, args: tuple) -> None:
        calls.append([next(i for i in range(len(x)) if torch.equal(row, x[i])) for row in args[0]])

    model.register_forward_pre_hook(note)
    got = torchfim.fisher(model, [x[:1], x[1:3], x[3:]])
    batches = [[0], [1, 2], list(range(3, 10))]
    extra = [c for c in calls if c not in batches]
    assert extra == [[2], [1], [9, 8, 7]]
    assert torch.allclose(got, oracle_diag(model, x), rtol=1e-10, atol=1e-14)


class _BroadcastsFirst(nn.Module):
    """Adds the batch's first input to every input: invisible to a check that keeps row 0 first."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x + x[:1])


@pytest.mark.parametrize("n", [2, 3, 8])
@pytest.mark.parametrize("model", [_BroadcastsFirst, _Centred])
def test_cross_sample_models_are_refused_at_every_batch_size(model: type, n: int) -> None:
    """A batch mean (symmetric in the samples) and a broadcast first row are both caught, on batches
    of two (one sample alone) up to batches larger than the checked rows."""
    torch.manual_seed(54)
    with pytest.raises(TorchfimError, match="depends on the other samples"):
        torchfim.fisher(model().double(), mlp_inputs(n, seed=55))
