"""Issue 11, item 13: clear messages for bad calls. Inputs without a batch dimension, of the wrong dtype or shape
for the model, token ids and labels given as floats, the model's own errors raised as they are, huge label
counts and error bounds, a function instead of a module, and targets of the wrong shape. Each test reproduces
the case the issue describes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import mlp_inputs, relu_mlp, tanh_mlp
from torch import nn

import torchfim
import torchfim.train
from torchfim import TorchfimError
from torchfim.errors import check_label_memory


# ------------------------------------------------------------------ item 13: clear messages
@pytest.mark.parametrize("generator", [0, np.random.default_rng(0), "seed"])
@pytest.mark.parametrize("estimator", ["exact", "score", "hessian"])
def test_generator_that_is_not_a_torch_generator(generator: object, estimator: str) -> None:
    """``generator=0`` failed with ``'int' object has no attribute 'device'``."""
    with pytest.raises(TorchfimError, match="generator must be a torch.Generator.*manual_seed"):
        torchfim.fisher(tanh_mlp(3), mlp_inputs(4), estimator=estimator, generator=generator)


def test_one_input_without_batch_dimension() -> None:
    """The (3,) input runs as 3 inputs, its (3,) outputs read as one per input; the forward then fails on
    fewer of them, which is said as the 1-D input it is (not as a batch size fixed in the forward)."""
    with pytest.raises(TorchfimError, match=r"1-D inputs \(\(3,\) torch.float64\) when called on 2 of their 3 "
                                            r"entries: their first dimension is the batch.*x\.unsqueeze\(0\)"):
        torchfim.fisher(tanh_mlp(3), mlp_inputs(4)[0])
    with pytest.raises(TorchfimError, match="batch dimension first"):
        torchfim.fisher(tanh_mlp(3), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("call", [
    lambda m, x: torchfim.fisher(m, x),
    lambda m, x: torchfim.fisher(m, x, backend="functional"),
    lambda m, x: torchfim.train.FisherTraceMonitor(m, x).step(0),
    lambda m, x: torchfim.train.FisherPenalty(m)(x, step=0),
], ids=["fisher", "functional", "monitor", "penalty"])
def test_one_input_without_batch_dimension_read_as_one_sample_by_the_model(call) -> None:
    """One input of 4 features for a model of 3 outputs: the model reads the (4,) input as one unbatched sample and
    returns (3,). The message spoke of a reduction over the batch and of nn.GRU/nn.LSTM, never of the input: it now
    names the 1-D input and x.unsqueeze(0) first."""
    model, x = tanh_mlp(3, d_in=4), mlp_inputs(1, d_in=4)[0]
    with pytest.raises(TorchfimError, match=r"^the model returned outputs of shape \(3,\) for 1-D inputs \(\(4,\) "
                                            r"torch.float64\): it read them as one unbatched sample.*pass "
                                            r"x\.unsqueeze\(0\) for a single input"):
        call(model, x)


def test_one_dimensional_inputs_to_a_one_feature_model() -> None:
    """Inputs of shape (n,) for ``nn.Linear(1, C)``: the first dim is the batch, the feature dim is missing."""
    torch.manual_seed(54)
    with pytest.raises(TorchfimError, match=r"unsqueeze\(1\)"):
        torchfim.fisher(nn.Linear(1, 3).double(), torch.randn(5, dtype=torch.float64))


def test_integer_inputs_to_a_float_model() -> None:
    with pytest.raises(TorchfimError, match=r"integer.*\.float\(\).*torch said: mat1 and mat2 must have the same dtype"):
        torchfim.fisher(tanh_mlp(3), torch.ones(4, 3, dtype=torch.long))


@pytest.mark.parametrize(("dtype", "fix"), [
    (torch.bool, r"boolean inputs \(\(4, 3\) torch.bool\) with torch.float64 parameters; pass x\.float\(\)"),
    (torch.complex128, (r"complex inputs \(\(4, 3\) torch.complex128\) with torch.float64 parameters; torchfim's "
                       r"families take real outputs.*torch.view_as_real\(x\)")),
])
@pytest.mark.parametrize("call", [
    lambda m, x: torchfim.fisher(m, x),
    lambda m, x: torchfim.train.FisherTraceMonitor(m, x).step(0),
    lambda m, x: torchfim.train.FisherPenalty(m)(x, step=0),
], ids=["fisher", "monitor", "penalty"])
def test_boolean_and_complex_inputs_to_a_float_model(dtype: torch.dtype, fix: str, call) -> None:
    """torch's dtype error from inside the forward ("mat1 and mat2 must have the same dtype, but got Bool and
    Double") came out as it was, where integer inputs got the fix: now both are named with theirs, torch's words
    after."""
    x = (mlp_inputs(4) > 0).to(dtype)
    with pytest.raises(TorchfimError, match=fix + r".*torch said: mat1 and mat2 must have the same dtype"):
        call(tanh_mlp(3), x)


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_integer_inputs_to_a_float_model_in_the_penalty(grad_method: str) -> None:
    """The penalty says what ``fisher`` says (torch's dtype error from inside the forward before)."""
    pen = torchfim.train.FisherPenalty(tanh_mlp(3), grad_method=grad_method)
    x = torch.ones(4, 3, dtype=torch.long)
    with pytest.raises(TorchfimError, match=r"integer inputs.*\.float\(\).*torch said: mat1 and mat2"):
        pen(x, step=0)
    with pytest.raises(TorchfimError, match=r"integer inputs.*\.float\(\)"):
        pen.penalised_loss(x, lambda out: out.sum(), step=0)


_WIDE = r"\([36], 7\) torch.float64\): a layer does not take the shape it is given.*torch said: mat1 and mat2 shapes"


@pytest.mark.parametrize("call", [
    lambda model, x: torchfim.fisher(model, x),
    lambda model, x: torchfim.fisher(model, x, backend="functional"),
    lambda model, x: torchfim.fisher_variance(model, x),
    lambda model, x: torchfim.train.FisherTraceMonitor(model, x).step(0),
    lambda model, x: torchfim.train.FisherTraceMonitor(model, x, subset=3).step(0),
    lambda model, x: torchfim.train.FisherPenalty(model)(x, step=0),
    lambda model, x: torchfim.train.FisherPenalty(model, grad_method="finite_difference").penalised_loss(
        x, lambda out: out.sum(), step=0),
], ids=["fisher", "functional", "variance", "monitor", "monitor-subset", "penalty", "penalised-loss"])
def test_inputs_of_a_shape_the_model_does_not_take(call) -> None:
    """Inputs 7 wide for a model whose first layer takes 3: every entry point says so with torch's words (torch's
    own error from inside the forward before, or from inside torchfim's stand-ins for the penalty)."""
    with pytest.raises(TorchfimError, match=rf"the model's forward failed on the mini-batch \({_WIDE}") as caught:
        call(tanh_mlp(3), torch.randn(6, 7, dtype=torch.float64))
    assert isinstance(caught.value.__cause__, RuntimeError)  # torch's error, kept as the cause


def test_images_of_another_size_and_token_ids_past_the_table() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 3)).double()
    with pytest.raises(TorchfimError, match=r"\(2, 1, 8, 8\) torch.float64\): a layer does not take.*torch said: mat1"):
        torchfim.fisher(conv, torch.randn(2, 1, 8, 8, dtype=torch.float64))  # built for 6×6 images
    with pytest.raises(TorchfimError, match=r"\(2, 3, 6, 6\).*a layer does not take.*expected input.*3 channels"):
        torchfim.fisher(conv, torch.randn(2, 3, 6, 6, dtype=torch.float64))
    tokens = nn.Sequential(nn.Embedding(5, 3), nn.Flatten(), nn.Linear(6, 3)).double()
    with pytest.raises(TorchfimError, match=r"outside an embedding's table; pass token ids in \[0, num_embeddings\)"):
        torchfim.fisher(tokens, torch.randint(0, 9, (4, 2), generator=torch.Generator().manual_seed(0)))
    one_each = nn.Sequential(nn.Embedding(5, 3), nn.Linear(3, 4)).double()  # 1-D ids: one token per input
    with pytest.raises(TorchfimError, match=r"outside an embedding's table"):  # not the 1-D inputs' advice
        torchfim.fisher(one_each, torch.tensor([0, 1, 2, 7]))


