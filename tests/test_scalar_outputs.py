"""Outputs ``(batch,)``: one number per input, as a binary classifier returns its logits for
``BCEWithLogitsLoss`` (``model(x).squeeze(-1)``) and a regression its means.

Before, every entry point refused them ("expected (batch, C)"), although the issue's outputs for the
families other than the categorical are ``(batch, *positions)`` or ``(batch, *positions, d)``. They are
read as the column ``(batch, 1)``, with targets ``(batch,)``. Oracles: ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from
``torch.func`` Jacobians of the model returning ``(batch, 1)``; for the random estimators, the variance
and the penalty, that model's results with the same seed (each tested against its definition elsewhere).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from cases import mlp_inputs, tanh_mlp
from clients import rel_err
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor

FAMILIES = ["bernoulli", "gaussian", "poisson"]


def _column(seed: int = 0) -> nn.Module:
    return tanh_mlp(1, seed=seed)


def _scalar(seed: int = 0) -> nn.Module:
    return nn.Sequential(_column(seed), nn.Flatten(0))


def _targets(family: str, n: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    if family == "gaussian":
        return torch.randn(n, generator=generator, dtype=torch.float64)
    return torch.randint(0, 2 if family == "bernoulli" else 4, (n,), generator=generator).double()


@pytest.mark.parametrize("family", FAMILIES)
def test_the_fisher_of_one_output_per_input_is_that_of_the_column(family: str) -> None:
    x = mlp_inputs(9)
    assert _scalar()(x).shape == (9,)
    want = exact_fisher(_column(), x, family)
    for structure, expected in (("full", want), ("diag", torch.diagonal(want)), ("trace", torch.trace(want))):
        assert rel_err(torchfim.fisher(_scalar(), x, family=family, structure=structure), expected) < 1e-10
    y = _targets(family, 9)
    for estimator, targets in (("score", None), ("hessian", None), ("empirical", y)):
        got, plain = (torchfim.fisher(m, x, family=family, structure="diag", estimator=estimator, targets=targets,
                                      generator=torch.Generator().manual_seed(2)) for m in (_scalar(), _column()))
        assert rel_err(got, plain) < 1e-12, estimator
    got, plain = (torchfim.fisher_variance(m, x, family=family, structure="diag") for m in (_scalar(), _column()))
    assert rel_err(got, plain) < 1e-12


@pytest.mark.parametrize("family", FAMILIES)
def test_the_monitor_and_penalty_take_one_output_per_input(family: str) -> None:
    x, y = mlp_inputs(8), _targets(family, 8)
    traces = [FisherTraceMonitor(m, x, family=family, every=1, n_samples=3,
                                 generator=torch.Generator().manual_seed(4)).measure(0).trace
              for m in (_scalar(), _column())]
    assert traces[0] == pytest.approx(traces[1], rel=1e-12)
    grads = []
    for model, loss in ((_scalar(), lambda out: F.mse_loss(out, y)), (_column(), lambda out: F.mse_loss(out[:, 0], y))):
        pen = FisherPenalty(model, family=family, alpha=0.3, grad_method="finite_difference",
                            generator=torch.Generator().manual_seed(5))
        pen.penalised_loss(x, loss, step=0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert rel_err(grads[0], grads[1]) < 1e-12


def test_one_logit_per_input_under_the_categorical_family_names_the_bernoulli() -> None:
    with pytest.raises(torchfim.TorchfimError, match="at least 2 logits per input, got 1.*family='bernoulli'"):
        torchfim.fisher(_scalar(), mlp_inputs(4), structure="diag")


def test_a_single_number_is_refused_with_the_shapes_it_could_have_been() -> None:
    class Total(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _column()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x).sum()

    with pytest.raises(torchfim.TorchfimError, match=r"single number.*\(batch,\) for one output per input"):
        torchfim.fisher(Total(), mlp_inputs(4), family="gaussian", structure="diag")
