"""A keyword a public call does not take raises a TypeError that names what to pass instead (the peers' keywords,
near-misses of torchfim's own), and nothing else changes: calls that bind, errors from inside, signatures."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import torchfim
from torchfim.errors import TorchfimError
from torchfim.keyword_hints import UnknownKeywordError, explains_keywords
from torchfim.train import FisherPenalty, FisherTraceMonitor


@pytest.fixture()
def setting():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(), torch.randn(6, 4, dtype=torch.float64)


def _message(call) -> str:
    with pytest.raises(UnknownKeywordError) as caught:
        call()
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, TorchfimError)
    return str(caught.value)


@pytest.mark.parametrize(("keyword", "value", "expected"), [
    ("loss_func", nn.CrossEntropyLoss(), "family='categorical'"),
    ("lossfunc", nn.MSELoss(), "family='gaussian'"),
    ("loss_fn", nn.BCEWithLogitsLoss(), "family='bernoulli'"),
    ("criterion", object(), "distribution of the outputs as family="),
    ("reduction", "sum", "multiply it by the number of inputs"),
    ("mc_samples", 4, "n_samples="),
    ("fisher_type", "mc", "estimator="),
    ("hessian_structure", "kron", "structure="),
    ("damping", 1e-3, "without damping"),
    ("labels", None, "(inputs, targets) pairs"),
    ("dataloader", None, "second positional argument"),
    ("n_sampels", 2, "did you mean n_samples=?"),
    ("loss_func", nn.BCELoss(), "which takes probabilities, pass family='bernoulli' with the model's logits"),
    ("sigma", 0.5, "family=torchfim.families.Gaussian(sigma=0.5)"),
    ("device", "cuda", "computes on the model's device"),
    ("estimater", "score", "did you mean estimator=?"),
])
def test_fisher_names_the_keyword_to_pass_instead(setting, keyword, value, expected):
    model, x = setting
    message = _message(lambda: torchfim.fisher(model, x, **{keyword: value}))
    assert message.startswith(f"fisher() takes no keyword argument {keyword!r}") and expected in message


def test_every_unknown_keyword_is_named_and_one_without_a_hint_plainly(setting):
    model, x = setting
    message = _message(lambda: torchfim.fisher(model, x, reduction="mean", zzz=1))
    assert "'reduction': torchfim's Fisher is the mean" in message and message.endswith("; 'zzz'")


def test_a_peers_keyword_is_named_only_where_the_call_takes_what_it_stands_for(setting):
    """samples_needed returns the labels per input and FisherPenalty draws one: neither takes n_samples, so
    ``mc_samples=`` gets no hint there (and a near-miss where there is one), while fisher names n_samples=."""
    model, x = setting
    assert "n_samples=" in _message(lambda: torchfim.fisher(model, x, mc_samples=3))
    assert _message(lambda: torchfim.samples_needed(model, x, mc_samples=3)).endswith("argument 'mc_samples'")
    assert "estimator=" not in _message(lambda: FisherPenalty(model, fisher_type="mc"))
    assert "(inputs, targets) pairs" in _message(lambda: torchfim.fisher_variance(model, x, labels=None))
    assert "method= is its old name" in _message(lambda: torchfim.variance_bound(model, x, method="auto"))
    assert "returns the labels per input" in _message(lambda: torchfim.samples_needed(model, x, n_samples=3))


def test_compare_estimators_names_its_sibling_for_another_structure(setting):
    model, x = setting
    assert "fisher_variance(structure=...)" in _message(lambda: torchfim.compare_estimators(model, x, structure="full"))
    assert "compares both estimators" in _message(lambda: torchfim.compare_estimators(model, x, estimator="score"))


@pytest.mark.parametrize("call", [
    lambda m, x: torchfim.fisher_variance(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.variance_bound(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.score_variance_bound_spectral(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.score_variance_bound_kurtosis(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.hessian_variance_bound_spectral(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.samples_needed(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.fisher_covariance(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.combined_variance(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: torchfim.score_norms.squared_score_norms(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: FisherTraceMonitor(m, x, loss_func=nn.CrossEntropyLoss()),
    lambda m, x: FisherPenalty(m, loss_func=nn.CrossEntropyLoss()),
], ids=["fisher_variance", "variance_bound", "score_spectral", "score_kurtosis", "hessian_spectral",
        "samples_needed", "fisher_covariance", "combined_variance", "squared_score_norms", "monitor", "penalty"])
def test_every_public_call_explains_a_peers_keyword(setting, call):
    model, x = setting
    message = _message(lambda: call(model, x))
    assert "takes no keyword argument 'loss_func'" in message and "family='categorical'" in message
    assert "__init__" not in message  # the class is named, as the user wrote it


def test_a_type_error_from_inside_the_call_is_left_as_it_is(setting):
    _, x = setting

    class Broken(nn.Linear):
        def forward(self, inputs):
            raise TypeError("the model's own error")

    with pytest.raises(TypeError, match="the model's own error") as caught:
        torchfim.fisher(Broken(4, 3).double(), x, n_samples=1)
    assert not isinstance(caught.value, UnknownKeywordError)


def test_decorated_functions_keep_their_signatures_and_results(setting):
    model, x = setting
    assert list(inspect.signature(torchfim.fisher).parameters)[:3] == ["model", "inputs", "family"]
    assert "alpha" in inspect.signature(FisherPenalty).parameters

    def plain(a: int, *, beta: int = 1) -> int:
        """Add."""
        return a + beta

    explained = explains_keywords(plain)
    assert explained(1, beta=2) == 3 and explained.__doc__ == "Add."
    message = str(pytest.raises(UnknownKeywordError, explained, 1, betta=2).value)
    assert message == "plain() takes no keyword argument 'betta': did you mean beta=?"
    with pytest.raises(TypeError, match="missing 1 required positional argument") as caught:
        explained()  # a call that does not bind for another reason: Python's own error
    assert not isinstance(caught.value, UnknownKeywordError)


@pytest.mark.parametrize(("family", "expected"), [
    ("mse", "family='gaussian'"), ("nll", "family='categorical'"), ("ce", "family='categorical'"),
    ("gaussian_nll", "family='heteroscedastic_gaussian'"), ("bce", "which takes probabilities"),
    ("binary_cross_entropy", "with the model's logits"), (nn.BCELoss(), "drop its final sigmoid"),
    ("Categorical", "family names are lower case: pass family='categorical'"),
])
def test_a_loss_or_a_capitalised_name_as_family_is_told_the_family(setting, family, expected):
    """Short loss names, losses on probabilities and capitalised family names (a newcomer's trial) named the valid
    families only; each now says which to pass."""
    model, x = setting
    with pytest.raises(TorchfimError, match="unknown family") as caught:
        torchfim.fisher(model, x, family=family)
    assert expected in str(caught.value)


def test_a_bce_model_read_through_logit_has_the_bernoulli_fisher(setting):
    """The fix the BCELoss hint names: a model ending in a sigmoid, read through ``output=torch.logit``, has the
    Bernoulli Fisher of the model without its sigmoid."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1)).double(), setting[1]
    with_sigmoid = nn.Sequential(model, nn.Sigmoid())
    expected = torchfim.fisher(model, x, family="bernoulli", structure="full")
    got = torchfim.fisher(with_sigmoid, x, family="bernoulli", structure="full", output=torch.logit)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
