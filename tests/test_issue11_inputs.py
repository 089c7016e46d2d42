"""Issue 11: parameters read afresh (item 3, engine level), non-finite inputs and overflow (item 6), the
check for models that mix samples (item 7), non-finite targets end to end (item 9) and clear messages
for bad calls (item 13). Each test reproduces the case the issue describes."""

from __future__ import annotations

import math
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp_inputs, relu_mlp, tanh_mlp
from oracles import exact_fisher
from torch import nn

import torchfim
import torchfim.train
from torchfim import TorchfimError
from torchfim.engine import ModelView
from torchfim.errors import check_label_memory


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


# ------------------------------------------------------------------ item 6: non-finite inputs, overflow
def _inf_inputs() -> torch.Tensor:
    x = mlp_inputs(5, seed=40)
    x[1, 0] = float("inf")
    return x


@pytest.mark.parametrize(
    "call",
    [
        lambda m, x: torchfim.fisher(m, x),
        lambda m, x: torchfim.fisher(m, x, estimator="hessian", generator=torch.Generator().manual_seed(0)),
        lambda m, x: torchfim.fisher_variance(m, x, estimator="score"),
        lambda m, x: torchfim.fisher_variance(m, x, estimator="hessian", structure="trace"),
        lambda m, x: torchfim.variance_bound(m, x),
        lambda m, x: torchfim.samples_needed(m, x),
        lambda m, x: torchfim.compare_estimators(m, x),
    ],
    ids=["fisher", "hessian", "var-score", "var-hessian", "bound", "samples_needed", "compare"],
)
def test_inf_inputs_are_refused(call) -> None:
    """An Inf input gave NaN entries with no error, then "the exact Fisher is zero" and a "score"
    recommendation; now every public function refuses it, naming the inputs."""
    with pytest.raises(TorchfimError, match="inputs contain NaN or Inf"):
        call(tanh_mlp(3, seed=41), _inf_inputs())


@pytest.mark.parametrize("call", [
    lambda m, x: torchfim.fisher(m, x),
    lambda m, x: torchfim.fisher(m, [{"input": x}]),
    lambda m, x: torchfim.fisher_variance(m, x),
    lambda m, x: torchfim.variance_bound(m, x),
    lambda m, x: torchfim.samples_needed(m, x),
    lambda m, x: torchfim.compare_estimators(m, x),
    lambda m, x: torchfim.train.FisherTraceMonitor(m, x),
    lambda m, x: torchfim.train.FisherPenalty(m)(x, step=0),
    lambda m, x: torchfim.train.FisherPenalty(m, grad_method="finite_difference").penalised_loss(
        x, lambda out: out.sum(), step=0),
], ids=["fisher", "dict", "variance", "bound", "samples_needed", "compare", "monitor", "penalty", "penalised-loss"])
def test_inputs_on_the_meta_device_are_refused(call) -> None:
    """Inputs on the meta device (a shape without values) failed inside torch: "NotImplementedError: Cannot copy out
    of meta tensor" from the move to the model's device (``Tensor.item()`` on a meta tensor from the monitor's
    finiteness check). Every entry point now names them, as a model on the meta device was named already."""
    with pytest.raises(TorchfimError, match=r"the inputs are on the meta device \(\(8, 3\) torch.float64\).*no "
                                            r"values.*pass the inputs with their values"):
        call(tanh_mlp(3), torch.empty(8, 3, dtype=torch.float64, device="meta"))


def test_targets_on_the_meta_device_are_named_as_targets() -> None:
    model, x = tanh_mlp(3), mlp_inputs(8)
    labels = torch.zeros(8, dtype=torch.long, device="meta")
    with pytest.raises(TorchfimError, match=r"the targets are on the meta device \(\(8,\) torch.int64\).*pass the targets"):
        torchfim.fisher(model, x, targets=labels, estimator="empirical")


def test_nan_in_a_later_mini_batch_or_dict_input_is_refused() -> None:
    model = tanh_mlp(3, seed=42)
    x = mlp_inputs(6, seed=43)
    bad = x[3:].clone()
    bad[0, 2] = float("nan")
    with pytest.raises(TorchfimError, match=r"NaN or Inf \(positional argument 0 of mini-batch 1, counting from 0\)"):
        torchfim.fisher(model, [x[:3], bad])

    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.lin(features)

    with pytest.raises(TorchfimError, match=r"NaN or Inf \(input 'features' of mini-batch 0"):
        torchfim.fisher(Keyword().double(), {"features": bad})


