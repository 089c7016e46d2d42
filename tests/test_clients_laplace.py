"""torchfim against laplace-torch's curvature (``Laplace(..., subset_of_weights="all")``), float64.

After ``.fit(loader)`` a Laplace object holds ``H``, the curvature **summed** over the data set:
each back-end returns ``factor · Σ_batch J_iᵀ ∇²ℓ_i J_i`` with ``CrossEntropyLoss(reduction="sum")``
(factor 1) for ``"classification"`` and ``MSELoss(reduction="sum")`` (factor ½) for
``"regression"``. So ``H`` is ``n`` × torchfim's exact Fisher (categorical, or Gaussian with σ = 1),
whatever ``sigma_noise`` is; the noise enters the posterior precision
``H/σ² + prior = n · I_Gaussian(σ) + prior``. The GGN back-ends (curvlinops, BackPACK, ASDL) are
compared in ``"diag"`` and ``"full"``; K-FAC (``"kron"``) is not, torchfim has none. laplace-torch's default
``subset_of_weights="last_layer"`` is compared with torchfim's Fisher with all but the last layer frozen.

The EF back-ends use ``factor · Σ_i g_i g_iᵀ`` with ``g_i`` the gradient of the summed loss: for
classification torchfim's empirical Fisher × n, for regression ``½ · (2 J_iᵀ r_i)(2 J_iᵀ r_i)ᵀ``,
i.e. 2n × torchfim's Gaussian empirical Fisher (laplace-torch 0.3 applies ½ once to a square).

laplace-torch's curvlinops back-end applies its operator to ``torch.eye(P)`` in the default dtype,
BackPACK's pooling derivatives use it too: the fits run with float64 as the default dtype.
"""

from __future__ import annotations

import clients  # first: laplace imports torchmetrics, which imports torchvision
import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from torch.utils.data import DataLoader, TensorDataset

import torchfim
from torchfim.families import Gaussian

laplace = clients.need("laplace")
from laplace.curvature import AsdlGGN, BackPackEF, BackPackGGN, CurvlinopsEF, CurvlinopsGGN  # noqa: E402

pytestmark = [  # BackPACK's and ASDL's hooks, not torchfim's
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using a non-full backward hook:FutureWarning"),
]

N, SIGMA = 10, 0.5
MLP = (tanh_mlp, mlp_inputs)
MODELS = [pytest.param(MLP, id="mlp"), pytest.param((strided_cnn, cnn_inputs), id="cnn")]
LIKELIHOODS = {"classification": ("categorical", 3), "regression": ("gaussian", 2)}
GGN_BACKENDS = [CurvlinopsGGN, BackPackGGN, AsdlGGN]


def fit(make, likelihood: str, structure: str, backend) -> tuple[object, torch.Tensor, torch.Tensor]:
    """A fitted Laplace object on a fresh copy of the model (BackPACK extends it in place), the
    inputs and the targets."""
    make_model, make_inputs = make
    width = LIKELIHOODS[likelihood][1]
    g = torch.Generator().manual_seed(5)
    x = make_inputs(N)
    if likelihood == "classification":
        y = torch.randint(0, width, (N,), generator=g)
    else:
        y = torch.randn(N, width, generator=g, dtype=torch.float64)
    model = make_model(width)  # outside the dtype context: initialised as everywhere else
    with clients.default_dtype(torch.float64):
        la = laplace.Laplace(model, likelihood, subset_of_weights="all", hessian_structure=structure,
                             backend=backend, sigma_noise=SIGMA if likelihood == "regression" else 1.0)
        la.fit(DataLoader(TensorDataset(x, y), batch_size=4))  # mini-batches of 4, 4 and 2
    return la, x, y


