"""Squared score norms per input, label and tensor (``torchfim/score_norms.py``) against brute force.

The float64 oracle of ``tests/test_engine_oracles.py`` gives each tensor's output gram ``G_t = J_t J_tᵀ``
of each input's flat outputs (positions side by side), so that for the output scores ``u_ij`` the
function drew, ``s^t_ij = u_ijᵀ G_t u_ij`` without any of torchfim's engine. The standard errors are
checked against the closed-form variance of the trace estimator over many draws.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from cases import Case
from test_engine_oracles import BACKENDS, IDS, PAIRS, _close, _kwargs, _oracle
from torch import nn

import torchfim
from torchfim import score_norms
from torchfim.score_norms import squared_score_norms


@pytest.fixture
def drawn_scores(monkeypatch) -> list[torch.Tensor]:
    """The output scores ``(B, k, C)`` that :func:`squared_score_norms` draws, in order."""
    seen: list[torch.Tensor] = []
    draw = score_norms.sampled_scores

    def spy(*args, **kwargs):
        u = draw(*args, **kwargs)
        seen.append(u.detach().clone())
        return u

    monkeypatch.setattr(score_norms, "sampled_scores", spy)
    return seen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_squared_norms_per_tensor_equal_the_oracle(case: Case, family: str, backend: str, drawn_scores) -> None:
    res = _oracle(case, family)
    got = squared_score_norms(res["model"], res["x"], family=family, n_samples=3, backend=backend,
                              generator=torch.Generator().manual_seed(4), **_kwargs(case, res))
    u = torch.cat(drawn_scores).double()  # (n, k, L·C)
    assert got.names == list(res["output_grams"])
    for name, gram in res["output_grams"].items():
        want = torch.einsum("nka,nab,nkb->nk", u, gram, u)
        _close(got.of(name), want, 1e-10)
    _close(got.total, got.per_tensor.sum(0), 0.0)


@pytest.mark.parametrize("case_name", ["tanh_mlp", "tokens", "tied"])
def test_the_mean_is_the_score_estimate_with_the_same_labels(case_name: str) -> None:
    """Per tensor, the mean of the squared norms is the score diagonal's sum over that tensor when the
    generator starts in the same state: the same labels, drawn by the same calls."""
    case, family = next((c, f) for c, f in PAIRS if c.name == case_name)
    res = _oracle(case, family)
    kw = dict(family=family, n_samples=5, **_kwargs(case, res))
    got = squared_score_norms(res["model"], res["x"], generator=torch.Generator().manual_seed(8), **kw)
    blocks = torchfim.fisher(res["model"], res["x"], estimator="score", structure="blocks",
                             generator=torch.Generator().manual_seed(8), **kw)
    for name, block in blocks.items():
        estimate, _ = got.trace(name)
        assert math.isclose(estimate, float(torch.diagonal(block).sum()), rel_tol=1e-12, abs_tol=1e-14)


@pytest.mark.filterwarnings("ignore:every input's:RuntimeWarning")  # draws that coincide count, as 0
def test_standard_errors_match_the_closed_form_variance_over_many_draws() -> None:
    """Over 400 draws of k = 2 labels for the 4 inputs: the estimates centre on the exact Tr(F), and the
    mean of the squared standard errors (an unbiased estimate of the estimator's variance, label noise
    alone) on the closed-form ``Var(Tr Î1)/k``, each within 4 of its own Monte-Carlo standard errors;
    with ``inputs_as_sample=True`` it is larger (input spread counts too)."""
    case, family = next((c, f) for c, f in PAIRS if c.name == "tanh_mlp" and f == "categorical")
    res = _oracle(case, family)
    k, reps = 2, 400
    exact = float(torch.diagonal(res["exact"]).sum())
    variance = float(res["var_score_trace"]) / k
    generator = torch.Generator().manual_seed(11)
    draws = [squared_score_norms(res["model"], res["x"], n_samples=k, generator=generator) for _ in range(reps)]
    estimates = torch.tensor([d.trace()[0] for d in draws], dtype=torch.float64)
    squared_se = torch.tensor([d.trace()[1] ** 2 for d in draws], dtype=torch.float64)
    assert abs(float(estimates.mean()) - exact) <= 4 * math.sqrt(variance / reps)
    assert abs(float(squared_se.mean()) - variance) <= 4 * float(squared_se.std()) / math.sqrt(reps)
    sample_se = torch.tensor([d.trace(inputs_as_sample=True)[1] for d in draws], dtype=torch.float64)
    assert float(sample_se.square().mean()) > float(squared_se.mean())


def test_bad_arguments_are_refused_with_the_fix() -> None:
    model = torch.nn.Linear(3, 2).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(torchfim.TorchfimError, match="n_samples"):
        squared_score_norms(model, x, n_samples=0)
    with pytest.raises(torchfim.TorchfimError, match="Generator"):
        squared_score_norms(model, x, generator=3)
    got = squared_score_norms(model, x)
    with pytest.raises(torchfim.TorchfimError, match="no trainable parameter named 'nope'"):
        got.of("nope")
    assert math.isnan(squared_score_norms(model, x[:1], n_samples=1).trace()[1])  # k = 1: no spread of any kind


@pytest.mark.filterwarnings("ignore:every input's:RuntimeWarning")  # draws that coincide count, as 0
def test_a_single_input_gets_the_label_noise_of_its_trace() -> None:
    """One input with k labels: the standard error about its own Tr(F(x₁)) is its label noise, the
    sample std of its k squared norms over √k, and over 400 draws its square centres on the variance of the
    estimates themselves (within 4 Monte-Carlo standard errors of each); the spread between inputs, which ``inputs_as_sample=True`` asks for,
    cannot be seen in one input and stays NaN."""
    case, family = next((c, f) for c, f in PAIRS if c.name == "tanh_mlp" and f == "categorical")
    res = _oracle(case, family)
    model, x = res["model"], res["x"][:1]
    k, reps = 3, 400
    got = squared_score_norms(model, x, n_samples=k, generator=torch.Generator().manual_seed(5))
    s = got.total[0]
    estimate, stderr = got.trace()
    assert estimate == float(s.mean())
    assert math.isclose(stderr, math.sqrt(float(s.var()) / k), rel_tol=1e-12)
    assert math.isnan(got.trace(inputs_as_sample=True)[1])
    assert math.isfinite(got.trace(got.names[0])[1])
    generator = torch.Generator().manual_seed(12)
    draws = [squared_score_norms(model, x, n_samples=k, generator=generator).trace() for _ in range(reps)]
    estimates = torch.tensor([d[0] for d in draws], dtype=torch.float64)
    squared_se = torch.tensor([d[1] ** 2 for d in draws], dtype=torch.float64)
    spread = float(estimates.var())  # its own Monte-Carlo s.e. about √(2/(reps − 1)) of it (skew aside)
    tolerance = 4 * (float(squared_se.std()) / math.sqrt(reps) + spread * math.sqrt(2 / (reps - 1)))
    assert abs(float(squared_se.mean()) - spread) <= tolerance


class _WideTokens(nn.Module):
    """Tokens through layers wide enough that their squared norms come from the positions' Gram matrices
    (``L·(in + out) < in·out``: 3 · 32 < 256 for the 16 → 16 layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(7, 16), nn.Linear(16, 16), nn.Linear(16, 5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.embed(tokens))))