OVERFLOW_SCALE = 1e20  # finite float32 inputs whose squares (1e40) overflow float32


def _overflow_case() -> tuple[nn.Module, torch.Tensor]:
    """Inputs of 1e20 into weights of 1e-20: moderate outputs, Jacobian entries of 1e20."""
    torch.manual_seed(44)
    model = nn.Linear(3, 3)
    with torch.no_grad():
        model.weight.mul_(1 / OVERFLOW_SCALE)
    return model, OVERFLOW_SCALE * torch.randn(5, 3, generator=torch.Generator().manual_seed(45))


@pytest.mark.parametrize("estimator", ["exact", "score", "hessian"])
@pytest.mark.parametrize("structure", ["diag", "trace", "blocks"])
def test_overflowing_fisher_is_an_error(estimator: str, structure: str) -> None:
    model, x = _overflow_case()
    with pytest.raises(TorchfimError, match="non-finite entries.*overflowed in torch.float32"):
        torchfim.fisher(model, x, family="gaussian", estimator=estimator, structure=structure,
                        generator=torch.Generator().manual_seed(0))


def test_overflowing_samples_needed_is_an_error_not_zero() -> None:
    model, x = _overflow_case()
    with pytest.raises(TorchfimError, match="overflowed") as info:
        torchfim.samples_needed(model, x, family="gaussian")
    assert "is zero" not in str(info.value)


def _curved_overflow_case() -> tuple[nn.Module, torch.Tensor]:
    """:func:`_overflow_case` with a tanh layer after it: second derivatives that do not vanish."""
    model, x = _overflow_case()
    return nn.Sequential(model, nn.Tanh(), nn.Linear(3, 3)), x


def test_a_linear_models_hessian_variance_is_zero_where_its_jacobian_overflows() -> None:
    """Î2 of a linear model does not depend on the labels: its variance is exactly 0, with no second
    derivative computed (they vanish), so nothing overflows."""
    model, x = _overflow_case()
    for value in (torchfim.fisher_variance(model, x, family="gaussian", estimator="hessian", structure="diag"),
                  torchfim.variance_bound(model, x, family="gaussian", estimator="hessian")):
        assert torch.equal(value, torch.zeros_like(value))


@pytest.mark.parametrize("family", ["gaussian", "categorical"])
@pytest.mark.parametrize(
    "call",
    [
        lambda m, x, f: torchfim.fisher_variance(m, x, family=f, estimator="score", structure="diag"),
        lambda m, x, f: torchfim.fisher_variance(m, x, family=f, estimator="score", structure="trace"),
        lambda m, x, f: torchfim.fisher_variance(m, x, family=f, estimator="hessian", structure="diag"),
        lambda m, x, f: torchfim.variance_bound(m, x, family=f, estimator="score"),
        lambda m, x, f: torchfim.variance_bound(m, x, family=f, estimator="hessian"),
    ],
    ids=["var-score-diag", "var-score-trace", "var-hessian-diag", "bound-score", "bound-hessian"],
)
def test_overflowing_variances_are_an_error(family: str, call) -> None:
    model, x = _curved_overflow_case()
    with pytest.raises(TorchfimError, match="non-finite"):
        call(model, x, family)


def test_compare_estimators_does_not_recommend_from_nan() -> None:
    """Logits of 1e20 make the categorical Fisher exactly 0 but its variances NaN (0·inf); the comparison
    must refuse rather than recommend "score" from NaN."""
    torch.manual_seed(44)
    model, x = nn.Linear(3, 3), OVERFLOW_SCALE * torch.randn(5, 3, generator=torch.Generator().manual_seed(45))
    with pytest.raises(TorchfimError, match="non-finite"):
        torchfim.compare_estimators(model, x, family="categorical")


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


