"""What the variance side says where a user trial found it silent or pointing the wrong way: entries that no number
of labels makes accurate, the combined estimator's label count, estimators and options the variance functions do not
take, and results that overflowed (NaN returned without a word)."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch
from cases import mlp_inputs, tanh_mlp
from torch import nn

import torchfim
from torchfim import TorchfimError


class _SquaredFeature(nn.Module):
    """``o = (x·w1)²·w2 + lin(x)`` at ``w1 = 0``: the Fisher of ``w1`` is 0 (``∂o/∂w1 = 0`` there) while Î2's entries of
    ``w1`` vary (``∂²o/∂w1² = 2 x xᵀ w2 ≠ 0``)."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(1, 2, dtype=torch.float64))
        self.w2 = nn.Parameter(torch.randn(3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
        self.lin = nn.Linear(2, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.w1.T) ** 2 @ self.w2.T + self.lin(x)


def test_entries_with_fisher_zero_whose_estimate_varies_are_named() -> None:
    """Before: k = 1 without a word, while one Î2 draw of those entries is 0.40 ± 1.09 for a true 0. Now a warning
    names the two entries and their deviation; k is the worst of the informative entries, by hand."""
    torch.manual_seed(1)
    model, x = _SquaredFeature(), torch.randn(8, 2, dtype=torch.float64)
    value = torchfim.fisher(model, x, structure="diag")
    var = torchfim.fisher_variance(model, x, estimator="hessian", structure="diag")
    assert bool((value[:2] == 0).all()) and bool((var[:2] > 0.1).all())
    with pytest.warns(RuntimeWarning, match=rf"2 diagonal entries have an exact Fisher of 0 \(below 1e-12 of the "
                                            rf"largest entry\) but a hessian estimate that varies \(largest standard deviation with one label {var[:2].max().sqrt():.3g}\)"):
        k = torchfim.samples_needed(model, x, estimator="hessian", structure="diag", rel_error=0.1)
    kept = value.abs() > 0
    assert k == max(1, math.ceil(float((var[kept] / (0.1 * value[kept]) ** 2).max()) * (1 - 1e-12)))


def test_round_off_variances_of_entries_with_fisher_zero_are_not_named() -> None:
    """An entry whose Fisher is 0 and whose variance is round-off (3.5e-33 against entries of order 1, a trial) was
    named as varying: a variance below 1e-12 of the informative entries' largest is not."""
    from torchfim.planning import _name_uninformative

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        _name_uninformative(torch.tensor([3.5e-33, 0.0], dtype=torch.float64), "hessian", torch.tensor(2.0))
    with pytest.warns(RuntimeWarning, match="1 diagonal entry has an exact Fisher of 0"):
        _name_uninformative(torch.tensor([3.5e-3, 0.0], dtype=torch.float64), "hessian", torch.tensor(2.0))


def test_the_entry_that_sets_the_diagonal_k_is_named() -> None:
    """A trial: k = 5117 for Î2's diagonal on a tanh classifier where the trace needs 1-3, without a word of which
    entry asked for it. The warning names that entry (parameter and index, by hand from the variances and the Fisher),
    its relative standard error with one label, and the median entry's k."""
    model, x = tanh_mlp(3), mlp_inputs(16)
    var = torchfim.fisher_variance(model, x, estimator="hessian", structure="diag")
    value = torchfim.fisher(model, x, structure="diag")
    labels = var / (0.1 * value) ** 2
    worst = int(labels.argmax())
    named = list(model.named_parameters())  # all trainable here
    ends = list(itertools.accumulate(p.numel() for _, p in named))
    at = next(i for i, end in enumerate(ends) if worst < end)
    name, shape = named[at][0], named[at][1].shape
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst - ends[at] + named[at][1].numel()), shape))
    median = max(1, math.ceil(float(labels.median()) * (1 - 1e-12)))
    assert labels.max() > 10 * median  # the test needs a diagonal whose worst entry stands out
    with pytest.warns(RuntimeWarning) as caught:
        k = torchfim.samples_needed(model, x, estimator="hessian", structure="diag", rel_error=0.1)
    message = next(str(w.message) for w in caught if "is set by entry" in str(w.message))
    assert f"structure='diag') = {k} is set by entry {index} of {name!r}" in message
    assert f"relative standard error with one label is {float(var[worst].sqrt() / value[worst].abs()):.3g}" in message
    assert f"the median entry needs {median} labels per input" in message