@pytest.mark.parametrize("backend", BACKENDS)
def test_squared_norms_from_position_grams_equal_per_sample_gradients(backend: str, drawn_scores) -> None:
    """Per tensor, against per-sample gradients of ``u_ijᵀ o(xᵢ)`` by autograd, one input and label at a
    time; the monitor's per-sample squared norms (``Backend.sample_squares``) are their sum over tensors."""
    from torchfim.engine.batch import make_batch
    from torchfim.engine.modules import linear
    from torchfim.engine.session import engine_pass
    from torchfim.families import get_family

    torch.manual_seed(0)
    model, x = _WideTokens().double(), torch.randint(0, 7, (6, 3))
    a, g = torch.randn(6, 3, 16, dtype=torch.float64), torch.randn(2, 6, 3, 16, dtype=torch.float64)
    assert linear.linear_squared_norms({"weight": 0}, a, g) is not None  # the Gram path is the one tested
    got = squared_score_norms(model, x, n_samples=2, backend=backend, generator=torch.Generator().manual_seed(2))
    u = torch.cat(drawn_scores).double().reshape(6, 2, 3, 5)
    params = dict(model.named_parameters())
    for i in range(6):
        for j in range(2):
            grads = torch.autograd.grad((model(x[i : i + 1])[0] * u[i, j]).sum(), list(params.values()))
            for name, grad in zip(params, grads):
                assert math.isclose(float(got.of(name)[i, j]), float(grad.square().sum()), rel_tol=1e-10, abs_tol=1e-14)
    with engine_pass(model, backend) as one:
        rec = one.backend.record(make_batch(x, None, torch.device("cpu"), torch.float64))
        fam = one.view.family_for(rec.shape, rec.batch, get_family("categorical"), None)
        v = fam.sample_scores(rec.values, 2, torch.Generator().manual_seed(2))
        _close(one.backend.sample_squares(rec, v), got.total, 1e-10)


def _dominant_class_model() -> nn.Module:
    """A linear model whose every input has p = (0.9, 0.05, 0.05): two labels are usually the same class."""
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64).log())
    return model


def test_draws_that_all_coincide_are_named_as_a_spread_not_seen() -> None:
    """Where each input's k labels give one value the standard error is 0 (its square stays the unbiased variance
    estimate over draws) and a warning says that the spread was not seen; draws that differ give neither."""
    model, x = _dominant_class_model(), torch.randn(3, 4, dtype=torch.float64)
    seeds = {seed: squared_score_norms(model, x, n_samples=2, generator=torch.Generator().manual_seed(seed))
             for seed in range(40)}
    same = next(s for s in seeds.values() if bool((s.total[:, 0] == s.total[:, 1]).all()))
    differ = next(s for s in seeds.values() if not bool((s.total[:, 0] == s.total[:, 1]).all()))
    assert same.label_spread_unseen() and same.label_spread_unseen("bias") and not differ.label_spread_unseen()
    with pytest.warns(RuntimeWarning, match="labels gave the same squared score norm of 'bias'.*n_samples"):
        assert same.trace("bias")[1] == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert differ.trace()[1] > 0 and same.trace(inputs_as_sample=True)[1] >= 0
    one_label = squared_score_norms(model, x, n_samples=1)
    assert not one_label.label_spread_unseen()  # k = 1: no label spread to see