# ------------------------------------------------------------------ item 9: non-finite targets end to end
@pytest.mark.parametrize("family", ["gaussian", "poisson"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("as_pairs", [False, True])
def test_non_finite_targets_are_refused_by_the_empirical_fisher(family: str, bad: float, as_pairs: bool) -> None:
    torch.manual_seed(52)
    model, x = nn.Linear(3, 2).double(), mlp_inputs(4, seed=53)
    y = torch.ones(4, 2, dtype=torch.float64)
    y[1, 0] = bad
    with pytest.raises(TorchfimError, match=r"contain 1 non-finite value \(NaN or Inf\); drop or impute"):
        if as_pairs:
            torchfim.fisher(model, [(x[:2], y[:2]), (x[2:], y[2:])], family=family, estimator="empirical")
        else:
            torchfim.fisher(model, x, family=family, estimator="empirical", targets=y)


# ------------------------------------------------------------------ item 13: clear messages
@pytest.mark.parametrize("generator", [0, np.random.default_rng(0), "seed"])
@pytest.mark.parametrize("estimator", ["exact", "score", "hessian"])
def test_generator_that_is_not_a_torch_generator(generator: object, estimator: str) -> None:
    """``generator=0`` failed with ``'int' object has no attribute 'device'``."""
    with pytest.raises(TorchfimError, match="generator must be a torch.Generator.*manual_seed"):
        torchfim.fisher(tanh_mlp(3), mlp_inputs(4), estimator=estimator, generator=generator)


def test_one_input_without_batch_dimension() -> None:
    """The (3,) input runs as 3 inputs, its (3,) outputs read as one per input; the forward then fails on
    fewer of them, which is said as the 1-D input it is (not as a batch size fixed in the forward)."""
    with pytest.raises(TorchfimError, match=r"1-D inputs \(\(3,\) torch.float64\) when called on 2 of their 3 "
                                            r"entries: their first dimension is the batch.*x\.unsqueeze\(0\)"):
        torchfim.fisher(tanh_mlp(3), mlp_inputs(4)[0])
    with pytest.raises(TorchfimError, match="batch dimension first"):
        torchfim.fisher(tanh_mlp(3), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("call", [
    lambda m, x: torchfim.fisher(m, x),
    lambda m, x: torchfim.fisher(m, x, backend="functional"),
    lambda m, x: torchfim.train.FisherTraceMonitor(m, x).step(0),
    lambda m, x: torchfim.train.FisherPenalty(m)(x, step=0),
], ids=["fisher", "functional", "monitor", "penalty"])
def test_one_input_without_batch_dimension_read_as_one_sample_by_the_model(call) -> None:
    """One input of 4 features for a model of 3 outputs: the model reads the (4,) input as one unbatched sample and
    returns (3,). The message spoke of a reduction over the batch and of nn.GRU/nn.LSTM, never of the input: it now
    names the 1-D input and x.unsqueeze(0) first."""
    model, x = tanh_mlp(3, d_in=4), mlp_inputs(1, d_in=4)[0]
    with pytest.raises(TorchfimError, match=r"^the model returned outputs of shape \(3,\) for 1-D inputs \(\(4,\) "
                                            r"torch.float64\): it read them as one unbatched sample.*pass "
                                            r"x\.unsqueeze\(0\) for a single input"):
        call(model, x)


def test_one_dimensional_inputs_to_a_one_feature_model() -> None:
    """Inputs of shape (n,) for ``nn.Linear(1, C)``: the first dim is the batch, the feature dim is missing."""
    torch.manual_seed(54)
    with pytest.raises(TorchfimError, match=r"unsqueeze\(1\)"):
        torchfim.fisher(nn.Linear(1, 3).double(), torch.randn(5, dtype=torch.float64))


def test_integer_inputs_to_a_float_model() -> None:
    with pytest.raises(TorchfimError, match=r"integer.*\.float\(\).*torch said: mat1 and mat2 must have the same dtype"):
        torchfim.fisher(tanh_mlp(3), torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize(("dtype", "fix"), [
    (torch.bool, r"boolean inputs \(\(4, 3\) torch.bool\) with torch.float64 parameters; pass x\.float\(\)"),
    (torch.complex128, (r"complex inputs \(\(4, 3\) torch.complex128\) with torch.float64 parameters; torchfim's "
                       r"families take real outputs.*torch.view_as_real\(x\)")),
])
@pytest.mark.parametrize("call", [
    lambda m, x: torchfim.fisher(m, x),
    lambda m, x: torchfim.train.FisherTraceMonitor(m, x).step(0),
    lambda m, x: torchfim.train.FisherPenalty(m)(x, step=0),
], ids=["fisher", "monitor", "penalty"])
def test_boolean_and_complex_inputs_to_a_float_model(dtype: torch.dtype, fix: str, call) -> None:
    """torch's dtype error from inside the forward ("mat1 and mat2 must have the same dtype, but got Bool and
    Double") came out as it was, where integer inputs got the fix: now both are named with theirs, torch's words
    after."""
    x = (mlp_inputs(4) > 0).to(dtype)
    with pytest.raises(TorchfimError, match=fix + r".*torch said: mat1 and mat2 must have the same dtype"):
        call(tanh_mlp(3), x)


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_integer_inputs_to_a_float_model_in_the_penalty(grad_method: str) -> None:
    """The penalty says what ``fisher`` says (torch's dtype error from inside the forward before)."""
    pen = torchfim.train.FisherPenalty(tanh_mlp(3), grad_method=grad_method)
    x = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(TorchfimError, match=r"integer inputs.*\.float\(\).*torch said: mat1 and mat2"):
        pen(x, step=0)
    with pytest.raises(TorchfimError, match=r"integer inputs.*\.float\(\)"):
        pen.penalised_loss(x, lambda out: out.sum(), step=0)


_WIDE = r"\([36], 7\) torch.float64\): a layer does not take the shape it is given.*torch said: mat1 and mat2 shapes"


@pytest.mark.parametrize("call", [
    lambda model, x: torchfim.fisher(model, x),
    lambda model, x: torchfim.fisher(model, x, backend="functional"),
    lambda model, x: torchfim.fisher_variance(model, x),
    lambda model, x: torchfim.train.FisherTraceMonitor(model, x).step(0),
    lambda model, x: torchfim.train.FisherTraceMonitor(model, x, subset=3).step(0),
    lambda model, x: torchfim.train.FisherPenalty(model)(x, step=0),
    lambda model, x: torchfim.train.FisherPenalty(model, grad_method="finite_difference").penalised_loss(
        x, lambda out: out.sum(), step=0),
], ids=["fisher", "functional", "variance", "monitor", "monitor-subset", "penalty", "penalised-loss"])
def test_inputs_of_a_shape_the_model_does_not_take(call) -> None:
    """Inputs 7 wide for a model whose first layer takes 3: every entry point says so with torch's words (torch's
    own error from inside the forward before, or from inside torchfim's stand-ins for the penalty)."""
    with pytest.raises(TorchfimError, match=rf"the model's forward failed on the mini-batch \({_WIDE}") as caught:
        call(tanh_mlp(3), torch.randn(6, 7, dtype=torch.float64))
    assert isinstance(caught.value.__cause__, RuntimeError)  # torch's error, kept as the cause


def test_images_of_another_size_and_token_ids_past_the_table() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    with pytest.raises(TorchfimError, match=r"\(2, 1, 8, 8\) torch.float64\): a layer does not take.*torch said: mat1"):
        torchfim.fisher(conv, torch.randn(2, 1, 8, 8, dtype=torch.float64))  # built for 6×6 images
    with pytest.raises(TorchfimError, match=r"\(2, 3, 6, 6\).*a layer does not take.*expected input.*3 channels"):
        torchfim.fisher(conv, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    tokens = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 3)).double()
    with pytest.raises(TorchfimError, match=r"outside an embedding's table; pass token ids in \[0, num_embeddings\)"):
        torchfim.fisher(tokens, torch.randint(0, 9, (4, 2), generator=torch.Generator().manual_seed(0)))
    one_each = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)).double()  # 1-D ids: one token per input
    with pytest.raises(TorchfimError, match=r"outside an embedding's table"):  # not the 1-D inputs' advice
        torchfim.fisher(one_each, torch.tensor([0, 1, 2, 7]))


class _OwnLoss(nn.Module):
    """Token ids to a class per input, with its own loss where ``labels`` are given (as Hugging Face models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(5, 3), nn.Linear(3, 4)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.emb(input_ids).mean(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


@pytest.mark.parametrize("call", [
    lambda model, x: torchfim.fisher(model, x, output=lambda out: out["logits"]),
    lambda model, x: torchfim.train.FisherTraceMonitor(model, x, output=lambda out: out["logits"]).step(0),
    lambda model, x: torchfim.train.FisherPenalty(model, output=lambda out: out["logits"])(x, step=0),
], ids=["fisher", "monitor", "penalty"])
def test_token_ids_given_as_floats_are_named(call) -> None:
    """torch's "Expected tensor for argument #1 'indices'" came out as it was, from inside the embedding."""
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TorchfimError, match=r"an embedding was given floating-point indices; pass token ids as "
                                            r"integers \(ids.long\(\)\); torch said: Expected tensor"):
        call(_OwnLoss().double(), {"input_ids": ids.double()})