def test_the_worst_entry_of_more_than_2_to_the_24_entries_is_named() -> None:
    """torch's ``quantile`` refuses more than 2**24 entries: samples_needed(structure='diag') of a model that large
    raised RuntimeError after computing everything (a review). The 90th percentile is taken by ``kthvalue``."""
    from torchfim.planning import _name_worst_entry

    n = 2**24 + 8
    model = nn.Module()
    model.big = nn.Parameter(torch.empty(n, dtype=torch.float32))
    labels = torch.ones(n, dtype=torch.float32)
    labels[n - 3] = 500.0
    with pytest.warns(RuntimeWarning, match=rf"= 500 is set by entry \({n - 3},\) of 'big'.*median entry needs 1 "
                                            r"labels per input and 90% of the entries 1"):
        _name_worst_entry(labels, 0.1, torch.arange(n), model, "score")


def test_no_entry_is_named_where_the_diagonal_is_even() -> None:
    """Î2 of a linear Gaussian model is the Fisher itself (variance 0): k = 1 for every entry, nothing to name; nor is
    anything named for the trace."""
    torch.manual_seed(0)
    model, x = nn.Linear(3, 2).double(), torch.randn(10, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*is set by entry")
        assert torchfim.samples_needed(model, x, family="gaussian", estimator="hessian", structure="diag") == 1
        torchfim.samples_needed(tanh_mlp(3), mlp_inputs(16), estimator="hessian", structure="trace")


def test_samples_needed_for_the_combined_estimator() -> None:
    """``V₁`` of the combined estimator from ``combined_variance``; never more labels than the better of Î1 and Î2."""
    model, x = tanh_mlp(3), mlp_inputs(16)
    for structure in ("trace", "diag"):
        k = torchfim.samples_needed(model, x, estimator="combined", structure=structure, rel_error=0.05)
        v = torchfim.combined_variance(model, x, structure=structure).reshape(-1)
        f = torchfim.fisher(model, x, structure=structure).reshape(-1)
        kept = f.abs() > 1e-12 * f.abs().max()
        assert k == max(1, math.ceil(float((v[kept] / (0.05 * f[kept]) ** 2).max()) * (1 - 1e-12)))
        others = [torchfim.samples_needed(model, x, estimator=e, structure=structure, rel_error=0.05)
                  for e in ("score", "hessian")]
        assert k <= min(others)


def test_estimators_and_options_the_variance_functions_do_not_take_are_named() -> None:
    model, x = tanh_mlp(3), mlp_inputs(6)
    with pytest.raises(TorchfimError, match=r"fisher_variance takes estimator='score' or 'hessian'; the combined "
                                            r"estimator's variance is torchfim.combined_variance"):
        torchfim.fisher_variance(model, x, estimator="combined")
    with pytest.raises(TorchfimError, match=r"variance_bound takes estimator='score' or 'hessian': "
                                            r"estimator='exact' draws no labels"):
        torchfim.variance_bound(model, x, estimator="exact")
    with pytest.raises(TorchfimError, match=r"variance_bound\(\) takes no keyword argument 'n_sample': n_samples="):
        torchfim.variance_bound(model, x, n_sample=3)


@pytest.mark.parametrize("structure", ["trace", "diag"])
def test_across_processes_false_is_the_single_process_call(structure: str) -> None:
    """Code passing the flag as a variable (``across_processes=distributed``) met a TypeError from the one-pass
    trace bounds on its single-process path (a processes trial)."""
    model, x = tanh_mlp(3), mlp_inputs(6)
    for estimator in ("score", "hessian"):
        plain = torchfim.variance_bound(model, x, estimator=estimator, structure=structure)
        assert torch.equal(torchfim.variance_bound(model, x, estimator=estimator, structure=structure,
                                                   across_processes=False), plain)


def test_overflowed_covariance_and_combined_variance_are_refused_and_float64_is_not_told_to_use_float64() -> None:
    """Pre-activations of 1 from inputs of 1e160 and weights of 1e-160: Jacobians of 1e160, their squares overflow
    float64. Before: fisher_covariance and combined_variance returned NaN entries without a word; the refusal told a
    float64 model to "compute in float64 with model.double()"."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    with torch.no_grad():
        model[0].weight.mul_(1e-160)
    x = torch.randn(5, 2, dtype=torch.float64) * 1e160
    for call in (lambda: torchfim.fisher_covariance(model, x, family="bernoulli", structure="diag"),
                 lambda: torchfim.combined_variance(model, x, family="bernoulli", structure="diag")):
        with pytest.raises(TorchfimError, match=r"overflowed even in torch.float64") as caught:
            call()
        assert "model.double()" not in str(caught.value)


def test_a_bound_whose_moments_overflow_is_refused_by_name() -> None:
    """A heteroscedastic Gaussian head at log-variance −720: Λ_μμ = e^720 overflows float64, and the Î1 bound's
    eigen-solve failed inside torch ("linalg.eigh … failed to converge"). Now the overflow is named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        model[2].bias[1] = -720.0
    x = torch.randn(5, 2, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"fourth moments of the 'heteroscedastic_gaussian' family's scores "
                                            r"overflowed float64"):
        torchfim.variance_bound(model, x, family="heteroscedastic_gaussian", estimator="score", structure="diag")
