"""Metamorphic relations of the output families: what a transformation of the model must leave unchanged.

* A float32 copy of a float64 model draws the same categorical labels from the same seed, so its sampled estimates
  (Î1, Î2) are the float64 ones to float32's rounding. Before, the categorical sampler drew float32 uniforms and
  summed the probabilities in float32: other labels altogether (Î1's diagonal 0.18 off, relative, Î2's 1.09), and
  a class of probability below float32's resolution in the cumulative sum had an empty interval and was never drawn
  (Bernoulli's rarer label had the same fault, mended before). Oracle: the same estimator of the float64 copy.
* Two logits under the categorical family are one logit, their difference ``o₁ − o₀``, under the Bernoulli family
  (``Λ = p(1 − p) vvᵀ`` with ``v = (−1, 1)``): the exact Fisher, the variances of Î1 and Î2 and their covariance agree
  on every structure and backend. Oracle: the Bernoulli quantities of the difference model.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import torchfim
from torchfim.families import Categorical


def _rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 logits of three classes, the boundary between class 0 and the rare class 1 placed at float64 uniforms
    ``U`` (those of ``Generator().manual_seed(4)``); class 1 has probability ``r`` from 1e-9 to 1e-6 (about
    2⁻³⁰ to 2⁻²⁰, under and over float32's resolution of the cumulative sum near ``U``). Returns the logits and U."""
    uniform = torch.rand((n, 1), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    rare = torch.logspace(-9, -6, n, dtype=torch.float64).unsqueeze(1)
    p = torch.cat([uniform - rare / 2, rare, 1 - uniform - rare / 2], 1).clamp_min(1e-12)
    return p.log().float(), uniform


def test_categorical_labels_of_float32_logits_are_the_float64_inverse_cdf():
    """The rule: the class whose interval of the float64 cumulative sum of the model's probabilities holds ``U·Σp``,
    ``U`` uniform in float64. Oracle: that rule on the same uniforms, with the probabilities of each float32 row
    (softmax in float32, as the sampler takes them) summed in float64. Before: 16637 of the 20000 labels wrong, the
    rare class drawn in none of the 13266 rows where the oracle draws it (the float32 rule on these same uniforms:
    5550 wrong, the rare class drawn in 10073 of them)."""
    logits, uniform = _rows(20000)
    labels = Categorical().sample(logits, 1, torch.Generator().manual_seed(4))
    cdf = torch.softmax(logits, -1).double().cumsum(-1)
    want = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)
    assert int((want == 1).sum()) > 1000  # the rare class is drawn where U lies in its interval
    assert torch.equal(labels, want)


@pytest.mark.parametrize("estimator", ["score", "hessian"])
@pytest.mark.parametrize("structure", ["diag", "trace"])
def test_float32_copy_draws_the_labels_of_the_float64_model(estimator, structure):
    """Î1 and Î2 of a float32 copy, same seed, against the float64 model's: within 1e-5 relative (float32's rounding of
    the Jacobians; measured 3.1e-7 at most). Before, with other labels: 0.18 (Î1 diagonal), 5.7e-4 (Î1 trace), 1.09
    (Î2 diagonal) and 0.087 (Î2 trace)."""
    torch.manual_seed(0)
    m64 = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    x = 3 * torch.randn(64, 4, dtype=torch.float64)
    got = torchfim.fisher(copy.deepcopy(m64).float(), x.float(), estimator=estimator, structure=structure,
                          n_samples=4, generator=torch.Generator().manual_seed(1))
    want = torchfim.fisher(m64, x, estimator=estimator, structure=structure, n_samples=4,
                           generator=torch.Generator().manual_seed(1))
    assert got.dtype == torch.float32
    assert float((got.double() - want).abs().max()) <= 1e-5 * float(want.abs().max())


class _Difference(nn.Module):
    """The logit ``o₁ − o₀`` of a two-class model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = self.model(x)
        return o[:, 1:] - o[:, :1]


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("structure", ["full", "diag", "trace", "blocks"])
def test_two_class_categorical_is_bernoulli_on_the_logit_difference(backend, structure):
    """Exact Fisher, Var Î1, Var Î2 and Cov(Î1, Î2), to 1e-12 relative (measured: 2e-15 at most)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(9, 4, dtype=torch.float64)
    calls = {"fisher": lambda m, **k: torchfim.fisher(m, x, **k),
             "score variance": lambda m, **k: torchfim.fisher_variance(m, x, estimator="score", **k),
             "hessian variance": lambda m, **k: torchfim.fisher_variance(m, x, estimator="hessian", **k),
             "covariance": lambda m, **k: torchfim.fisher_covariance(m, x, **k)}
    for what, call in calls.items():
        two = call(model, structure=structure, backend=backend)
        one = call(_Difference(model), family="bernoulli", structure=structure, backend=backend)
        if structure == "blocks":
            one = {name.removeprefix("model."): block for name, block in one.items()}
            assert one.keys() == two.keys()
            two, one = torch.cat([b.flatten() for b in two.values()]), torch.cat([one[n].flatten() for n in two])
        assert float((one - two).abs().max()) <= 1e-12 * float(two.abs().max()), what


def test_categorical_labels_do_not_depend_on_the_rows_the_float64_sums_are_formed_in(monkeypatch):
    """The float64 cumulative sums are formed a few rows at a time, so that a vocabulary's probabilities need no float64
    copy twice their size; the labels are those of one pass over all rows (the uniforms are drawn first)."""
    import torchfim.families.categorical as categorical

    logits = 4 * torch.randn(7, 5, 33, generator=torch.Generator().manual_seed(0))
    whole = Categorical().sample(logits, 3, torch.Generator().manual_seed(1))
    monkeypatch.setattr(categorical, "_CHUNK_ELEMENTS", 40)  # one row of 33 classes per chunk
    assert torch.equal(Categorical().sample(logits, 3, torch.Generator().manual_seed(1)), whole)
    cdf = torch.softmax(logits.double(), -1).cumsum(-1)  # and they are the inverse CDF of the whole rows
    u = torch.rand(7, 5, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.equal(torch.searchsorted(cdf, u * cdf[..., -1:], right=True), whole)
