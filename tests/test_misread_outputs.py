"""Models that end in the inverse link: a sigmoid's probabilities given to the Bernoulli family, an exponential's
or a softplus's rates given to the Poisson family, a variance (GaussianNLLLoss's) given to the heteroscedastic
Gaussian family as its log-variance half, a gamma's mean or shape as their logs. Each family reads the outputs
as its natural parameters, so the Fisher is that of another model (shown below against the model the user meant); torchfim names the final
operation by a warning, from every entry point, and stays quiet for models that return natural parameters."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn
from torch_versions import NODE_SHAPES

import torchfim
from torchfim.families.bernoulli import SIGMOID
from torchfim.train import FisherPenalty, FisherTraceMonitor


class Ending(nn.Module):
    """``head(body(x))`` through ``end``: a module, or a function applied in ``forward``."""

    def __init__(self, width: int, end) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, width))
        self.end = end

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.end(self.body(x))


def _model(width: int, end) -> nn.Module:
    torch.manual_seed(0)
    return Ending(width, end).double()


X = torch.randn(48, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _messages(call, said: str = "torchfim: the model's outputs come out") -> list[str]:
    """The warnings of ``call`` that contain ``said`` (by default, those naming the outputs' final operation)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if said in str(w.message)]


ENTRIES = {
    "fisher": lambda m, fam: torchfim.fisher(m, X, family=fam, structure="diag"),
    "fisher_variance": lambda m, fam: torchfim.fisher_variance(m, X, family=fam, structure="trace"),
    "monitor": lambda m, fam: FisherTraceMonitor(m, X, family=fam).measure(0),
    "penalty": lambda m, fam: FisherPenalty(m, family=fam, generator=torch.Generator().manual_seed(0))(X, step=0),
    "fd-penalty": lambda m, fam: FisherPenalty(m, family=fam, grad_method="finite_difference")(X, step=0),
}

MISREAD = [
    ("bernoulli", 1, nn.Sigmoid(), "a sigmoid"),
    ("bernoulli", 1, lambda z: torch.sigmoid(z).float().double().reshape(-1, 1), "a sigmoid"),  # through a cast
    ("poisson", 2, torch.exp, "exp"),
    ("poisson", 2, nn.Softplus(), "a softplus"),
    ("gamma", 2, torch.exp, "exp"),
    # through clamps, and for positive values through a constant added (before: named only as the last operation)
    ("bernoulli", 1, lambda z: torch.sigmoid(z).clamp(1e-6, 1 - 1e-6), "a sigmoid"),
    ("poisson", 2, lambda z: nn.functional.softplus(z) + 1e-6, "a softplus"),
    ("poisson", 2, lambda z: torch.exp(z).clamp(max=1e4), "exp"),
    ("gamma", 2, lambda z: torch.exp(z) + torch.tensor(1e-6, dtype=z.dtype), "exp"),
    # every output through it: the log-variance half is a variance, as where that half alone is (docs/limits.md)
    ("heteroscedastic_gaussian", 4, nn.Softplus(), "a softplus"),
    ("heteroscedastic_gaussian", 4, torch.exp, "exp"),
]


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize(("family", "width", "end", "named"), MISREAD,
                         ids=["sigmoid", "sigmoid-cast", "exp", "softplus", "gamma-exp", "sigmoid-clamped",
                              "softplus-plus-eps", "exp-clamped", "gamma-exp-plus-eps", "variance-all-softplus",
                              "variance-all-exp"])
def test_a_model_ending_in_the_inverse_link_is_named(family, width, end, named, entry) -> None:
    messages = _messages(lambda: ENTRIES[entry](_model(width, end), family))
    assert messages and all(f"come out of {named}" in m and family in m for m in messages)


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize(("family", "width", "end"), [
    ("bernoulli", 1, nn.Identity()),
    ("bernoulli", 1, lambda z: 2 * torch.sigmoid(z) - 1),  # not the sigmoid's values
    ("poisson", 2, nn.Tanh()),
    ("gamma", 2, nn.Tanh()),
    ("gaussian", 1, nn.Sigmoid()),  # a mean in (0, 1) is a mean
], ids=["logits", "shifted-sigmoid", "tanh", "gamma-tanh", "gaussian-sigmoid"])
def test_models_that_return_natural_parameters_are_not_named(family, width, end, entry) -> None:
    assert _messages(lambda: ENTRIES[entry](_model(width, end), family)) == []


def test_the_warning_is_warranted_the_fisher_is_of_another_model() -> None:
    """With the sigmoid, torchfim computes the Fisher of the Bernoulli model with logits σ(z) (brute force
    below), which is not the Fisher of the model the user meant, with logits z."""
    with_sigmoid, logits = _model(1, nn.Sigmoid()), _model(1, nn.Identity())
    with pytest.warns(RuntimeWarning, match="sigmoid"):
        got = torchfim.fisher(with_sigmoid, X, family="bernoulli", structure="diag")
    params = dict(with_sigmoid.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(with_sigmoid, p, (X,))[:, 0])(params)
    lam = torch.sigmoid(with_sigmoid(X)[:, 0]).detach()
    lam = lam * (1 - lam)
    brute = torch.cat([(lam[:, None] * jac[n].reshape(len(X), -1) ** 2).mean(0) for n in params])
    assert torch.allclose(got, brute, rtol=1e-10, atol=1e-14)
    meant = torchfim.fisher(logits, X, family="bernoulli", structure="diag")
    assert (got - meant).norm() > 0.5 * meant.norm()


def test_positions_and_a_mask_name_it_too() -> None:
    """A per-token Bernoulli model (B, T, 1) ending in a sigmoid, with padding masked."""
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.proj(x))

    x = torch.randn(6, 5, 4, dtype=torch.float64)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[:, 3:] = False
    model = Tokens().double()
    messages = _messages(lambda: torchfim.fisher(model, x, family="bernoulli", structure="trace", mask=mask))
    assert messages == [SIGMOID]


