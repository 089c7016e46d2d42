"""Bad options and outputs that do not fit them end in a TorchfimError naming the fix (issue 2, point 5): output
shapes for the family, targets, n_samples and other integer options, unknown names, the Bernoulli, Positions
and matrix Fisher families, the Hessian estimators without a forward rule, and zero or underflowing Fishers.
"""

from __future__ import annotations

import warnings

import error_fixtures
import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from torch import nn

import torchfim
import torchfim.train
from torchfim import TorchfimError

model = error_fixtures.model  # a fixture the tests take


def test_errors_are_value_errors():
    assert issubclass(TorchfimError, ValueError)


def test_wrong_output_shape_for_family(model):
    with pytest.raises(TorchfimError, match="one logit per input.*family='categorical'"):
        torchfim.fisher(model, mlp_inputs(4), family="bernoulli")


def test_empirical_needs_targets(model):
    with pytest.raises(TorchfimError, match="pass targets="):
        torchfim.fisher(model, mlp_inputs(4), estimator="empirical")
    with pytest.raises(TorchfimError, match="came without targets"):
        torchfim.fisher(model, [mlp_inputs(4)], estimator="empirical")


def test_non_finite_outputs(model):
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(TorchfimError, match="non-finite outputs.*check the inputs"):
        torchfim.fisher(model, mlp_inputs(4))


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_bad_n_samples(model, bad):
    with pytest.raises(TorchfimError, match="n_samples must be a positive integer.*n_samples=1"):
        torchfim.fisher(model, mlp_inputs(4), estimator="score", n_samples=bad)


def test_huge_n_samples_is_refused_past_int64_and_a_number_below(model):
    """``n_samples`` above 2**63 − 1 is refused by name at every entry point; below it a variance is the one of one
    label divided by k (float64, a pure number) and a draw that would not fit is refused as such (before: a bare
    OverflowError from torch in the variances, and a TypeError or RuntimeError from FisherTraceMonitor.step)."""
    from torchfim.combined import combined_variance

    x = mlp_inputs(4)
    calls = {
        "fisher": lambda n: torchfim.fisher(model, x, estimator="score", n_samples=n),
        "fisher_variance": lambda n: torchfim.fisher_variance(model, x, estimator="hessian", structure="diag",
                                                              n_samples=n),
        "variance_bound": lambda n: torchfim.variance_bound(model, x, structure="diag", n_samples=n),
        "fisher_covariance": lambda n: torchfim.fisher_covariance(model, x, structure="trace", n_samples=n),
        "combined_variance": lambda n: combined_variance(model, x, structure="trace", n_samples=n),
        "FisherTraceMonitor": lambda n: torchfim.train.FisherTraceMonitor(model, x, n_samples=n),
    }
    for name, call in calls.items():
        for huge in (2**63, 10**30):
            with pytest.raises(TorchfimError, match=r"n_samples must be at most 2\*\*63 - 1 = 9223372036854775807"):
                call(huge)
        if name not in ("fisher", "FisherTraceMonitor"):
            k = 2**62  # n²k overflows int64
            one = call(1)
            assert torch.allclose(call(k), one / k, rtol=1e-15, atol=0), name
    with pytest.raises(TorchfimError, match=r"n_samples=4611686018427387904 labels for each of 4 inputs need about"):
        torchfim.train.FisherTraceMonitor(model, x, n_samples=2**62, every=1).step(0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "multinomial"}, "unknown family 'multinomial'; choose one of 'categorical'"),
        ({"estimator": "kfac"}, "unknown estimator 'kfac'; choose one of 'exact', 'score'.*K-FAC.*docs/peers.md"),
        ({"structure": "block"}, "unknown structure 'block'; choose one of 'full', 'diag'[^(]*$"),
        # The peers' names get torchfim's (a porting user's trial met "unknown structure 'kron'" alone).
        ({"structure": "kron"}, r"unknown structure 'kron'.*\(Kronecker-factored .* not in torchfim"),
        ({"estimator": "mc"}, r"unknown estimator 'mc'.*\(the Monte Carlo Fisher is estimator='score'\)"),
        ({"estimator": "EF"}, r"\(the empirical Fisher is estimator='empirical'\)"),
        ({"structure": "block_diag"}, r"\(structure='blocks' \(one block per parameter tensor\)\)"),
    ],
)
def test_unknown_names(model, kwargs, message):
    with pytest.raises(TorchfimError, match=message):
        torchfim.fisher(model, mlp_inputs(4), **kwargs)


