"""torchfim.fisher against brute-force float64 oracles (DESIGN.md §3)."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, MODELS, mlp_inputs, relu_mlp, tanh_mlp
from oracles import (
    FAMILY_WIDTH,
    Flat,
    blocks,
    empirical_fisher,
    exact_fisher,
    log_likelihood,
    true_targets,
)
from torch.func import grad

import torchfim
from torchfim.families import get_family

RTOL = 1e-10


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def check_structures(model, full: torch.Tensor, compute) -> None:
    """``compute(structure)`` must give the matching part of the dense ``full`` matrix."""
    assert rel_err(compute("full"), full) < RTOL
    assert rel_err(compute("diag"), torch.diagonal(full)) < RTOL
    assert abs(float(compute("trace")) - float(torch.trace(full))) <= RTOL * float(full.diagonal().abs().sum())
    layers = compute("layers")
    expected = blocks(full, model)
    assert list(layers) == list(expected)
    for name in expected:
        assert rel_err(layers[name], expected[name]) < RTOL, name


def test_exact_matches_brute_force(model_and_inputs, family):
    model, x = model_and_inputs
    full = exact_fisher(model, x, family)
    check_structures(model, full, lambda s: torchfim.fisher(model, x, family=family, structure=s))


def test_empirical_matches_brute_force(model_and_inputs, family):
    model, x = model_and_inputs
    y = true_targets(family, Flat(model).outputs(x), torch.Generator().manual_seed(3))
    full = empirical_fisher(model, x, y, family)
    check_structures(
        model,
        full,
        lambda s: torchfim.fisher(model, x, family=family, estimator="empirical", structure=s, targets=y),
    )


@pytest.mark.parametrize("family", ["categorical"])
def test_empirical_ignores_categorical_targets_of_minus_100(model_and_inputs, family):
    """A class label -100 (``F.cross_entropy``'s ``ignore_index``) observes nothing: the input adds no
    score, and the mean stays over all n inputs."""
    model, x = model_and_inputs
    y = true_targets(family, Flat(model).outputs(x), torch.Generator().manual_seed(3))
    ignored = torch.arange(len(y)) % 3 == 1
    kept = ~ignored
    want = empirical_fisher(model, x[kept], y[kept], family) * (int(kept.sum()) / len(y))
    got = torchfim.fisher(model, x, estimator="empirical", structure="full", targets=y.masked_fill(ignored, -100))
    assert rel_err(got, want) < RTOL


def _labels_torchfim_draws(model, x, family, k, seed):
    """The labels torchfim draws for one batch: one ``sample`` call with the given generator."""
    fam = get_family(family)
    return fam.sample(Flat(model).outputs(x), k, torch.Generator().manual_seed(seed))


def _output_scores(family, outputs, labels):
    """``u = ∇_o log p(y|o)`` by autodiff of the hand-written log-likelihood."""
    return torch.stack(
        [
            torch.stack([grad(lambda o, y=y: log_likelihood(family, o, y))(o_i) for y in labels_i])
            for o_i, labels_i in zip(outputs, labels)
        ]
    )


@pytest.mark.parametrize("model_name", tuple(MODELS))
def test_score_matches_formula_given_its_labels(model_name, family):
    make_model, make_inputs = MODELS[model_name]
    model, x, k = make_model(FAMILY_WIDTH[family]), make_inputs(5), 3
    flat = Flat(model)
    u = _output_scores(family, flat.outputs(x), _labels_torchfim_draws(model, x, family, k, 7))
    scores = torch.einsum("ncp,njc->njp", flat.jacobians(x), u).reshape(-1, len(flat.theta))
    full = scores.T @ scores / (len(x) * k)
    check_structures(
        model,
        full,
        lambda s: torchfim.fisher(
            model, x, family=family, estimator="score", structure=s, n_samples=k,
            generator=torch.Generator().manual_seed(7),
        ),
    )


@pytest.mark.parametrize("model_name", tuple(MODELS))
def test_hessian_matches_formula_given_its_labels(model_name, family):
    make_model, make_inputs = MODELS[model_name]
    model, x, k = make_model(FAMILY_WIDTH[family]), make_inputs(3), 2
    flat = Flat(model)
    u = _output_scores(family, flat.outputs(x), _labels_torchfim_draws(model, x, family, k, 11))
    second = torch.einsum("njc,ncpq->pq", u, flat.output_hessians(x)) / (len(x) * k)
    full = exact_fisher(model, x, family) - second
    assert second.abs().max() > 1e-3  # the Hessian term matters on this model
    check_structures(
        model,
        full,
        lambda s: torchfim.fisher(
            model, x, family=family, estimator="hessian", structure=s, n_samples=k,
            generator=torch.Generator().manual_seed(11),
        ),
    )


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_estimators_are_unbiased(family, estimator):
    """The mean of many independent estimates is within 4 standard errors of ``exact``."""
    model, x = tanh_mlp(FAMILY_WIDTH[family], seed=2), mlp_inputs(4, seed=5)
    exact = torchfim.fisher(model, x, family=family, structure="diag")
    gen = torch.Generator().manual_seed(123)
    reps = 150
    draws = torch.stack(
        [torchfim.fisher(model, x, family=family, estimator=estimator, structure="diag", generator=gen)
         for _ in range(reps)]
    )
    for values, target in ((draws, exact), (draws.sum(1, keepdim=True), exact.sum().reshape(1))):
        mean = values.mean(0)
        stderr = values.std(0) / reps**0.5
        tolerance = 4 * stderr + 1e-10 * target.abs().max()
        assert bool(((mean - target).abs() <= tolerance).all()), (mean - target).abs() / stderr
    # The test has power: a Fisher 20% off would be caught.
    assert not bool(((draws.mean(0) - 1.2 * exact).abs() <= 4 * draws.std(0) / reps**0.5 + 1e-12).all())


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_equal_seeds_give_identical_results(estimator):
    model, x = tanh_mlp(3), mlp_inputs(8)

    def run(seed):
        return torchfim.fisher(model, x, estimator=estimator, structure="full", n_samples=2,
                               generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(5), run(5))
    assert not torch.equal(run(5), run(6))


def test_hessian_estimator_is_exact_inside_relu_layers(family):
    """A ReLU net's output has zero Hessian inside each layer, so Î2 = I on those blocks, per sample."""
    model = relu_mlp(FAMILY_WIDTH[family])
    layer_sizes = [(0, 3 * 5 + 5), (20, 20 + 5 * 4 + 4), (44, 44 + 4 * FAMILY_WIDTH[family] + FAMILY_WIDTH[family])]
    x = mlp_inputs(6)
    gen = torch.Generator().manual_seed(0)
    for i in range(len(x)):
        xi = x[i : i + 1]
        exact = torchfim.fisher(model, xi, family=family, structure="full")
        est = torchfim.fisher(model, xi, family=family, estimator="hessian", structure="full", generator=gen)
        for start, stop in layer_sizes:
            assert rel_err(est[start:stop, start:stop], exact[start:stop, start:stop]) < RTOL
        # ... but not across layers: the check above is not vacuous.
        assert (est[:20, 20:] - exact[:20, 20:]).abs().max() > 1e-6
        est_layers = torchfim.fisher(model, xi, family=family, estimator="hessian", structure="layers",
                                     generator=gen)
        for name, block in blocks(exact, model).items():
            assert rel_err(est_layers[name], block) < RTOL


def test_minibatches_equal_one_tensor():
    model, x = tanh_mlp(3), mlp_inputs(10)
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(0))
    whole = torchfim.fisher(model, x, structure="full")
    assert rel_err(torchfim.fisher(model, list(x.split(3)), structure="full"), whole) < RTOL
    emp = torchfim.fisher(model, x, estimator="empirical", structure="diag", targets=y)
    pairs = list(zip(x.split(4), y.split(4)))
    assert rel_err(torchfim.fisher(model, pairs, estimator="empirical", structure="diag"), emp) < RTOL
    aligned = torchfim.fisher(model, x.split(4), estimator="empirical", structure="diag", targets=y.split(4))
    assert rel_err(aligned, emp) < RTOL


