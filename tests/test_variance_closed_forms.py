"""Closed-form variances and bounds against brute force and simulation (issue 3): every structure, the bounds on
random networks, samples_needed, return_stderr and compare_estimators, the dense variances taken a few inputs
at a time within the memory they check, mixed precision, and variance_bound's single pass.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import FAMILIES, MODELS, mlp_inputs, relu_mlp, tanh_mlp
from oracles import FAMILY_WIDTH, Flat, blocks, label_support, variance_oracle
from torch import nn

import torchfim
from torchfim.families import get_family

RTOL = 1e-8


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("model_name", tuple(MODELS))
def test_variance_matches_brute_force(model_name, family):
    make_model, make_inputs = MODELS[model_name]
    model, x, k = make_model(FAMILY_WIDTH[family]), make_inputs(4), 3
    oracle = variance_oracle(model, x, family, k)
    for estimator in ("score", "hessian"):
        full = oracle[estimator]

        def var(structure, estimator=estimator):
            return torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure=structure,
                                            n_samples=k)

        assert rel_err(var("full"), full) < RTOL
        assert rel_err(var("diag"), torch.diagonal(full)) < RTOL
        layers = var("layers")
        for name, block in blocks(full, model).items():
            assert rel_err(layers[name], block) < RTOL, name
        trace = var("trace")
        assert abs(float(trace - oracle[f"{estimator}_trace"])) <= RTOL * abs(float(oracle[f"{estimator}_trace"]))
        # The trace estimator's variance includes the covariances between diagonal entries.
        assert abs(float(trace - torch.diagonal(full).sum())) > 1e-3 * abs(float(trace))


def _simulate(model, x, family, k, reps, seed):
    """``reps`` independent draws of the Î1 and Î2 diagonals from the brute-force formulas."""
    flat = Flat(model)
    oracle = variance_oracle(model, x, family, k)
    outs = flat.outputs(x)
    labels = get_family(family).sample(outs, reps * k, torch.Generator().manual_seed(seed))
    scores = []
    for i, o in enumerate(outs):
        support, _, u_table = label_support(family, o)
        if family == "categorical":
            scores.append(u_table[labels[i]])
        else:
            scores.append(labels[i] - (support[0] - u_table[0]))  # u = y − mean
    u = torch.stack(scores).reshape(len(x), reps, k, -1)
    param_scores = torch.einsum("ncp,nrkc->nrkp", oracle["jacobians"], u)
    score_diag = (param_scores**2).mean((0, 2))
    hess_diag = torch.einsum("napp->nap", oracle["hessians"])
    exact_diag = torch.einsum("npp->p", oracle["per_input"]) / len(x)
    hessian_diag = exact_diag - torch.einsum("nrka,nap->rp", u, hess_diag) / (len(x) * k)
    return {"score": score_diag, "hessian": hessian_diag}


def _variance_tolerance(draws):
    """Five standard errors of the sample variance, from the draws' own fourth central moment.

    For normal draws this is the χ²_{R−1} law's ``σ²·√(2/(R−1))``; the fourth moment
    covers the heavier tails of an average of a few label draws.
    """
    reps = draws.shape[0]
    centred = draws - draws.mean(0)
    s2 = centred.var(0)
    m4 = (centred**4).mean(0)
    return 5 * ((m4 - s2**2 * (reps - 3) / (reps - 1)) / reps).clamp_min(0).sqrt() + 1e-12 * s2.max()


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_variance_matches_simulation(family, estimator):
    model, x, k, reps = tanh_mlp(FAMILY_WIDTH[family], seed=3), mlp_inputs(3, seed=4), 2, 20000
    draws = _simulate(model, x, family, k, reps, seed=17)[estimator]
    for values, var in (
        (draws, torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure="diag", n_samples=k)),
        (draws.sum(1, keepdim=True),
         torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure="trace",
                                  n_samples=k).reshape(1)),
    ):
        tol = _variance_tolerance(values)
        assert bool(((values.var(0) - var).abs() <= tol).all())
        # A variance 1.5× too large fails the same check wherever the variance is not ~0.
        big = var > 1e-6 * var.max()
        assert bool(((values.var(0) - 1.5 * var).abs() > tol)[big].all())


def test_score_variance_matches_repeated_torchfim_calls():
    """Direct simulation through torchfim.fisher itself (not the formula)."""
    model, x, k, reps = tanh_mlp(3, seed=1), mlp_inputs(3, seed=2), 2, 600
    gen = torch.Generator().manual_seed(5)
    draws = torch.stack([
        torchfim.fisher(model, x, estimator="score", structure="diag", n_samples=k, generator=gen)
        for _ in range(reps)
    ])
    var = torchfim.fisher_variance(model, x, estimator="score", structure="diag", n_samples=k)
    assert bool(((draws.var(0) - var).abs() <= _variance_tolerance(draws)).all())


ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.Softplus, nn.GELU, nn.ReLU, nn.ELU)


def _random_case(seed):
    gen = torch.Generator().manual_seed(seed)
    family = FAMILIES[seed % len(FAMILIES)]
    width = FAMILY_WIDTH[family] if seed % 5 else 1  # every fifth case has one output
    if family == "categorical":
        width = max(width, 2)
    act = ACTIVATIONS[int(torch.randint(len(ACTIVATIONS), (1,), generator=gen))]
    hidden = int(torch.randint(2, 5, (1,), generator=gen))
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, hidden), act(), nn.Linear(hidden, width)).double()
    scale = float(torch.rand((), generator=gen, dtype=torch.float64)) * 3
    x = scale * torch.randn(int(torch.randint(1, 5, (1,), generator=gen)), 3, generator=gen, dtype=torch.float64)
    return model, x, family


@pytest.mark.parametrize("chunk", range(4))
def test_bounds_hold_on_random_networks(chunk):
    """Property test: every bound ≥ the exact variance, on 100 random networks and inputs."""
    bound_fns = {
        "score": (torchfim.score_variance_bound_spectral, torchfim.score_variance_bound_kurtosis),
        "hessian": (torchfim.hessian_variance_bound_spectral,),
    }
    for seed in range(chunk * 25, chunk * 25 + 25):
        model, x, family = _random_case(seed)
        for estimator, fns in bound_fns.items():
            for structure in ("full", "trace"):
                exact = torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure=structure)
                slack = 1e-9 * max(1.0, float(exact.abs().max()))
                for fn in fns:
                    bound = fn(model, x, family=family, structure=structure)
                    assert bool((bound >= exact - slack).all()), (seed, estimator, structure, fn.__name__)
                tightest = torchfim.variance_bound(model, x, family=family, estimator=estimator, structure=structure)
                assert bool((tightest >= exact - slack).all())


@pytest.mark.parametrize("family", ["bernoulli", "gaussian", "poisson"])
def test_bounds_are_equalities_with_one_output(family):
    model, x = tanh_mlp(1, seed=7), mlp_inputs(4)
    for structure in ("diag", "full", "trace"):
        for estimator, fn in (("score", torchfim.score_variance_bound_spectral),
                              ("hessian", torchfim.hessian_variance_bound_spectral)):
            exact = torchfim.fisher_variance(model, x, family=family, estimator=estimator, structure=structure)
            assert rel_err(fn(model, x, family=family, structure=structure), exact) < 1e-10


def test_hessian_bound_is_equality_for_gaussian():
    model, x = tanh_mlp(3, seed=7), mlp_inputs(4)
    exact = torchfim.fisher_variance(model, x, family="gaussian", estimator="hessian", structure="full")
    bound = torchfim.hessian_variance_bound_spectral(model, x, family="gaussian", structure="full")
    assert rel_err(bound, exact) < 1e-10
    # ...but not for the categorical family, whose Λ is not ∝ I: the check is not vacuous.
    exact = torchfim.fisher_variance(model, x, estimator="hessian", structure="full")
    assert rel_err(torchfim.hessian_variance_bound_spectral(model, x, structure="full"), exact) > 1e-3


def test_hessian_variance_vanishes_where_output_is_linear(family):
    width = FAMILY_WIDTH[family]
    relu, x = relu_mlp(width), mlp_inputs(5)
    v2 = torchfim.fisher_variance(relu, x, family=family, estimator="hessian", structure="full")
    v1 = torchfim.fisher_variance(relu, x, family=family, estimator="score", structure="full")
    for start, stop in ((0, 20), (20, 44), (44, 44 + 5 * width)):
        assert float(v2[start:stop, start:stop].abs().max()) == 0.0
        assert float(v1[start:stop, start:stop].abs().max()) > 0.0
    assert float(v2[:20, 20:44].abs().max()) > 0  # across layers Î2 does vary
    tanh = tanh_mlp(width, seed=1)
    v2 = torchfim.fisher_variance(tanh, x, family=family, estimator="hessian", structure="layers")
    v1 = torchfim.fisher_variance(tanh, x, family=family, estimator="score", structure="layers")
    for name in ("4.weight", "4.bias"):  # the last linear layer
        assert float(v2[name].abs().max()) == 0.0 and float(v1[name].abs().max()) > 0.0
    assert float(v2["0.weight"].abs().max()) > 0.0


@pytest.mark.parametrize(
    ("estimator", "structure", "eps"), [("score", "trace", 0.05), ("score", "diag", 0.3), ("hessian", "trace", 0.1)]
)
def test_samples_needed_delivers(estimator, structure, eps):
    model, x = tanh_mlp(3, seed=2), mlp_inputs(6, seed=3)
    k = torchfim.samples_needed(model, x, estimator=estimator, structure=structure, rel_error=eps)
    assert k > 1  # the target is not met trivially
    exact = torchfim.fisher(model, x, structure=structure)
    gen = torch.Generator().manual_seed(0)
    reps = 200
    draws = torch.stack([
        torchfim.fisher(model, x, estimator=estimator, structure=structure, n_samples=k, generator=gen)
        for _ in range(reps)
    ]).reshape(reps, -1)
    rel_se = draws.std(0) / exact.reshape(-1)
    # The sample std of 200 draws is within ≈ ±4·σ/√(2·199) ≈ ±20% of σ.
    assert float(rel_se.max()) <= eps * 1.2
    # With k/4 labels the error is about twice as large: the bound is not slack by orders of magnitude.
    if k >= 8:
        fewer = torch.stack([
            torchfim.fisher(model, x, estimator=estimator, structure=structure, n_samples=k // 4, generator=gen)
            for _ in range(reps)
        ]).reshape(reps, -1)
        assert float((fewer.std(0) / exact.reshape(-1)).max()) > eps * 1.25


def test_return_stderr():
    model, x = tanh_mlp(3), mlp_inputs(8)
    for estimator in ("score", "hessian"):
        est, se = torchfim.fisher(model, x, estimator=estimator, structure="diag", n_samples=4, return_stderr=True,
                                  generator=torch.Generator().manual_seed(0))
        var = torchfim.fisher_variance(model, x, estimator=estimator, structure="diag", n_samples=4)
        assert torch.allclose(se, var.sqrt()) and est.shape == se.shape
    est, se = torchfim.fisher(model, list(x.split(3)), structure="layers", return_stderr=True)
    assert all(float(v.abs().max()) == 0 for v in se.values())


def test_compare_estimators():
    relu = relu_mlp(3)
    cmp = torchfim.compare_estimators(relu, mlp_inputs(6))
    assert [r.better for r in cmp.rows] == ["hessian"] * 6
    assert all(r.hessian_variance == 0 and r.score_variance > 0 for r in cmp.rows)
    tanh = tanh_mlp(3, seed=1)
    cmp = torchfim.compare_estimators(tanh, mlp_inputs(6), n_samples=2)
    var1 = torchfim.fisher_variance(tanh, mlp_inputs(6), estimator="score", n_samples=2)
    assert math.isclose(cmp.rows[0].score_variance, float(var1[:12].sum()), rel_tol=1e-12)
    diag = torchfim.fisher(tanh, mlp_inputs(6), structure="diag")
    assert math.isclose(cmp.rows[1].fisher_diag_sum, float(diag[12:16].sum()), rel_tol=1e-12)
    assert "better" in str(cmp)


def test_compare_estimators_table_keeps_its_columns_with_long_names():
    """A weight-normalised layer's parameters are named '0.parametrizations.weight.original0' (35 characters): the
    table widened its first column only to 24, and its columns lost their alignment (a user trial)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 4)), nn.Tanh(), nn.Linear(4, 3)).double()
    lines = str(torchfim.compare_estimators(model, mlp_inputs(6))).splitlines()
    rows = [line for line in lines[2:] if not line.startswith("Î2 unavailable")]
    assert len(rows) == 5
    ends = {len(line) - len(line.split()[-1]) for line in [lines[0], *rows]}  # where the last column starts
    assert len(ends) == 1, lines