def test_labels_of_the_models_own_loss_given_as_floats_are_named_as_the_labels() -> None:
    """The advice was "failed on integer inputs … pass x.float()": wrong, since the labels are what is wrong."""
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    model = _OwnLoss().double()
    pen = torchfim.train.FisherPenalty(model, output=lambda out: out["logits"])
    try:
        F.cross_entropy(torch.zeros(2, 3), torch.zeros(2))
    except RuntimeError as err:
        if "expected target dtype" not in str(err):
            pytest.skip(f"this torch names float targets in other words ({err}), read as any dtype mismatch")
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(TorchfimError, match=r"class targets of a dtype it does not take.*int64 class indices "
                                                r"\(labels.long\(\)\).*expected target"):
            pen.penalised_loss({"input_ids": ids, "labels": torch.zeros(4, dtype=dtype)}, lambda o: o["loss"], step=0)


def test_errors_of_the_forward_own_and_of_the_output_map_are_raised_as_they_are() -> None:
    """Only torch's words for a layer's input shape, raised inside the model's forward, are read as the inputs'
    shape: an IndexError of the forward's own code, a broadcast in the forward and a product in ``output=``
    come out as themselves."""

    class Indexes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.sizes = nn.Linear(3, 3), [3]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.sizes[1]

    class Broadcasts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.zeros(5, dtype=x.dtype)

    x = mlp_inputs(4)
    with pytest.raises(IndexError, match="list index out of range"):
        torchfim.fisher(Indexes().double(), x)
    with pytest.raises(RuntimeError, match="must match the size") as caught:
        torchfim.fisher(Broadcasts().double(), x)
    assert not isinstance(caught.value, TorchfimError)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        torchfim.fisher(tanh_mlp(3), x, output=lambda out: out @ torch.zeros(5, 2, dtype=out.dtype))
    assert not isinstance(caught.value, TorchfimError)