def test_large_data_is_chunked(monkeypatch):
    """Per-sample products are built a chunk at a time; the result does not change."""
    import torchfim.engine.backend as backend
    import torchfim.engine.functional as functional
    import torchfim.engine.per_module as per_module

    model, x = tanh_mlp(3), mlp_inputs(50)
    whole = torchfim.fisher(model, x, structure="blocks")
    for module in (functional, per_module):
        monkeypatch.setattr(module, "CHUNK_ELEMENTS", 2000)
    monkeypatch.setattr(backend, "CHUNK_ELEMENTS", 2000)
    for name in whole:
        for engine in ("modules", "functional"):
            assert rel_err(torchfim.fisher(model, x, structure="blocks", backend=engine)[name], whole[name]) < RTOL
    assert rel_err(torchfim.fisher(model, x, estimator="hessian", structure="diag",
                                   generator=torch.Generator().manual_seed(0)),
                   torchfim.fisher(model, x, estimator="hessian", structure="diag",
                                   generator=torch.Generator().manual_seed(0))) < RTOL


def test_result_follows_model_dtype():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    x = torch.randn(5, 3, dtype=torch.float64)  # inputs are cast to the model's dtype
    out = torchfim.fisher(model, x, structure="diag")
    assert out.dtype == torch.float32
    ref = torchfim.fisher(model.double(), x, structure="diag")
    assert rel_err(out.double(), ref) < 1e-5