def test_variance_errors():
    model, x = tanh_mlp(3), mlp_inputs(4)
    with pytest.raises(torchfim.TorchfimError, match="estimator='exact' draws no labels, so it has no sampling variance"):
        torchfim.fisher_variance(model, x, estimator="exact")
    with pytest.raises(torchfim.TorchfimError, match="rel_error must be a positive number"):
        torchfim.samples_needed(model, x, rel_error=0)
    for percent in (10, np.int64(5)):  # a percentage for a fraction: warned of, and computed as asked
        with pytest.warns(RuntimeWarning, match=rf"asks for a standard error of {100 * float(percent):g}% of the value; "
                                                rf"rel_error is a fraction of it: for {float(percent):g}%, pass "
                                                rf"rel_error={float(percent) / 100:g}"):
            torchfim.samples_needed(model, x, rel_error=percent)
    with pytest.raises(torchfim.TorchfimError, match="n_samples must be a positive integer"):
        torchfim.fisher_variance(model, x, n_samples=0)


@pytest.mark.parametrize("value", [np.float32(0.25), np.float64(0.25), np.int64(1), np.array(0.25), torch.tensor(0.25),
                                   torch.tensor(0.25, dtype=torch.float64, requires_grad=True)])
def test_rel_error_takes_a_numpy_scalar_or_a_0_dim_tensor(value) -> None:
    """``rel_error=np.float32(0.1)`` and ``rel_error=torch.tensor(0.1)`` were refused ("must be a positive number
    such as 0.1 (10%), got np.float32(0.1)"); they count as the float they hold (the shared ``real_number``)."""
    model, x = tanh_mlp(3), mlp_inputs(6)
    assert torchfim.samples_needed(model, x, rel_error=value) == torchfim.samples_needed(model, x, rel_error=float(value))