def test_a_failure_that_only_mentions_a_dtype_is_not_blamed_on_integer_inputs() -> None:
    """torch's checkpoint lists the metadata (``'dtype': torch.float64``) of tensors it recomputed
    differently: that error was reported as "failed on integer inputs" for token ids."""

    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            self.emb(ids)
            raise RuntimeError("recomputed metadata: {'shape': torch.Size([2]), 'dtype': torch.float64}")

    with pytest.raises(RuntimeError, match="recomputed metadata") as caught:
        torchfim.fisher(Fails().double(), torch.ones(4, 2, dtype=torch.long))
    assert not isinstance(caught.value, TorchfimError)


def test_model_returning_a_long_tensor() -> None:
    class Argmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).argmax(-1, keepdim=True).expand(-1, 3)

    with pytest.raises(TorchfimError, match="dtype torch.int64.*floating-point outputs"):
        torchfim.fisher(Argmax().double(), mlp_inputs(4))


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_huge_n_samples_is_a_clear_error(estimator: str) -> None:
    with pytest.raises(TorchfimError, match="n_samples=1099511627776.*GiB"):
        torchfim.fisher(tanh_mlp(3), mlp_inputs(4), estimator=estimator, n_samples=2**40)


def test_huge_n_samples_is_fine_for_a_closed_form_variance() -> None:
    """The variance with k labels is the one-label variance over k: no labels are drawn."""
    model, x = tanh_mlp(3, seed=55), mlp_inputs(4, seed=56)
    one = torchfim.fisher_variance(model, x, structure="trace")
    many = torchfim.fisher_variance(model, x, structure="trace", n_samples=2**40)
    assert math.isclose(float(many), float(one) / 2**40, rel_tol=1e-12)