def test_frozen_parameters_are_left_out():
    model, x = tanh_mlp(3), mlp_inputs(6)
    full = torchfim.fisher(model, x, structure="full")
    model[0].weight.requires_grad_(False)
    part = torchfim.fisher(model, x, structure="full")
    assert part.shape == (full.shape[0] - 12,) * 2
    assert rel_err(part, full[12:, 12:]) < RTOL


def test_all_families_listed():
    assert set(FAMILIES) <= set(torchfim.families.FAMILIES)


def test_a_dict_batch_takes_its_targets_apart_as_one_tensor() -> None:
    """``fisher(model, {"x": x}, estimator="empirical", targets=y)`` reads ``y`` as the dict's targets, as if
    the dict held them under ``labels``, and as the tensor call does (before: "inputs is an iterable of
    mini-batches but targets is one tensor")."""

    class Keyword(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = tanh_mlp(3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    model, x = Keyword(), mlp_inputs(6)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(4))
    want = torchfim.fisher(model.inner, x, estimator="empirical", targets=y)
    assert torch.equal(torchfim.fisher(model, {"x": x}, estimator="empirical", targets=y), want)
    assert torch.equal(torchfim.fisher(model, {"x": x, "labels": y}, estimator="empirical"), want)


class _Tagger(torch.nn.Module):
    """(batch, tokens) ids to (batch, tokens, 30) logits: 8 positions × 30 classes = 240 output numbers per input."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = torch.nn.Embedding(30, 6), torch.nn.Linear(6, 30)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def test_a_standard_error_that_costs_a_hundred_estimates_is_warned_of() -> None:
    """return_stderr=True's closed form pulls back every output number of each input; where that is ≥ 100 times the
    estimate's k pull-backs (a language model: a user trial waited 490 times the estimate for it, without a word),
    a warning gives the factor and the cheap error bar of Tr(F); none for a 10-class classifier."""
    import warnings

    torch.manual_seed(0)
    ids = torch.randint(0, 30, (4, 8))
    with pytest.warns(RuntimeWarning, match=r"240 output numbers where the estimate pulled back 2 vectors: expect it "
                                            r"to take up to 120 times as long.*squared_score_norms"):
        torchfim.fisher(_Tagger(), ids, estimator="score", n_samples=2, structure="trace", return_stderr=True)
    classifier = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchfim.fisher(classifier, torch.randn(6, 4), estimator="score", return_stderr=True)
