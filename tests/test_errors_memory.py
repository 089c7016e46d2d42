"""Results that would not fit in memory are refused with the fix before they are allocated (issue 2, point 5): a
dense P × P matrix, the closed forms' Jacobians (cut into smaller mini-batches where that changes nothing), a
bound's per-input constant, and the functional backend's whole-output pull-backs.
"""

from __future__ import annotations

import error_fixtures
import pytest
import torch
from torch import nn

import torchfim
from torchfim import TorchfimError

model = error_fixtures.model  # a fixture the tests take


def test_full_too_large_for_memory():
    big = nn.Linear(2000, 100)  # P ≈ 2·10⁵: a dense P×P is ≈ 300 GiB
    with pytest.raises(TorchfimError, match="structure='full' needs a 200100×200100 matrix.*use structure='diag'"):
        torchfim.fisher(big, torch.randn(2, 2000), family="gaussian", structure="full")
    # diag on the same model is fine.
    assert torchfim.fisher(big, torch.randn(2, 2000), family="gaussian").shape == (200100,)


#: The closed forms on one (B, C) output: call, and whether it builds a C × C output Gram matrix per input
#: (the trace of Î1's variance does, the diagonals do not).
CLOSED_FORM_CALLS = {
    "fisher_variance": (lambda m, x: torchfim.fisher_variance(m, x, structure="trace"), True),
    "variance_bound": (lambda m, x: torchfim.variance_bound(m, x, structure="trace"), True),
    "fisher_covariance": (lambda m, x: torchfim.fisher_covariance(m, x, structure="trace"), True),
    "combined": (lambda m, x: torchfim.fisher(m, x, estimator="combined", structure="trace"), True),
    "samples_needed": (lambda m, x: torchfim.samples_needed(m, x), True),
    "return_stderr": (lambda m, x: torchfim.fisher(m, x, estimator="score", return_stderr=True), False),
    "compare_estimators": (lambda m, x: torchfim.compare_estimators(m, x), False),
    "diag variance": (lambda m, x: torchfim.fisher_variance(m, x, structure="diag"), False),
}
#: The one closed form that cannot cut a mini-batch: the combined estimator draws labels, and cutting would
#: change which rows get which.
UNCUT = {"combined"}


class _Cut(Exception):
    """Raised by the spy on the engine loop's recordings at the first smaller group."""


@pytest.mark.parametrize("call", list(CLOSED_FORM_CALLS))
def test_closed_forms_refuse_a_jacobian_that_would_not_fit_before_allocating_it(call, monkeypatch):
    """10,000 classes, 64 inputs, the per-module backend: pulled back together, one input's output numbers
    hold the 10⁴ × 10⁴ unit vectors and 10⁴ pull-backs of the layer's 10⁴ outputs, 2·10⁸ numbers (1.49 GiB
    in float32 with a working copy), and with its output Gram matrix 3·10⁸ (2.24 GiB); the mini-batch
    6.5·10⁹ (48.4 GiB), or 1.29·10¹⁰ with 64 Gram matrices (96.1 GiB). With 1 GiB free the closed forms
    refuse at once and name the alternatives. With 6 GiB one input fits but the mini-batch does not: the
    engine loop records it again in groups of the size that fits (64 · 6 / 48.4: 7; 64 · 6 / 96.1: 3), where
    the combined estimator, which draws labels and so cannot cut its mini-batches, gives that size in its
    error. Calls that also need the exact Fisher or Î2 (9,999 pull-backs per input here) refuse before
    starting them."""
    from torchfim import _memory, estimators
    from torchfim.engine import loop, row_groups

    def exact(*args, **kwargs):
        raise AssertionError("the exact Fisher ran before the closed form that refuses")

    monkeypatch.setattr(estimators, "_add_exact", exact)
    run, grams = CLOSED_FORM_CALLS[call]
    one, whole, most = ("2\\.24", "96\\.1", 3) if grams else ("1\\.49", "48\\.4", 7)
    model = nn.Linear(4, 10_000)
    x = torch.randn(64, 4)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    with pytest.raises(TorchfimError, match=rf"C = 10,000 output numbers.*one input needs about {one} GiB.*"
                                            r"1 GiB is available.*estimator='score'"):
        run(model, x)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 6 * 2**30)
    if call in UNCUT:
        with pytest.raises(TorchfimError, match=rf"a mini-batch of 64 inputs needs about {whole} GiB.*"
                                                rf"mini-batches of at most {most} inputs"):
            run(model, x)
        return
    # Row groups by size (row_groups.WHOLE_GROUP_ELEMENTS) would record these inputs one at a time from the
    # start: lifted, the memory check alone decides.
    monkeypatch.setattr(row_groups, "WHOLE_GROUP_ELEMENTS", 2**62)
    sizes, record = [], loop.recorded

    def spy(view, backend, part):
        sizes.append(part.size)
        if part.size < 64:  # the first smaller group: its pull-back would take minutes, the cut is what is tested
            raise _Cut
        return record(view, backend, part)

    monkeypatch.setattr(loop, "recorded", spy)
    with pytest.raises(_Cut):
        run(model, x)
    assert sizes[-2:] == [64, most], sizes


@pytest.mark.parametrize("structure", ["trace", "diag"])
def test_a_bounds_per_input_constant_comes_after_the_memory_check(structure, monkeypatch):
    """The kurtosis bound's ``E‖u‖⁴`` reads a ``C × C`` identity per input: it is taken at its first use,
    after the engine has refused the outputs, never before (a vocabulary would fail inside torch)."""
    from torchfim import _memory, variance

    taken = []
    own = variance._bound_scale
    monkeypatch.setattr(variance, "_bound_scale", lambda *args: taken.append(True) or own(*args))
    model, x = nn.Linear(4, 10_000), torch.randn(64, 4)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    with pytest.raises(TorchfimError, match="one input needs about"):
        torchfim.score_variance_bound_kurtosis(model, x, structure=structure)
    assert not taken
    small = nn.Linear(4, 3)  # the constant is still taken where the outputs fit
    torchfim.score_variance_bound_kurtosis(small, x[:4], structure=structure)
    assert taken


def test_the_functional_backend_sizes_whole_output_pull_backs_by_per_sample_gradients(monkeypatch):
    """The functional backend builds every input's Jacobian: 10,000 outputs by 50,000 parameters (with the
    unit vectors, 6·10⁸ numbers: 4.47 GiB) per input, where the per-module backend holds 1.49 GiB."""
    from torchfim import _memory

    model, x = nn.Linear(4, 10_000), torch.randn(64, 4)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2 * 2**30)
    with pytest.raises(TorchfimError, match=r"one input needs about 4\.47 GiB"):
        torchfim.fisher_variance(model, x, structure="diag", backend="functional")
    with pytest.raises(TorchfimError, match=r"a mini-batch of 64 inputs needs about 48\.4 GiB.*at most 2 inputs"):
        torchfim.fisher(model, x, estimator="combined", structure="diag", backend="modules")
