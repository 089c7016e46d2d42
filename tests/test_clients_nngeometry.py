"""torchfim against nngeometry's closed-form ``FIM`` in ``PMatDense`` and ``PMatDiag``, float64.

``nngeometry.metrics.FIM(model, loader, representation, variant=...)`` is the mean over the loader's
examples of ``J_iᵀ Λ_i J_i`` with the expectation over labels in closed form, as torchfim's exact
Fisher. Its variants name torchfim's families: ``"classif_logits"`` (softmax over logits) is
``categorical``, ``"classif_binary_logits"`` (one sigmoid logit) is ``bernoulli`` and ``"regression"``
(mean of a normal with identity covariance) is ``gaussian`` with σ = 1.

nngeometry builds its work tensors with torch's default dtype: under float32, ``classif_logits``
fails on a float64 model (a float32 triangular matrix times float64 logits) and the convolution
diagonal is rounded to float32, so its calls run with float64 as the default dtype.

Also checked: ``FIM_MonteCarlo(..., trials=k)`` is torchfim's ``estimator="score"`` with ``n_samples=k`` in
distribution (the mean and spread of repetitions against ``fisher_variance``), and ``LayerCollection.from_model``
keeps frozen layers, where a ``layer_collection`` of the trainable layers gives torchfim's matrix.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from torch.utils.data import DataLoader, TensorDataset

import torchfim

nngeometry = clients.need("nngeometry")
from nngeometry.layercollection import LayerCollection  # noqa: E402
from nngeometry.metrics import FIM, FIM_MonteCarlo  # noqa: E402
from nngeometry.object import PMatDense, PMatDiag  # noqa: E402

N = 10
MODELS = [pytest.param((tanh_mlp, mlp_inputs), id="mlp"), pytest.param((strided_cnn, cnn_inputs), id="cnn")]
#: nngeometry variant → (torchfim family, output width)
VARIANTS = {"classif_logits": ("categorical", 3), "classif_binary_logits": ("bernoulli", 1), "regression": ("gaussian", 2)}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("make", MODELS)
def test_fim_dense_and_diag_are_exact_fisher(make, variant: str) -> None:
    make_model, make_inputs = make
    family, width = VARIANTS[variant]
    model, x = make_model(width), make_inputs(N)
    loader = DataLoader(TensorDataset(x), batch_size=4)  # mini-batches of 4, 4 and 2
    with clients.default_dtype(torch.float64):
        dense = FIM(model, loader, PMatDense, variant=variant).to_torch()
        diag = FIM(model, loader, PMatDiag, variant=variant).get_diag()
    want = torchfim.fisher(model, x, family=family, structure="full")
    assert clients.rel_err(dense, want) < 1e-12
    assert clients.rel_err(diag, torchfim.fisher(model, x, family=family, structure="diag")) < 1e-12
    assert clients.rel_err(diag, want.diagonal()) < 1e-12


def test_fim_monte_carlo_is_score_estimator() -> None:
    """peers.md, nngeometry ``FIM_MonteCarlo(..., variant="classif_logits", trials=k)`` row: torchfim's
    ``fisher(estimator="score", n_samples=k)`` in distribution. The mean of 200 repetitions of its diagonal is the
    exact diagonal within 5 standard errors ``√(V/200)`` in every entry, ``V`` torchfim's ``fisher_variance``, and
    their variance over repetitions is ``V`` (median ratio within [0.8, 1.25])."""
    k, repeats = 2, 200
    model, x = tanh_mlp(3), mlp_inputs(N)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    draws = []
    with clients.default_dtype(torch.float64):
        for r in range(repeats):
            torch.manual_seed(100 + r)  # nngeometry samples from torch's global generator
            draws.append(FIM_MonteCarlo(model, loader, PMatDiag, variant="classif_logits", trials=k).get_diag())
    draws = torch.stack(draws)
    exact = torchfim.fisher(model, x, structure="diag")
    v = torchfim.fisher_variance(model, x, estimator="score", structure="diag", n_samples=k)
    assert float(((draws.mean(0) - exact).abs() / (v / repeats).sqrt()).max()) < 5
    assert 0.8 < float((draws.var(0) / v).median()) < 1.25


def test_from_model_keeps_frozen_layers() -> None:
    """peers.md, ``parameters_to_vector``: nngeometry's default ``LayerCollection.from_model`` keeps the frozen first
    layer (its diagonal has every parameter's entry, torchfim's the trainable ones, which are its tail here); a
    ``layer_collection`` of the trainable layers gives torchfim's matrix."""
    model, x = tanh_mlp(3), mlp_inputs(N)
    model[0].requires_grad_(False)
    loader = DataLoader(TensorDataset(x), batch_size=4)
    trainable = LayerCollection()
    for module in model:
        if any(p.requires_grad for p in module.parameters()):
            trainable.add_layer_from_model(model, module)
    with clients.default_dtype(torch.float64):
        every = FIM(model, loader, PMatDiag, variant="classif_logits").get_diag()
        dense = FIM(model, loader, PMatDense, variant="classif_logits", layer_collection=trainable).to_torch()
    want = torchfim.fisher(model, x, structure="full")
    assert every.numel() == sum(p.numel() for p in model.parameters()) > want.shape[0]
    assert clients.rel_err(every[-want.shape[0]:], want.diagonal()) < 1e-12
    assert clients.rel_err(dense, want) < 1e-12
