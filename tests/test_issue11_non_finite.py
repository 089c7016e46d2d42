"""Issue 11: non-finite inputs and inputs on the meta device, overflow of the Fisher, of samples_needed and of the
variances (item 6), and non-finite targets end to end (item 9). Each test reproduces the case the issue
describes.
"""

from __future__ import annotations

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from torch import nn

import torchfim
import torchfim.train
from torchfim import TorchfimError


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


@pytest.mark.parametrize("structure", ["diag", "trace"])
def test_a_float16_fisher_beyond_65504_names_float16s_range(structure: str) -> None:
    """A float16 linear model on inputs of scale 300: the Fisher, summed in float32, reaches 1.05e5 on the diagonal
    and 7.8e5 in the trace, beyond float16's largest number. The error blamed the per-sample products (the sums are
    float32's) and proposed model.double(); it now names float16's range and model.float()."""
    torch.manual_seed(0)
    model = nn.Linear(4, 2).half()
    x = 300 * torch.randn(64, 4, generator=torch.Generator().manual_seed(1))
    want = torchfim.fisher(model.float(), x, family="gaussian", structure=structure)
    assert bool(torch.isfinite(want).all()) and float(want.max()) > 65504  # summed in float32 it is finite
    with pytest.raises(TorchfimError, match="torch.float16, whose largest number is 65504.*model.float()"):
        torchfim.fisher(model.half(), x.half(), family="gaussian", structure=structure)


def test_an_overflow_from_the_familys_own_scale_is_named_beside_the_inputs() -> None:
    """Gaussian(σ = 1e-20) on float32 outputs: 1/σ² = 1e40 is beyond float32 whatever the inputs; the refusal named
    only inputs and activations (a review), and now names the family's moments and the targets' scale too."""
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
    with pytest.warns(RuntimeWarning, match="1/σ⁴"), \
            pytest.raises(TorchfimError, match=r"overflowed in torch.float32 .*a Gaussian's 1/σ² .*model\.double\(\)"):
        torchfim.fisher(model, x, family=torchfim.families.Gaussian(sigma=1e-20), structure="trace")
