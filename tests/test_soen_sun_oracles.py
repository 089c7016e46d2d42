"""The soen-sun study's records against an independent float64 oracle (enumeration over the classes, torch.func
Jacobians and Hessians), and its conclusions against records whose numbers contradict them."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, hessian, jacrev

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

from torchfim.experiments import soen_sun
from torchfim.experiments.soen_sun.measure import activation_records, config_record, linear_layers, measure
from torchfim.experiments.soen_sun.summary import PARTS, summary


def _enumerated(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Categorical head, one label per input, mean over the n inputs: the Fisher diagonal, Var(Î1)_pp and
    Var(Î2)_pp by enumerating the classes, Î1's kurtosis bound E‖u‖⁴‖j_p‖⁴ − I_pp², and the trace variances."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def out(th: torch.Tensor, xi: torch.Tensor) -> torch.Tensor:
        parts = torch.split(th, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes)}
        return functional_call(model, params, (xi.unsqueeze(0),)).squeeze(0)

    n = x.shape[0]
    r = {k: torch.zeros(theta.numel(), dtype=torch.float64) for k in ("fisher", "v1", "v2", "kurt")}
    r["t1"] = r["t2"] = torch.zeros((), dtype=torch.float64)
    for xi in x:
        p = torch.softmax(out(theta, xi), 0)
        u = torch.eye(p.numel(), dtype=torch.float64) - p  # row y: the centred one-hot e_y − p
        jac = jacrev(out)(theta, xi)
        h = torch.diagonal(hessian(out)(theta, xi), dim1=1, dim2=2)  # ∂²o_a/∂θ_p², C × P
        z1, z2 = (u @ jac) ** 2, u @ h  # per label y: the diagonal of Î1's term, Î2's random part
        i_pp = p @ z1
        r["fisher"] += i_pp / n
        r["v1"] += (p @ z1**2 - i_pp**2) / n**2
        r["v2"] += (p @ z2**2 - (p @ z2) ** 2) / n**2
        r["kurt"] += (p @ (u**2).sum(1) ** 2 * (jac**2).sum(0) ** 2 - i_pp**2) / n**2
        q, d = ((u @ jac @ jac.T) * u).sum(1), u @ h.sum(1)
        r["t1"] = r["t1"] + (p @ q**2 - (p @ q) ** 2) / n**2
        r["t2"] = r["t2"] + (p @ d**2 - (p @ d) ** 2) / n**2
    return r


def test_records_match_enumeration_and_keep_every_entry_with_a_real_variance():
    """Feature 0 is always 0 (its weights: variance exactly 0); feature 1 is 1e-3 of the others, so its weights'
    Var(Î1) is ~1e-12 of the largest, yet a real variance with a ratio like its neighbours'. Before, a floor of
    1e-10 × the largest variance of the configuration counted those entries as "zero_variance" and left their
    ratios out (up to 215 of 1040 first-layer entries of the committed digits/sigmoid run)."""
    x = torch.rand(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x[:, 0], x[:, 1] = 0.0, 1e-3 * x[:, 1]
    model = soen_sun.build_mlp(4, 3, 1, "tanh", seed=0)
    m, o = measure(model, x, "categorical", bounds=True), _enumerated(model, x)
    layers = linear_layers(model)
    rec_b, rec_a = activation_records(config_record("t", "categorical", "tanh", 1, 3, 5, model), layers, m)
    for name, ref in (("fisher_diag", o["fisher"]), ("var_score_diag", o["v1"]), ("var_hessian_diag", o["v2"]),
                      ("score_kurtosis_diag", o["kurt"])):
        torch.testing.assert_close(m[name], ref, rtol=1e-9, atol=1e-12 * float(ref.abs().max()))
    assert float(rec_b["trace"]["var_score"]) == pytest.approx(float(o["t1"]), rel=1e-9)
    assert float(rec_b["trace"]["var_hessian"]) == pytest.approx(float(o["t2"]), rel=1e-9)
    real = o["v1"] > 1e-6 * o["fisher"] ** 2  # far above round-off; the weights on feature 0 have exactly 0
    assert int((~real).sum()) == 3  # the three first-layer weights on feature 0
    small = real & (o["v1"] < 1e-10 * o["v1"].max())
    assert int(small.sum()) == 3  # the weights on feature 1: real, and tiny next to the largest
    for lay, row, arow in zip(layers, rec_b["layers"], rec_a["layers"]):
        part = slice(lay["start"], lay["stop"])
        assert row["var_score_diag_sum"] == pytest.approx(float(o["v1"][part].sum()), rel=1e-9)
        better = "hessian" if o["v2"][part].sum() <= o["v1"][part].sum() else "score"
        assert row["better"] == better
        st, keep = arow["ratios"]["score_kurtosis"], real[part].numpy()
        ratio = o["kurt"][part].numpy()[keep] / o["v1"][part].numpy()[keep]
        assert (st["count"], st["zero_variance"]) == (int(keep.sum()), int((~keep).sum())), lay["layer"]
        for key, value in (("min", ratio.min()), ("median", np.median(ratio)), ("max", ratio.max())):
            assert st[key] == pytest.approx(float(value), rel=1e-9), (lay["layer"], key)
        assert st["min"] >= 1


SMALL = soen_sun.Settings(
    n_inputs=6, width=3, activations=("relu", "tanh"), settings_ab=(("digits", "categorical"), ("digits", "gaussian")),
    depths=(1,), widths=(3,), train_activations=("tanh",), checkpoints=(0,), extra_seeds=(),
)


@pytest.fixture(scope="module")
def small_results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out: Path = tmp_path_factory.mktemp("soen_small")
    soen_sun.run(out, settings=SMALL, progress=False, command="small")
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def _conclusions(results: dict) -> str:
    return summary(results, SMALL, set(PARTS)).split("## Conclusions")[1]


def test_the_conclusions_of_a_run_whose_numbers_back_them(small_results):
    text = _conclusions(small_results)
    assert "Every bound is at or above the exact variance for every entry and trace measured" in text
    assert "Î2's bound is exact (median ratio 1)" in text and "constant multiple of the variance (5.5 and 59.5" in text
    assert "(Tr Î2 is then exact)" in text and "so Î2 estimates that layer's diagonal exactly" in text
    assert "Î1 for the hidden layers of smooth networks" in text and "NOT" not in text


def test_a_bound_below_the_variance_on_a_trace_is_not_called_valid(small_results):
    """Before: the sentence said "at or above ... for every entry and trace" whatever the ratios, and its
    smallest ratio left the traces out."""
    results = copy.deepcopy(small_results)
    results["bound_ratios"][1]["trace_ratio"]["score_spectral"] = 0.5
    text = _conclusions(results)
    assert "Every bound is at or above" not in text
    assert "NOT every bound is at or above the exact variance" in text and "smallest 0.5" in text
    assert "tanh/digits/categorical trace score_spectral" in text


def test_a_bound_below_the_variance_on_an_entry_is_not_called_valid(small_results):
    results = copy.deepcopy(small_results)
    results["bound_ratios"][1]["layers"][0]["ratios"]["score_kurtosis"]["min"] = 0.25
    text = _conclusions(results)
    assert "Every bound is at or above" not in text and "smallest 0.25" in text


def test_gaussian_equality_claims_need_the_ratios_to_be_the_constants(small_results):
    """Before: "Î2's bound is exact" and "a constant multiple" were said from the medians alone."""
    results = copy.deepcopy(small_results)
    (gauss_tanh,) = [r for r in results["bound_ratios"] if (r["family"], r["activation"]) == ("gaussian", "tanh")]
    gauss_tanh["layers"][0]["ratios"]["hessian_spectral"]["max"] = 1.5
    gauss_tanh["layers"][0]["ratios"]["score_spectral"]["max"] = 7.0
    text = _conclusions(results)
    assert "Î2's bound is exact" not in text and "Î2's bound is NOT exact" in text
    assert "constant multiple" not in text and "NOT the constants 5.5 and 59.5" in text


def test_zero_claims_are_not_made_where_the_variances_are_not_zero(small_results):
    """Before: "(Tr Î2 is then exact)" whatever the ReLU trace variance, and "so Î2 estimates that layer's
    diagonal exactly" right after "NOT observed everywhere"."""
    results = copy.deepcopy(small_results)
    relu = [r for r in results["activations"] if r["activation"] == "relu"]
    relu[0]["trace"]["var_hessian"] = 1e-3
    results["activations"][1]["layers"][-1]["var_hessian_diag_max"] = 1e-3
    text = _conclusions(results)
    assert "(Tr Î2 is then exact)" not in text and "NOT zero" in text
    assert "estimates that layer's diagonal exactly" not in text and "diagonal is NOT zero everywhere" in text
    assert "Î2 for the output layer" not in text


def test_the_per_layer_advice_follows_the_counts(small_results):
    """Before: "Î1 for the hidden layers of smooth networks" whatever the number of layers Î2 won."""
    results = copy.deepcopy(small_results)
    (tanh,) = [r for r in results["activations"] if (r["family"], r["activation"]) == ("categorical", "tanh")]
    tanh["layers"][0]["better"] = "hessian"
    text = _conclusions(results)
    assert "Î1 for the hidden layers" not in text and "in 1 of 2 (configuration, layer) pairs" in text
    assert "neither estimator is the better one in every hidden layer" in text
    tanh["layers"][1]["better"] = "hessian"
    assert "Î2 has the smaller summed diagonal variance in every layer here" in _conclusions(results)