@pytest.mark.parametrize("value", [True, np.True_, np.array(True), np.array([0.25]), float("nan"), np.float32("nan"),
                                   torch.tensor([0.25]),
                                   torch.tensor(0.25 + 0j), torch.tensor(True), "0.25"])
def test_rel_error_refuses_bools_nan_and_tensors_of_other_shapes(value) -> None:
    """A bool is no error bound (``rel_error=True`` counted as 1 before), nor a tensor of one number in a dim."""
    with pytest.raises(torchfim.TorchfimError, match="rel_error must be a positive number such as 0.1"):
        torchfim.samples_needed(tanh_mlp(3), mlp_inputs(6), rel_error=value)


@pytest.mark.parametrize("family", ["categorical", "bernoulli"])
def test_dense_score_variances_taken_one_input_at_a_time_match_brute_force(family, monkeypatch):
    """The dense Î1 variances add their per-input ``(n, n)`` moments a few inputs at a time (one here); before, a whole
    chunk of Jacobians at once, up to 65 times the result's memory (16 inputs, P = 3418), out of memory where the
    result itself fitted. The exact variances against the brute force, the bound against the bound taken at once."""
    import torchfim.variance as variance_mod

    model, x, k = tanh_mlp(FAMILY_WIDTH[family]), mlp_inputs(5), 2
    oracle = variance_oracle(model, x, family, k)
    whole = {s: torchfim.variance_bound(model, x, family=family, structure=s, n_samples=k) for s in ("full", "layers")}
    monkeypatch.setattr(variance_mod, "CHUNK_ELEMENTS", 1)
    for backend in ("torchfim.engine.per_module", "torchfim.engine.functional"):  # Jacobians of 2 inputs at a time
        monkeypatch.setattr(f"{backend}.CHUNK_ELEMENTS", 2 * FAMILY_WIDTH[family] * sum(p.numel() for p in model.parameters()))
    full = torchfim.fisher_variance(model, x, family=family, structure="full", n_samples=k)
    assert rel_err(full, oracle["score"]) < RTOL
    layers = torchfim.fisher_variance(model, x, family=family, structure="layers", n_samples=k)
    for name, block in blocks(oracle["score"], model).items():
        assert rel_err(layers[name], block) < RTOL, name
    assert rel_err(torchfim.variance_bound(model, x, family=family, structure="full", n_samples=k), whole["full"]) < RTOL
    bound = torchfim.variance_bound(model, x, family=family, structure="layers", n_samples=k)
    assert all(rel_err(bound[name], whole["layers"][name]) < RTOL for name in bound)