class _OwnLoss(nn.Module):
    """Token ids to a class per input, with its own loss where ``labels`` are given (as Hugging Face models)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.head = nn.Embedding(5, 3), nn.Linear(3, 4)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(self.emb(input_ids).mean(1))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = F.cross_entropy(logits, labels)
        return out


@pytest.mark.parametrize("call", [
    lambda model, x: torchfim.fisher(model, x, output=lambda out: out["logits"]),
    lambda model, x: torchfim.train.FisherTraceMonitor(model, x, output=lambda out: out["logits"]).step(0),
    lambda model, x: torchfim.train.FisherPenalty(model, output=lambda out: out["logits"])(x, step=0),
], ids=["fisher", "monitor", "penalty"])
def test_token_ids_given_as_floats_are_named(call) -> None:
    """torch's "Expected tensor for argument #1 'indices'" came out as it was, from inside the embedding."""
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TorchfimError, match=r"an embedding was given floating-point indices; pass token ids as "
                                            r"integers \(ids.long\(\)\); torch said: Expected tensor"):
        call(_OwnLoss().double(), {"input_ids": ids.double()})


@pytest.mark.parametrize("call", [
    lambda model, x: torchfim.fisher(model, x, output=lambda out: out["logits"]),
    lambda model, x: torchfim.train.FisherTraceMonitor(model, x, output=lambda out: out["logits"]).step(0),
    lambda model, x: torchfim.train.FisherPenalty(model, output=lambda out: out["logits"])(x, step=0),
], ids=["fisher", "monitor", "penalty"])
@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_token_ids_of_an_integer_dtype_an_embedding_does_not_take_are_named(call, dtype: torch.dtype) -> None:
    """int16 or uint8 token ids were told "integer inputs suit embedding layers only; pass x.float()": the wrong
    fix, since the model is an embedding's and int64 ids are what it takes."""
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TorchfimError, match=r"an embedding takes int64 or int32 indices only; pass token ids as "
                                            r"ids.long\(\); torch said: Expected tensor") as caught:
        call(_OwnLoss().double(), {"input_ids": ids.to(dtype)})
    assert "x.float()" not in str(caught.value)