@pytest.mark.parametrize("said, refused", [
    ("Trying to use forward AD with _grouped_mm that does not support it", True),  # torch's words for a missing rule
    ("this model's own unfinished branch", False),
])
def test_only_a_missing_forward_rule_becomes_the_hessian_estimators_refusal(said: str, refused: bool):
    from torchfim.engine.backend import NoForwardDerivative, second_order_support

    with pytest.raises(NotImplementedError if not refused else NoForwardDerivative) as caught:
        with second_order_support():
            raise NotImplementedError(said)
    assert isinstance(caught.value, TorchfimError) == refused


def test_integer_options_take_numpy_and_tensor_integers_as_the_int_they_hold(tmp_path) -> None:
    """A step counter from np.arange or a 0-dim tensor, n_samples from a NumPy config: taken as the int they hold
    (kept as an int in records and state), while bools, floats and tensors of other shapes are still refused."""
    import numpy as np

    torch.manual_seed(0)
    model, x = tanh_mlp(3), mlp_inputs(8)
    gen = torch.Generator().manual_seed(1)
    reference = torchfim.fisher(model, x, estimator="score", n_samples=2, generator=gen)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(torchfim.fisher(model, x, estimator="score", n_samples=np.int64(2), generator=gen), reference)
    monitor = torchfim.train.FisherTraceMonitor(model, x, every=np.int32(2), subset=np.int64(4),
                                                csv_path=tmp_path / "trace.csv")
    record = monitor.step(torch.tensor(4))
    assert type(record.step) is int and record.step == 4 and monitor.every == 2 and type(monitor.subset) is int
    assert (tmp_path / "trace.csv").read_text().splitlines()[1].startswith("4,")
    penalty = torchfim.train.FisherPenalty(model, alpha=0.1, every=np.int64(3))
    penalty(x, step=np.int64(3)).backward()
    assert type(penalty.last_step) is int and penalty.every == 3
    gen = torch.Generator().manual_seed(1)  # a 0-dim array (np.asarray of a config value) holds one integer too
    assert torch.equal(torchfim.fisher(model, x, estimator="score", n_samples=np.array(2), generator=gen), reference)
    for bad in (True, 2.0, np.float64(2.0), torch.tensor([2]), torch.tensor(2.0), np.bool_(True), np.array(2.0),
                np.array([2])):
        with pytest.raises(torchfim.TorchfimError, match="n_samples must be a positive integer"):
            torchfim.fisher(model, x, estimator="score", n_samples=bad)
        with pytest.raises(torchfim.TorchfimError, match="step must be an integer"):
            monitor.step(bad)


def test_bernoulli_width_error_names_independent_binary_labels(model):
    """Several outputs under the Bernoulli family: categorical for exclusive classes, or (batch, T, 1) for T
    independent binary labels (the reading docs/models.md gives)."""
    with pytest.raises(TorchfimError, match=r"for 3 independent binary labels.*\(batch, 3, 1\)"):
        torchfim.fisher(model, mlp_inputs(4), family="bernoulli")


