"""Embeddings with ``sparse=True``: a storage choice for their gradient, not another function.

The Fisher, its variances and the penalty of a model with sparse embeddings equal those of its twin with
dense ones (the same weights), against the dense float64 oracles; the user's modules keep ``sparse=True``.
Before, each raised from inside torch (a sparse gradient reshaped, or normed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from engine_checks import assert_equals_dense
from oracles import exact_fisher
from test_penalised_loss import grads_of, rel_error
from test_train_penalty import SEED, brute_penalty, labels, penalty_grad
from torch import nn

import torchfim
from torchfim.train import FisherPenalty


def embedding_model(kind: str, sparse: bool) -> nn.Module:
    torch.manual_seed(0)
    table = nn.Embedding(10, 3, sparse=sparse) if kind == "embedding" else nn.EmbeddingBag(10, 3, sparse=sparse)
    width = 12 if kind == "embedding" else 3
    return nn.Sequential(table, nn.Flatten(), nn.Tanh(), nn.Linear(width, 3)).double()


IDS = torch.randint(0, 10, (7, 4), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("kind", ["embedding", "bag"])
def test_the_fisher_of_sparse_embeddings_is_that_of_dense_ones(kind: str, structure: str, backend: str) -> None:
    model = embedding_model(kind, sparse=True)
    full = exact_fisher(embedding_model(kind, sparse=False), IDS, "categorical")
    assert_equals_dense(torchfim.fisher(model, IDS, structure=structure, backend=backend), full, model, structure)
    assert model[0].sparse


def test_the_variances_of_sparse_embeddings_are_those_of_dense_ones() -> None:
    sparse, dense = embedding_model("embedding", True), embedding_model("embedding", False)
    for estimator in ("score", "hessian"):
        got = torchfim.fisher_variance(sparse, IDS, estimator=estimator, structure="diag")
        want = torchfim.fisher_variance(dense, IDS, estimator=estimator, structure="diag")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_the_penalty_of_sparse_embeddings_is_that_of_dense_ones(kind: str, grad_method: str) -> None:
    """Its gradient comes dense (a Hessian–vector product); the module keeps sparse=True."""
    model = embedding_model("embedding", sparse=True)
    dense = embedding_model("embedding", sparse=False)
    y = labels(dense, IDS, "categorical", torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(dense, IDS, y, "categorical", 0.37, kind)
    pen = FisherPenalty(model, alpha=0.37, kind=kind, grad_method=grad_method,
                        generator=torch.Generator().manual_seed(SEED))
    term = pen(IDS, step=0)
    torch.testing.assert_close(term.detach(), value.detach(), rtol=1e-10, atol=0)
    assert rel_error(penalty_grad(term, model), list(grads)) < (1e-10 if grad_method == "exact" else 1e-6)
    assert model[0].sparse


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_the_penalised_loss_of_sparse_embeddings_is_that_of_dense_ones(grad_method: str) -> None:
    targets = torch.randint(0, 3, (len(IDS),), generator=torch.Generator().manual_seed(2))
    task = lambda out: F.cross_entropy(out, targets)  # noqa: E731
    models, grads = {sparse: embedding_model("embedding", sparse) for sparse in (True, False)}, {}
    for sparse, model in models.items():
        pen = FisherPenalty(model, alpha=0.37, grad_method=grad_method, generator=torch.Generator().manual_seed(SEED))
        grads[sparse] = grads_of(pen.penalised_loss(IDS, task, step=0), model)
    assert rel_error(grads[True], grads[False]) < 1e-12
    assert models[True][0].sparse