@pytest.mark.parametrize("backend", GGN_BACKENDS, ids=lambda b: b.__name__)
@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("make", MODELS)
def test_ggn_curvature_is_n_times_exact_fisher(make, likelihood: str, structure: str, backend) -> None:
    la, x, _ = fit(make, likelihood, structure, backend)
    model = make[0](LIKELIHOODS[likelihood][1])
    want = N * torchfim.fisher(model, x, family=LIKELIHOODS[likelihood][0], structure=structure)
    assert clients.rel_err(la.H, want) < 1e-12


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_regression_posterior_precision_is_gaussian_fisher_with_sigma(structure: str) -> None:
    la, x, _ = fit(MLP, "regression", structure, CurvlinopsGGN)
    prior = la.prior_precision_diag if structure == "diag" else torch.diag(la.prior_precision_diag)
    want = N * torchfim.fisher(tanh_mlp(2), x, family=Gaussian(sigma=SIGMA), structure=structure)
    assert clients.rel_err(la.posterior_precision - prior, want) < 1e-12
    assert clients.rel_err(la.H, SIGMA**2 * want) < 1e-12


@pytest.mark.parametrize("backend", [CurvlinopsEF, BackPackEF], ids=lambda b: b.__name__)
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_ef_curvature_is_empirical_fisher(likelihood: str, backend) -> None:
    la, x, y = fit(MLP, likelihood, "full", backend)
    family, width = LIKELIHOODS[likelihood]
    scale = N if likelihood == "classification" else 2 * N
    want = torchfim.fisher(tanh_mlp(width), x, family=family, estimator="empirical", structure="full", targets=y)
    assert clients.rel_err(la.H, scale * want) < 1e-12


def last_layer_only(model: torch.nn.Module) -> torch.nn.Module:
    """The recipe of docs/peers.md for laplace-torch's default ``subset_of_weights="last_layer"``: every parameter
    frozen but the last layer's."""
    model.requires_grad_(False)
    model[-1].requires_grad_(True)
    return model


@pytest.mark.parametrize("backend", [None, *GGN_BACKENDS[1:], CurvlinopsEF, BackPackEF],
                         ids=lambda b: "default" if b is None else b.__name__)
@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_default_last_layer_is_the_fisher_of_the_last_layer(likelihood: str, structure: str, backend) -> None:
    """peers.md, laplace-torch rows: they hold for ``subset_of_weights="all"``; with laplace-torch's default
    ``"last_layer"`` each row is ``la.H`` of torchfim's Fisher with all but the last layer frozen: the last layer's
    entries of the all-weights result, ``P_last × P_last`` (or ``P_last``), not the rows' ``P × P``. The default
    back-end is CurvlinopsGGN; CurvlinopsEF with ``"diag"`` on the last layer gives zeros (laplace-torch 0.3)."""
    family, width = LIKELIHOODS[likelihood]
    g = torch.Generator().manual_seed(5)
    x = mlp_inputs(N)
    y = (torch.randint(0, width, (N,), generator=g) if likelihood == "classification"
         else torch.randn(N, width, generator=g, dtype=torch.float64))
    model = tanh_mlp(width)  # outside the dtype context, as in fit
    with clients.default_dtype(torch.float64):
        la = laplace.Laplace(model, likelihood, hessian_structure=structure,  # subset_of_weights: last layer
                             **({} if backend is None else {"backend": backend}))
        la.fit(DataLoader(TensorDataset(x, y), batch_size=4))
    empirical = backend in (CurvlinopsEF, BackPackEF)
    # the la.H rows: n × the exact Fisher; n × (classification) or 2n × (regression) the empirical one
    scale = 2 * N if empirical and likelihood == "regression" else N
    kwargs = {"estimator": "empirical", "targets": y} if empirical else {}
    every = scale * torchfim.fisher(model, x, family=family, structure=structure, **kwargs)
    last = slice(-(model[-1].weight.numel() + width), None)  # the last layer's entries, at the end
    assert la.H.shape[0] == model[-1].weight.numel() + width < every.shape[0]
    if backend is CurvlinopsEF and structure == "diag":
        assert not la.H.any()  # laplace-torch 0.3's last-layer diagonal EF through curvlinops is zero
        return
    want = scale * torchfim.fisher(last_layer_only(model), x, family=family, structure=structure, **kwargs)
    assert clients.rel_err(la.H, want) < 1e-12
    assert clients.rel_err(la.H, every[last, last] if structure == "full" else every[last]) < 1e-12