#: What the warnings naming one half of the outputs say.
HALF = " half of the model's outputs comes out of"


def _halves(mean_end, second_end):
    """``torch.cat([mean_end(μ), second_end(v)], -1)`` of the two halves of the body's outputs."""
    def end(z: torch.Tensor) -> torch.Tensor:
        mean, second = z.chunk(2, dim=-1)
        return torch.cat([mean_end(mean), second_end(second)], -1)
    return end


def _log_softplus(v: torch.Tensor) -> torch.Tensor:
    return torch.log(nn.functional.softplus(v))


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize(("family", "end", "named"), [
    ("heteroscedastic_gaussian", _halves(nn.Identity(), nn.functional.softplus), "second half.*final softplus"),
    ("heteroscedastic_gaussian", _halves(nn.Identity(), torch.exp), "second half.*final exp"),
    pytest.param("heteroscedastic_gaussian",
                 lambda z: torch.cat([z[:, :2], nn.Softplus()(z[:, 2:]).float().double()], dim=1),
                 "second half.*final softplus",  # through a cast, joined along dim=1
                 marks=pytest.mark.skipif(not NODE_SHAPES, reason="a join along dim=1 is read from autograd's "
                                          "metadata of its node, which torch < 2.5 does not show")),
    ("gamma", _halves(torch.exp, nn.Identity()), "first half.*final exp.*log-mean"),
    ("gamma", _halves(nn.Identity(), nn.functional.softplus), "second half.*final softplus.*log-shape"),
    ("heteroscedastic_gaussian", _halves(nn.Identity(), lambda v: nn.functional.softplus(v) + 1e-6),
     "second half.*final softplus"),  # GaussianNLLLoss users keep the variance off 0
    ("heteroscedastic_gaussian", lambda z: torch.stack([z[:, :2], torch.exp(z[:, 2:])], -1),
     "second half.*final exp"),  # (B, 2, 2): a (mean, variance) pair per position
], ids=["variance-softplus", "variance-exp", "variance-softplus-cast", "gamma-mean-exp", "gamma-shape-softplus",
        "variance-softplus-plus-eps", "variance-exp-stacked"])
def test_a_half_made_positive_where_its_log_is_read_is_named(family, end, named, entry) -> None:
    """A model trained with torch's GaussianNLLLoss returns the variance (through an exp or a softplus), where the
    heteroscedastic family reads log σ²; a gamma model returning its mean or shape, where their logs are read."""
    messages = _messages(lambda: ENTRIES[entry](_model(4, end), family), HALF)
    assert messages and all(re.search(named, m) and family in m for m in messages)


@pytest.mark.parametrize("entry", list(ENTRIES))
@pytest.mark.parametrize(("family", "end"), [
    ("heteroscedastic_gaussian", nn.Identity()),
    ("heteroscedastic_gaussian", _halves(nn.Identity(), torch.tanh)),
    ("heteroscedastic_gaussian", _halves(nn.functional.softplus, nn.Identity())),  # a positive mean is a mean
    ("heteroscedastic_gaussian", _halves(nn.Identity(), _log_softplus)),  # the log of a variance: what is read
    ("gamma", _halves(_log_softplus, _log_softplus)),
    ("heteroscedastic_gaussian", lambda z: torch.stack([z[:, :2], z[:, 2:]], -1)),
], ids=["plain", "tanh", "positive-mean", "log-of-variance", "gamma-logs", "stacked-pairs"])
def test_halves_read_as_they_are_meant_are_not_named(family, end, entry) -> None:
    assert _messages(lambda: ENTRIES[entry](_model(4, end), family), HALF) == []


def test_the_variance_warning_is_warranted() -> None:
    """With the softplus, torchfim computes the Fisher of the model whose log-variance is softplus(v) (brute force:
    ``Λ = diag(1/σ², ½)`` on the outputs), not that of the model meant, whose variance is softplus(v)."""
    given, meant = _model(4, _halves(nn.Identity(), nn.functional.softplus)), _model(4, _halves(nn.Identity(), _log_softplus))
    with pytest.warns(RuntimeWarning, match="second half of the model's outputs comes out of a final softplus"):
        got = torchfim.fisher(given, X, family="heteroscedastic_gaussian", structure="diag")
    params = dict(given.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(given, p, (X,)))(params)
    out = given(X).detach()
    lam = torch.cat([torch.exp(-out[:, 2:]), torch.full_like(out[:, 2:], 0.5)], -1)  # (B, 4)
    brute = torch.cat([(lam[:, :, None] * jac[n].reshape(len(X), 4, -1) ** 2).sum(1).mean(0) for n in params])
    assert torch.allclose(got, brute, rtol=1e-10, atol=1e-14)
    wanted = torchfim.fisher(meant, X, family="heteroscedastic_gaussian", structure="diag")
    assert (got - wanted).norm() > 0.5 * wanted.norm()