def test_dense_score_variances_refuse_working_memory_that_would_not_fit(monkeypatch):
    """Memory for the result (and one working copy) but not for the per-input moments beside it: refused with the
    size and a fix, before allocating them (before: computed until the allocator failed, inside torch). A family of
    one output needs a single (n, n) product beside the result, and is computed in the same memory."""
    from torchfim import _memory

    def room_for_two_and_a_half_results(model):
        p = sum(t.numel() for t in model.parameters())
        monkeypatch.setattr(_memory, "available_bytes", lambda device: int(2.5 * p * p * 8))
        return model

    x = mlp_inputs(5)
    model = room_for_two_and_a_half_results(tanh_mlp(3))
    with pytest.raises(torchfim.TorchfimError, match=r"structure='full' needs working memory of 3 .* freeze"):
        torchfim.fisher_variance(model, x, structure="full")
    one_output = room_for_two_and_a_half_results(tanh_mlp(1))
    got = torchfim.fisher_variance(one_output, x, family="bernoulli", structure="full")
    assert rel_err(got, variance_oracle(one_output, x, "bernoulli", 1)["score"]) < RTOL
    # outputs with positions hold the running sums over an input's positions beside one position's matrices: their
    # measured 11 n×n are checked (before, 3 per input were, against a measured 10 per input with several inputs)
    positions = room_for_two_and_a_half_results(nn.Linear(3, 1).double())
    with pytest.raises(torchfim.TorchfimError, match=r"structure='full' needs working memory of 12 .* matrices"):
        torchfim.fisher_variance(positions, torch.randn(4, 3, 3, dtype=torch.float64), family="bernoulli",
                                 structure="full", mask=torch.ones(4, 3, dtype=torch.bool))