def test_labels_of_the_models_own_loss_given_as_floats_are_named_as_the_labels() -> None:
    """The advice was "failed on integer inputs … pass x.float()": wrong, since the labels are what is wrong."""
    ids = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    model = _OwnLoss().double()
    pen = torchfim.train.FisherPenalty(model, output=lambda out: out["logits"])
    try:
        F.cross_entropy(torch.zeros(2, 3), torch.zeros(2))
    except RuntimeError as err:
        if "expected target dtype" not in str(err):
            pytest.skip(f"this torch names float targets in other words ({err}), read as any dtype mismatch")
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(TorchfimError, match=r"class targets of a dtype it does not take.*int64 class indices "
                                                r"\(labels.long\(\)\).*expected target"):
            pen.penalised_loss({"input_ids": ids, "labels": torch.zeros(4, dtype=dtype)}, lambda o: o["loss"], step=0)


def test_errors_of_the_forward_own_and_of_the_output_map_are_raised_as_they_are() -> None:
    """Only torch's words for a layer's input shape, raised inside the model's forward, are read as the inputs'
    shape: an IndexError of the forward's own code, a broadcast in the forward and a product in ``output=``
    come out as themselves."""

    class Indexes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.sizes = nn.Linear(3, 3), [3]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.sizes[1]

    class Broadcasts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + torch.zeros(5, dtype=x.dtype)

    x = mlp_inputs(4)
    with pytest.raises(IndexError, match="list index out of range"):
        torchfim.fisher(Indexes().double(), x)
    with pytest.raises(RuntimeError, match="must match the size") as caught:
        torchfim.fisher(Broadcasts().double(), x)
    assert not isinstance(caught.value, TorchfimError)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied") as caught:
        torchfim.fisher(tanh_mlp(3), x, output=lambda out: out @ torch.zeros(5, 2, dtype=out.dtype))
    assert not isinstance(caught.value, TorchfimError)


def test_a_failure_that_only_mentions_a_dtype_is_not_blamed_on_integer_inputs() -> None:
    """torch's checkpoint lists the metadata (``'dtype': torch.float64``) of tensors it recomputed
    differently: that error was reported as "failed on integer inputs" for token ids."""

    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(5, 3)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            self.emb(ids)
            raise RuntimeError("recomputed metadata: {'shape': torch.Size([2]), 'dtype': torch.float64}")

    with pytest.raises(RuntimeError, match="recomputed metadata") as caught:
        torchfim.fisher(Fails().double(), torch.ones(4, 2, dtype=torch.long))
    assert not isinstance(caught.value, TorchfimError)


def test_model_returning_a_long_tensor() -> None:
    class Argmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).argmax(-1, keepdim=True).expand(-1, 3)

    with pytest.raises(TorchfimError, match="dtype torch.int64.*floating-point outputs"):
        torchfim.fisher(Argmax().double(), mlp_inputs(4))


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_huge_n_samples_is_a_clear_error(estimator: str) -> None:
    with pytest.raises(TorchfimError, match="n_samples=1099511627776.*GiB"):
        torchfim.fisher(tanh_mlp(3), mlp_inputs(4), estimator=estimator, n_samples=2**40)


