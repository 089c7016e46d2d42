"""torchfim against nngeometry's closed-form ``FIM`` in ``PMatDense`` and ``PMatDiag``, float64.

``nngeometry.metrics.FIM(model, loader, representation, variant=...)`` is the mean over the loader's
examples of ``J_iᵀ Λ_i J_i`` with the expectation over labels in closed form, as torchfim's exact
Fisher. Its variants name torchfim's families: ``"classif_logits"`` (softmax over logits) is
``categorical``, ``"classif_binary_logits"`` (one sigmoid logit) is ``bernoulli`` and ``"regression"``
(mean of a normal with identity covariance) is ``gaussian`` with σ = 1.

nngeometry builds its work tensors with torch's default dtype: under float32, ``classif_logits``
fails on a float64 model (a float32 triangular matrix times float64 logits) and the convolution
diagonal is rounded to float32, so its calls run with float64 as the default dtype.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from torch.utils.data import DataLoader, TensorDataset

import torchfim

nngeometry = clients.need("nngeometry")
from nngeometry.metrics import FIM  # noqa: E402
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