def test_the_variances_take_a_float32_body_under_a_float64_head():
    """Blocks of float32 tensors under float64 outputs: the dense bounds and every diagonal variance promote (the
    review found a matmul of float64 by float32 refused inside torch, the dense bounds since this session, the
    diagonals before); against the same model all in float64, within float32 rounding."""
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body, self.head = nn.Linear(4, 6), nn.Linear(6, 3).double()

        def forward(self, x):
            return self.head(torch.tanh(self.body(x.float())).double())

    torch.manual_seed(0)
    model = Mixed()
    wide = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    wide.load_state_dict({"0.weight": model.body.weight.double(), "0.bias": model.body.bias.double(),
                          "2.weight": model.head.weight, "2.bias": model.head.bias})
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for bound in (torchfim.score_variance_bound_spectral, torchfim.score_variance_bound_kurtosis):
        got, want = bound(model, x, structure="blocks"), bound(wide, x, structure="blocks")
        assert [n.split(".")[-1] for n in got] == [n.split(".")[-1] for n in want]
        for (name, g), w in zip(got.items(), want.values()):
            assert rel_err(g.double(), w) < 1e-5, name
    for variance in (torchfim.fisher_variance, torchfim.score_variance_bound_spectral):  # diag: a refused matmul too
        assert rel_err(variance(model, x, structure="diag").double(), variance(wide, x, structure="diag")) < 1e-5


def test_variance_bound_takes_the_tightest_in_one_pass(monkeypatch):
    """``variance_bound(estimator="score")``: for ``trace`` the sum over inputs of each input's smaller spectral or
    kurtosis term, from one pass over the inputs (it took two, and cost twice the exact variance it bounds: a trial on a ViT); for entries
    the spectral one alone, which ``λ_max(M) ≤ E‖u‖⁴`` makes the smaller there."""
    import torchfim.trace_summary
    import torchfim.variance

    model, x = tanh_mlp(3), mlp_inputs(12)
    spectral = {s: torchfim.score_variance_bound_spectral(model, x, structure=s) for s in ("trace", "diag")}
    kurtosis = {s: torchfim.score_variance_bound_kurtosis(model, x, structure=s) for s in ("trace", "diag")}
    passes = []
    for module in (torchfim.variance, torchfim.trace_summary):
        original = module.engine_pass
        monkeypatch.setattr(module, "engine_pass", lambda *a, _o=original, **k: passes.append(1) or _o(*a, **k))
    tightest = torchfim.variance_bound(model, x, structure="trace", n_samples=2)
    assert len(passes) == 1
    monkeypatch.undo()
    per_input = sum(min(float(torchfim.score_variance_bound_spectral(model, x[i : i + 1], structure="trace")),
                        float(torchfim.score_variance_bound_kurtosis(model, x[i : i + 1], structure="trace")))
                    for i in range(len(x))) / len(x) ** 2
    assert float(tightest) == pytest.approx(per_input / 2, rel=1e-12)
    assert float(tightest) <= min(float(spectral["trace"]), float(kurtosis["trace"])) / 2
    for module in (torchfim.variance, torchfim.trace_summary):
        original = module.engine_pass
        monkeypatch.setattr(module, "engine_pass", lambda *a, _o=original, **k: passes.append(1) or _o(*a, **k))
    diag = torchfim.variance_bound(model, x, structure="diag")
    assert len(passes) == 2 and torch.equal(diag, spectral["diag"]) and bool((diag <= kurtosis["diag"]).all())