def test_huge_n_samples_is_fine_for_a_closed_form_variance() -> None:
    """The variance with k labels is the one-label variance over k: no labels are drawn."""
    model, x = tanh_mlp(3, seed=55), mlp_inputs(4, seed=56)
    one = torchfim.fisher_variance(model, x, structure="trace")
    many = torchfim.fisher_variance(model, x, structure="trace", n_samples=2**40)
    assert math.isclose(float(many), float(one) / 2**40, rel_tol=1e-12)


def test_label_memory_check() -> None:
    check_label_memory(64, 1000, 10, torch.device("cpu"))  # 5 MB: fine
    with pytest.raises(TorchfimError, match="n_samples=1099511627776 labels for each of 4 inputs.*fewer labels"):
        check_label_memory(4, 2**40, 3, torch.device("cpu"))


@pytest.mark.parametrize(
    "call",
    [
        torchfim.compare_estimators,
        torchfim.samples_needed,
        torchfim.fisher,
        torchfim.fisher_variance,
        torchfim.variance_bound,
    ],
)
def test_a_function_instead_of_a_module(call) -> None:
    """``compare_estimators(lambda ...)`` failed with ``'function' object has no attribute ...``."""
    model = tanh_mlp(3)
    with pytest.raises(TorchfimError, match="model must be a torch.nn.Module, got function"):
        call(lambda x: model(x), mlp_inputs(4))


def test_tiny_rel_error_is_a_clear_error() -> None:
    """``rel_error=1e-300`` overflowed in ``math.ceil`` (OverflowError)."""
    with pytest.raises(TorchfimError, match="rel_error=1e-300 would need more than 1e308 labels"):
        torchfim.samples_needed(tanh_mlp(3, seed=57), mlp_inputs(6, seed=58), rel_error=1e-300)


def test_small_rel_error_gives_the_exact_huge_count() -> None:
    """At ε = 1e-100 the count (~1e200) is finite: an exact int following ``⌈V₁/(εI)²⌉``."""
    model, x = tanh_mlp(3, seed=57), mlp_inputs(6, seed=58)
    value = float(torchfim.fisher(model, x, structure="trace"))
    var1 = float(torchfim.fisher_variance(model, x, structure="trace"))
    k = torchfim.samples_needed(model, x, rel_error=1e-100)
    assert isinstance(k, int) and math.isclose(k, var1 / value**2 * 1e200, rel_tol=1e-9)


def test_tiny_rel_error_with_zero_variance_needs_one_label() -> None:
    """Î2 of a ReLU network has zero variance: one label meets any accuracy (0/0 gave ValueError)."""
    assert torchfim.samples_needed(relu_mlp(3), mlp_inputs(6), estimator="hessian", rel_error=1e-300) == 1


def test_targets_of_the_wrong_shape_for_outputs_with_positions_are_named_in_the_users_terms() -> None:
    """The message named an internal object ("targets for Positions((3,)) of 'categorical'")."""
    from cases import token_model

    tokens = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TorchfimError, match=r"^targets for outputs with positions \(3,\) \(family 'categorical' at "
                                            r"each\) must have shape \(batch, \*positions.*got \(4, 2\)"):
        with pytest.warns(RuntimeWarning, match="do not fit outputs"):  # said before the empirical estimator refuses
            torchfim.fisher(token_model(4), [(tokens, torch.zeros(4, 2, dtype=torch.long))], estimator="empirical")


def test_an_input_with_no_observed_position_counts_with_a_warning() -> None:
    """An input whose mask is False everywhere counts in the mean over inputs with a Fisher of 0: the Fisher of the
    batch is (n − 1)/n times that of the others, and torchfim says so once."""
    import warnings

    from cases import token_model

    model = token_model(4)
    tokens = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[2] = False
    with pytest.warns(RuntimeWarning, match=r"1 of the 4 inputs of a mini-batch has no observed position.*counts in"):
        whole = torchfim.fisher(model, tokens, mask=mask, structure="trace")
    others = torchfim.fisher(model, tokens[[0, 1, 3]], mask=mask[[0, 1, 3]], structure="trace")
    assert torch.allclose(whole, others * 3 / 4, rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchfim.fisher(model, tokens, mask=torch.ones(4, 3, dtype=torch.bool), structure="trace")