def test_a_positions_family_with_position_outputs_names_the_base_family_and_mask():
    """family=Positions(Bernoulli(), 3, mask) with (B, 3, 1) outputs: pass family='bernoulli', mask=... instead.
    Before: 'Positions needs a base Family instance … pass e.g. Positions(Categorical(), (seq_len,), mask)'."""
    from torchfim.families import Bernoulli, Positions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Unflatten(1, (3, 1))).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False]] * 4)
    with pytest.raises(TorchfimError, match=r"family=Bernoulli\(\) \(or 'bernoulli'\) and mask=") as caught:
        torchfim.fisher(net, x, family=Positions(Bernoulli(), 3, mask), structure="trace")
    assert "Positions(Categorical()" not in str(caught.value)
    want = torchfim.fisher(net, x, family="bernoulli", mask=mask, structure="trace")
    flat = torchfim.fisher(net[0], x, family=Positions(Bernoulli(), 3, mask), structure="trace")
    assert torch.allclose(flat, want, rtol=1e-12, atol=0)


def test_matrix_fisher_outputs_as_a_matrix_are_told_to_reshape():
    """(B, 3, 3) outputs were read as 3 positions of 3 outputs ('expects 9 outputs … got 3')."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 9), nn.Unflatten(1, (3, 3))).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"read as 3 positions of 3 outputs; reshape them to \(batch, 9\)"):
        torchfim.fisher(net, x, family="matrix_fisher", structure="trace")
    assert torch.isfinite(torchfim.fisher(net[0], x, family="matrix_fisher", structure="trace"))


def test_matrix_fisher_at_positions_is_not_told_of_a_class_dim():
    """(B, 2, 2, 9): four matrices per input; no 'classes at 2×2 positions' warning (it has no classes)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 36), nn.Unflatten(1, (2, 2, 9))).double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        value = torchfim.fisher(net, torch.randn(4, 3, dtype=torch.float64), family="matrix_fisher", structure="trace")
    assert torch.isfinite(value) and not [w for w in record if "classes last" in str(w.message)]


def test_the_empirical_fishers_zero_standard_errors_come_with_a_warning():
    """The empirical Fisher draws no labels: its standard errors are 0 while its error, a bias, was 14-42% in a
    downstream-uses trial. The zeros stay (no label noise), with a warning that says what they do not cover."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 4).double(), torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    with pytest.warns(RuntimeWarning, match=r"standard errors are 0; they say nothing of its bias"):
        _, stderr = torchfim.fisher(model, x, estimator="empirical", targets=y, return_stderr=True)
    assert not bool(stderr.any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchfim.fisher(model, x, estimator="empirical", targets=y)
        torchfim.fisher(model, x, estimator="score", return_stderr=True)


def test_a_gamma_shape_that_underflows_is_named_with_the_smallest_outputs():
    """Log-shapes near −800 make the shape e^o exactly 0 in float64, and the label draw divides by it: the refusal
    blamed overflow and sent the user to the largest outputs (a statistics trial)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()

    class LogShapes(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o = self.lin(x)
            return torch.cat([o[:, :2], o[:, 2:] - 800], -1)

    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.isfinite(torchfim.fisher(LogShapes(), x, family="gamma", structure="trace"))
    with pytest.raises(TorchfimError, match=r"gamma shape e\^o that underflows to 0.*the largest and the smallest"):
        torchfim.fisher(LogShapes(), x, family="gamma", estimator="score", structure="trace",
                        generator=torch.Generator().manual_seed(0))


def test_samples_needed_of_a_zero_fisher_names_the_mask_and_saturation():
    """Every position masked: the message blamed the model ("check the model"), where the mask leaves nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that no position is observed comes first
        with pytest.raises(TorchfimError, match=r"no position is observed \(a mask, or labels of -100, leaves out "
                                                r"every one.*or the outputs are saturated"):
            torchfim.samples_needed(model, torch.randn(3, 4, 3), mask=torch.zeros(3, 4, dtype=torch.bool))


def test_a_penalty_of_a_model_frozen_whole_names_leaving_it_out_of_the_loss():
    """A phase that freezes the penalised module (a linear probe, say): the refusal says how to skip the penalty."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    penalty = torchfim.train.FisherPenalty(model, alpha=0.1)
    model.requires_grad_(False)
    with pytest.raises(TorchfimError, match=r"nothing to act on.*leave the penalty out of the loss \(its gradient is 0"):
        penalty(torch.randn(4, 3), step=0)
