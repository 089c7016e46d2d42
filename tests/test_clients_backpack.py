"""torchfim against BackPACK (``backpack-for-pytorch``) on an MLP and a CNN, float64.

Conventions (BackPACK differentiates the loss it is given; torchfim returns means over inputs):

* ``DiagGGNExact`` of ``Σ_i ℓ_i`` (``reduction="sum"``) is ``Σ_i diag(J_iᵀ ∇²ℓ_i J_i)``. For
  ``CrossEntropyLoss`` ``∇²ℓ = diag p − p pᵀ`` is the categorical output Fisher, so it is ``n`` ×
  torchfim's exact diagonal; for ``MSELoss`` ``ℓ = ‖f − y‖²`` has ``∇²ℓ = 2I`` while the unit-variance
  Gaussian has ``Λ = I``: ``2n`` ×. With ``reduction="mean"`` the loss is divided by ``n`` (CE) or
  ``n·C`` (MSE, the mean over all ``n·C`` entries).
* ``BatchGrad`` of ``Σ_i ℓ_i`` gives per-input gradients ``g_i = ∇ℓ_i``: ``g_i = −J_iᵀ u_i`` for CE,
  ``g_i = −2 J_iᵀ u_i`` for MSE, with ``u_i = ∇_f log p(y_i|f_i)``; so ``(1/n) Σ g_i g_iᵀ`` is torchfim's
  ``estimator="empirical"`` (× 4 for MSE).
"""

from __future__ import annotations

import copy

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from torch import nn

import torchfim

backpack = clients.need("backpack")
from backpack.extensions import BatchGrad, DiagGGNExact  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")

N, WIDTH = 10, 3
MODELS = [pytest.param((tanh_mlp, mlp_inputs), id="mlp"), pytest.param((strided_cnn, cnn_inputs), id="cnn")]
#: family → (loss class, factor of Σ diag GGN of the summed loss over n × torchfim's mean)
HEADS = {"categorical": (nn.CrossEntropyLoss, 1.0), "gaussian": (nn.MSELoss, 2.0)}


def targets(family: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    if family == "categorical":
        return torch.randint(0, WIDTH, (N,), generator=g)
    return torch.randn(N, WIDTH, generator=g, dtype=torch.float64)


def run_backpack(model: nn.Module, loss: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: int,
                 extension) -> torch.Tensor:
    """BackPACK on an extended copy of ``model`` over ``chunks`` mini-batches, flattened in parameter
    order: the sum over mini-batches of ``DiagGGNExact`` (P,), or ``BatchGrad``'s per-input gradients (n, P)."""
    ext = backpack.extend(copy.deepcopy(model))
    loss = backpack.extend(loss)
    params = list(ext.parameters())
    results = []
    with clients.default_dtype(torch.float64):  # BackPACK's pooling derivatives use the default dtype
        for xb, yb in zip(x.chunk(chunks), y.chunk(chunks)):
            ext.zero_grad()
            with backpack.backpack(extension):
                loss(ext(xb), yb).backward()
            if isinstance(extension, DiagGGNExact):
                results.append(torch.cat([p.diag_ggn_exact.reshape(-1) for p in params]))
            else:
                results.append(torch.cat([p.grad_batch.reshape(len(xb), -1) for p in params], dim=1))
    return sum(results) if isinstance(extension, DiagGGNExact) else torch.cat(results)


@pytest.mark.parametrize("family", HEADS)
@pytest.mark.parametrize("make", MODELS)
def test_diag_ggn_exact_of_summed_loss_is_n_times_fisher(make, family: str) -> None:
    make_model, make_inputs = make
    model, x, y = make_model(WIDTH), make_inputs(N), targets(family)
    loss_class, factor = HEADS[family]
    got = run_backpack(model, loss_class(reduction="sum"), x, y, 2, DiagGGNExact())
    want = torchfim.fisher(model, x, family=family, structure="diag")
    assert clients.rel_err(got, factor * N * want) < 1e-12


@pytest.mark.parametrize("make", MODELS)
def test_diag_ggn_exact_of_mean_loss(make) -> None:
    """One mini-batch, ``reduction="mean"``: CE gives torchfim's mean; MSE the ``2/C`` × it."""
    make_model, make_inputs = make
    x = make_inputs(N)
    for family, scale in (("categorical", 1.0), ("gaussian", 2.0 / WIDTH)):
        model = make_model(WIDTH)
        loss_class, _ = HEADS[family]
        got = run_backpack(model, loss_class(reduction="mean"), x, targets(family), 1, DiagGGNExact())
        want = torchfim.fisher(model, x, family=family, structure="diag")
        assert clients.rel_err(got, scale * want) < 1e-12


@pytest.mark.parametrize("family", HEADS)
@pytest.mark.parametrize("make", MODELS)
def test_batch_grad_outer_products_are_empirical_fisher(make, family: str) -> None:
    make_model, make_inputs = make
    model, x, y = make_model(WIDTH), make_inputs(N), targets(family)
    loss_class, factor = HEADS[family]
    grads = run_backpack(model, loss_class(reduction="sum"), x, y, 2, BatchGrad())  # (n, P)
    want = torchfim.fisher(model, x, family=family, estimator="empirical", structure="full", targets=y)
    assert clients.rel_err(grads.T @ grads / N, factor**2 * want) < 1e-12