def test_label_memory_check() -> None:
    check_label_memory(64, 1000, 10, torch.device("cpu"))  # 5 MB: fine
    with pytest.raises(TorchfimError, match="n_samples=1099511627776 labels for each of 4 inputs.*fewer labels"):
        check_label_memory(4, 2**40, 3, torch.device("cpu"))


@pytest.mark.parametrize(
    "call",
    [
        torchfim.compare_estimators,
        torchfim.samples_needed,
        torchfim.fisher,
        torchfim.fisher_variance,
        torchfim.variance_bound,
    ],
)
def test_a_function_instead_of_a_module(call) -> None:
    """``compare_estimators(lambda ...)`` failed with ``'function' object has no attribute ...``."""
    model = tanh_mlp(3)
    with pytest.raises(TorchfimError, match="model must be a torch.nn.Module, got function"):
        call(lambda x: model(x), mlp_inputs(4))


def test_tiny_rel_error_is_a_clear_error() -> None:
    """``rel_error=1e-300`` overflowed in ``math.ceil`` (OverflowError)."""
    with pytest.raises(TorchfimError, match="rel_error=1e-300 would need more than 1e308 labels"):
        torchfim.samples_needed(tanh_mlp(3, seed=57), mlp_inputs(6, seed=58), rel_error=1e-300)


def test_small_rel_error_gives_the_exact_huge_count() -> None:
    """At ε = 1e-100 the count (~1e200) is finite: an exact int following ``⌈V₁/(εI)²⌉``."""
    model, x = tanh_mlp(3, seed=57), mlp_inputs(6, seed=58)
    value = float(torchfim.fisher(model, x, structure="trace"))
    var1 = float(torchfim.fisher_variance(model, x, structure="trace"))
    k = torchfim.samples_needed(model, x, rel_error=1e-100)
    assert isinstance(k, int) and math.isclose(k, var1 / value**2 * 1e200, rel_tol=1e-9)


def test_tiny_rel_error_with_zero_variance_needs_one_label() -> None:
    """Î2 of a ReLU network has zero variance: one label meets any accuracy (0/0 gave ValueError)."""
    assert torchfim.samples_needed(relu_mlp(3), mlp_inputs(6), estimator="hessian", rel_error=1e-300) == 1


def test_targets_of_the_wrong_shape_for_outputs_with_positions_are_named_in_the_users_terms() -> None:
    """The message named an internal object ("targets for Positions((3,)) of 'categorical'")."""
    from cases import token_model

    tokens = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TorchfimError, match=r"^targets for outputs with positions \(3,\) \(family 'categorical' at "
                                            r"each\) must have shape \(batch, \*positions.*got \(4, 2\)"):
        with pytest.warns(RuntimeWarning, match="do not fit outputs"):  # said before the empirical estimator refuses
            torchfim.fisher(token_model(4), [(tokens, torch.zeros(4, 2, dtype=torch.long))], estimator="empirical")


def test_an_input_with_no_observed_position_counts_with_a_warning() -> None:
    """An input whose mask is False everywhere counts in the mean over inputs with a Fisher of 0: the Fisher of the
    batch is (n − 1)/n times that of the others, and torchfim says so once."""
    import warnings

    from cases import token_model

    model = token_model(4)
    tokens = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[2] = False
    with pytest.warns(RuntimeWarning, match=r"1 of the 4 inputs of a mini-batch has no observed position.*counts in"):
        whole = torchfim.fisher(model, tokens, mask=mask, structure="trace")
    others = torchfim.fisher(model, tokens[[0, 1, 3]], mask=mask[[0, 1, 3]], structure="trace")
    assert torch.allclose(whole, others * 3 / 4, rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchfim.fisher(model, tokens, mask=torch.ones(4, 3, dtype=torch.bool), structure="trace")
