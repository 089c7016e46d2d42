"""``nn.EmbeddingBag`` (``sum``, ``mean``) on a rule of its own, against the dense float64 oracle.

A bag sums (or averages) its lookups with weights ``w_l``, ``z = Σ_l w_l W[t_l]``: the lookup's per-sample
gradients with the sensitivity ``w_l g`` at each position (:class:`EmbeddingBagRule`). Bags come as the rows
of a 2-D input, or cut from a 1-D input by ``offsets`` (one per sample, as a model that flattens its
token rows passes them). Before, the module went to the generic rule, which could not run a 1-D input
with offsets one sample at a time and refused the model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import assert_equals_dense, assert_matches_functional, module_rules, torchfim_messages
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.embedding import EmbeddingBagRule


class _BagModel(nn.Module):
    """A bag of each input's tokens → tanh → Linear to 3 classes; ``layout`` says how the bags are passed."""

    def __init__(self, mode: str, layout: str, weighted: bool, padding_idx: int | None) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(9, 3, mode=mode, padding_idx=padding_idx, include_last_offset=layout == "last-offset")
        self.head = nn.Linear(3, 3)
        self.layout, self.weighted = layout, weighted

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weights = (ids.to(self.head.weight.dtype) + 1) / 5 if self.weighted else None
        if self.layout == "rows":
            return self.head(torch.tanh(self.bag(ids, per_sample_weights=weights)))
        b, length = ids.shape
        offsets = torch.arange(0, b * length + (self.layout == "last-offset"), length)
        flat = None if weights is None else weights.reshape(-1)
        return self.head(torch.tanh(self.bag(ids.reshape(-1), offsets, per_sample_weights=flat)))


def _model(mode: str = "sum", layout: str = "rows", weighted: bool = False,
           padding_idx: int | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _BagModel(mode, layout, weighted, padding_idx).double().eval()
    ids = torch.randint(0, 9, (6, 4), generator=torch.Generator().manual_seed(1))
    ids[0, :2] = 0  # padding in one bag, and a bag of padding only
    ids[1] = 0
    return model, ids


SETTINGS = {"sum": dict(), "mean": dict(mode="mean"), "weighted": dict(weighted=True),
            "sum-padding": dict(padding_idx=0), "mean-padding": dict(mode="mean", padding_idx=0),
            "weighted-padding": dict(weighted=True, padding_idx=0)}


@pytest.mark.parametrize("layout", ["rows", "offsets", "last-offset"])
@pytest.mark.parametrize("setting", list(SETTINGS))
def test_embedding_bags_keep_their_rule_and_equal_the_dense_oracle(setting: str, layout: str) -> None:
    model, ids = _model(layout=layout, **SETTINGS[setting])
    full = exact_fisher(model, ids, "categorical")
    for structure in ("diag", "layers", "full"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = torchfim.fisher(model, ids, structure=structure)
        assert torchfim_messages(caught) == []
        assert_equals_dense(got, full, model, structure)
    backend, rules = module_rules(model, ids)
    assert isinstance(rules["bag"], EmbeddingBagRule) and not backend.moved and not backend.demoted


@pytest.mark.parametrize("estimator", ["score", "empirical", "hessian"])
@pytest.mark.parametrize("layout", ["rows", "offsets"])
def test_embedding_bags_give_every_estimator_and_variance_of_the_whole_model_backend(layout: str, estimator: str) -> None:
    """The score's per-sample squared norms (trace variances) come from the rule's own shortcut; the Hessian
    estimator's second derivatives from the bag's composite form (torch's kernel has no forward-mode derivative)."""
    model, ids = _model("mean", layout, weighted=False, padding_idx=0)
    assert_matches_functional(model, ids, estimator, torch.randint(0, 3, (len(ids),)))


def test_a_max_bag_stays_on_the_generic_rule_and_exact() -> None:
    model, ids = _model("max")
    assert_equals_dense(torchfim.fisher(model, ids, structure="diag"), exact_fisher(model, ids, "categorical"),
                        model, "diag")
    assert isinstance(module_rules(model, ids)[1]["bag"], GenericRule)


def test_a_max_bag_of_packed_ids_is_refused_with_the_layout_that_works() -> None:
    """A max bag has no rule of its own, and on 1-D ids with offsets the generic rule cannot cut it by sample:
    refused with the input's shape and the way out, 2-D ids (it advised backend='functional', which refuses the
    model too); the same bags given as 2-D ids are exact."""
    model, ids = _model("max", layout="offsets")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one-sample-at-a-time notice that comes before
        with pytest.raises(torchfim.TorchfimError, match=r"Its input of shape \(\d+,\) has no row per sample of the \d+ "
                                                         r"\(a packed layout.*2-D ids padded with padding_idx"):
            torchfim.fisher(model, ids, structure="diag")
    rows, _ = _model("max", layout="rows")
    rows.load_state_dict(model.state_dict())
    assert_equals_dense(torchfim.fisher(rows, ids, structure="diag"), exact_fisher(rows, ids, "categorical"), rows, "diag")


class _MatrixBagTwin(nn.Module):
    """:class:`_BagModel` with its bag written as a matrix product ``A W``: ``A[b, v]`` the summed weights of id
    ``v`` in bag ``b`` (divided by the bag's count for ``mean``), built from the 2-D ids; for ``max`` each bag's
    largest lookups. An independent forward of the same function, whose forward-mode derivatives are torch's own."""

    def __init__(self, model: _BagModel) -> None:
        super().__init__()
        self.table = nn.Parameter(model.bag.weight.detach().clone())
        self.head = nn.Linear(3, 3).double()
        self.head.load_state_dict(model.head.state_dict())
        self.mode, self.weighted, self.padding_idx = model.bag.mode, model.weighted, model.bag.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        observed = ids != (-1 if self.padding_idx is None else self.padding_idx)
        if self.mode == "max":
            rows = self.table[ids].masked_fill(~observed.unsqueeze(-1), float("-inf")).amax(1)
            bagged = torch.where(observed.any(1, keepdim=True), rows, torch.zeros_like(rows))
        else:
            weights = (ids.to(self.table.dtype) + 1) / 5 if self.weighted else torch.ones_like(self.table[ids, 0])
            a = torch.zeros(len(ids), len(self.table), dtype=self.table.dtype).scatter_add(1, ids, weights * observed)
            if self.mode == "mean":
                a = a / observed.sum(1, keepdim=True).clamp_min(1)
            bagged = a @ self.table
        return self.head(torch.tanh(bagged))


@pytest.mark.parametrize(("setting", "layout"), [*((s, lay) for s in SETTINGS for lay in ("rows", "offsets",
                                                                                         "last-offset")),
                                                ("max", "rows")])
def test_embedding_bags_hessian_estimator_equals_a_matrix_product_twin(setting: str, layout: str) -> None:
    """Î2 (same labels: the same generator) and its variance through the bag's composite form equal those of the
    twin that writes the bag as a matrix product. They were refused: torch's embedding bag has no forward-mode
    derivative. (A max bag of 1-D ids is refused for another reason: no row per sample.)"""
    model, ids = _model(layout=layout, **({"mode": "max"} if setting == "max" else SETTINGS[setting]))
    twin = _MatrixBagTwin(model)
    for structure in ("full", "trace"):
        got, want = (torchfim.fisher(m, ids, estimator="hessian", structure=structure, n_samples=3,
                                     generator=torch.Generator().manual_seed(4)) for m in (model, twin))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    got, want = (torchfim.fisher_variance(m, ids, estimator="hessian", structure="diag") for m in (model, twin))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
