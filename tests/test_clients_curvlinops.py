"""torchfim against curvlinops (``curvlinops-for-pytorch``) dense operators, float64.

curvlinops' operators are the curvature of the loss over the whole data set it is given: mini-batch
terms are weighted by ``B/N`` for ``reduction="mean"`` (a mean over inputs, as torchfim) and by 1
for ``"sum"``. ``GGNLinearOperator @ I`` is ``c Σ_i J_iᵀ ∇²ℓ_i J_i`` and ``EFLinearOperator @ I`` is
``c Σ_i ∇ℓ_i ∇ℓ_iᵀ`` (``c = 1/N`` or 1). So with ``CrossEntropyLoss(reduction="mean")`` they are
torchfim's exact and empirical Fisher; with ``MSELoss(reduction="sum")`` (``ℓ = ‖f − y‖²``, twice the
unit-Gaussian negative log-likelihood) they are ``2N`` and ``4N`` times torchfim's Gaussian ones.

curvlinops' K-FAC is not compared: torchfim has no K-FAC structure.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from torch import nn

import torchfim

curvlinops = clients.need("curvlinops")

N, WIDTH = 10, 3
MODELS = [pytest.param((tanh_mlp, mlp_inputs), id="mlp"), pytest.param((strided_cnn, cnn_inputs), id="cnn")]
#: family → (loss, factor of the GGN over torchfim's exact, factor of the EF over torchfim's empirical)
HEADS = {
    "categorical": (nn.CrossEntropyLoss(reduction="mean"), 1.0, 1.0),
    "gaussian": (nn.MSELoss(reduction="sum"), 2.0 * N, 4.0 * N),
}


def problem(make, family: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list]:
    make_model, make_inputs = make
    g = torch.Generator().manual_seed(5)
    if family == "categorical":
        y = torch.randint(0, WIDTH, (N,), generator=g)
    else:
        y = torch.randn(N, WIDTH, generator=g, dtype=torch.float64)
    x = make_inputs(N)
    return make_model(WIDTH), x, y, [(x[:4], y[:4]), (x[4:], y[4:])]  # unequal mini-batches


def dense(operator_class, model: nn.Module, loss: nn.Module, data: list) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    operator = operator_class(model, loss, params, data)
    return operator @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)


@pytest.mark.parametrize("family", HEADS)
@pytest.mark.parametrize("make", MODELS)
def test_ggn_operator_is_exact_fisher(make, family: str) -> None:
    model, x, _, data = problem(make, family)
    loss, factor, _ = HEADS[family]
    want = torchfim.fisher(model, x, family=family, structure="full")
    assert clients.rel_err(dense(curvlinops.GGNLinearOperator, model, loss, data), factor * want) < 1e-12


@pytest.mark.parametrize("family", HEADS)
@pytest.mark.parametrize("make", MODELS)
def test_ef_operator_is_empirical_fisher(make, family: str) -> None:
    model, x, y, data = problem(make, family)
    loss, _, factor = HEADS[family]
    want = torchfim.fisher(model, x, family=family, estimator="empirical", structure="full", targets=y)
    assert clients.rel_err(dense(curvlinops.EFLinearOperator, model, loss, data), factor * want) < 1e-12
