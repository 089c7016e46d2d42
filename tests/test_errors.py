"""Every bad input to torchfim.fisher ends in a TorchfimError naming the fix (issue 2, point 5)."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from oracles import exact_fisher
from torch import nn

import torchfim
import torchfim.train
from torchfim import TorchfimError


@pytest.fixture
def model():
    return tanh_mlp(3)


def test_errors_are_value_errors():
    assert issubclass(TorchfimError, ValueError)


def test_wrong_output_shape_for_family(model):
    with pytest.raises(TorchfimError, match="one logit per input.*family='categorical'"):
        torchfim.fisher(model, mlp_inputs(4), family="bernoulli")


def test_empirical_needs_targets(model):
    with pytest.raises(TorchfimError, match="pass targets="):
        torchfim.fisher(model, mlp_inputs(4), estimator="empirical")
    with pytest.raises(TorchfimError, match="came without targets"):
        torchfim.fisher(model, [mlp_inputs(4)], estimator="empirical")


def test_non_finite_outputs(model):
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(TorchfimError, match="non-finite outputs.*check the inputs"):
        torchfim.fisher(model, mlp_inputs(4))


@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "2"])
def test_bad_n_samples(model, bad):
    with pytest.raises(TorchfimError, match="n_samples must be a positive integer.*n_samples=1"):
        torchfim.fisher(model, mlp_inputs(4), estimator="score", n_samples=bad)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "multinomial"}, "unknown family 'multinomial'; choose one of 'categorical'"),
        ({"estimator": "kfac"}, "unknown estimator 'kfac'; choose one of 'exact', 'score'.*K-FAC.*docs/peers.md"),
        ({"structure": "block"}, "unknown structure 'block'; choose one of 'full', 'diag'[^(]*$"),
        # The peers' names get torchfim's (a porting user's trial met "unknown structure 'kron'" alone).
        ({"structure": "kron"}, r"unknown structure 'kron'.*\(Kronecker-factored .* not in torchfim"),
        ({"estimator": "mc"}, r"unknown estimator 'mc'.*\(the Monte Carlo Fisher is estimator='score'\)"),
        ({"estimator": "EF"}, r"\(the empirical Fisher is estimator='empirical'\)"),
        ({"structure": "block_diag"}, r"\(structure='blocks' \(one block per parameter tensor\)\)"),
    ],
)
def test_unknown_names(model, kwargs, message):
    with pytest.raises(TorchfimError, match=message):
        torchfim.fisher(model, mlp_inputs(4), **kwargs)


def test_full_too_large_for_memory():
    big = nn.Linear(2000, 100)  # P ≈ 2·10⁵: a dense P×P is ≈ 300 GiB
    with pytest.raises(TorchfimError, match="structure='full' needs a 200100×200100 matrix.*use structure='diag'"):
        torchfim.fisher(big, torch.randn(2, 2000), family="gaussian", structure="full")
    # diag on the same model is fine.
    assert torchfim.fisher(big, torch.randn(2, 2000), family="gaussian").shape == (200100,)


#: The closed forms on one (B, C) output: call, and whether it builds a C × C output Gram matrix per input
#: (the trace of Î1's variance does, the diagonals do not).
CLOSED_FORM_CALLS = {
    "fisher_variance": (lambda m, x: torchfim.fisher_variance(m, x, structure="trace"), True),
    "variance_bound": (lambda m, x: torchfim.variance_bound(m, x, structure="trace"), True),
    "fisher_covariance": (lambda m, x: torchfim.fisher_covariance(m, x, structure="trace"), True),
    "combined": (lambda m, x: torchfim.fisher(m, x, estimator="combined", structure="trace"), True),
    "samples_needed": (lambda m, x: torchfim.samples_needed(m, x), True),
    "return_stderr": (lambda m, x: torchfim.fisher(m, x, estimator="score", return_stderr=True), False),
    "compare_estimators": (lambda m, x: torchfim.compare_estimators(m, x), False),
    "diag variance": (lambda m, x: torchfim.fisher_variance(m, x, structure="diag"), False),
}
#: The one closed form that cannot cut a mini-batch: the combined estimator draws labels, and cutting would
#: change which rows get which.
UNCUT = {"combined"}


class _Cut(Exception):
    """Raised by the spy on the engine loop's recordings at the first smaller group."""


@pytest.mark.parametrize("call", list(CLOSED_FORM_CALLS))
def test_closed_forms_refuse_a_jacobian_that_would_not_fit_before_allocating_it(call, monkeypatch):
    """10,000 classes, 64 inputs, the per-module backend: pulled back together, one input's output numbers
    hold the 10⁴ × 10⁴ unit vectors and 10⁴ pull-backs of the layer's 10⁴ outputs, 2·10⁸ numbers (1.49 GiB
    in float32 with a working copy), and with its output Gram matrix 3·10⁸ (2.24 GiB); the mini-batch
    6.5·10⁹ (48.4 GiB), or 1.29·10¹⁰ with 64 Gram matrices (96.1 GiB). With 1 GiB free the closed forms
    refuse at once and name the alternatives. With 6 GiB one input fits but the mini-batch does not: the
    engine loop records it again in groups of the size that fits (64 · 6 / 48.4: 7; 64 · 6 / 96.1: 3), where
    the combined estimator, which draws labels and so cannot cut its mini-batches, gives that size in its
    error. Calls that also need the exact Fisher or Î2 (9,999 pull-backs per input here) refuse before
    starting them."""
    from torchfim import _memory, estimators
    from torchfim.engine import loop, row_groups

    def exact(*args, **kwargs):
        raise AssertionError("the exact Fisher ran before the closed form that refuses")

    monkeypatch.setattr(estimators, "_add_exact", exact)
    run, grams = CLOSED_FORM_CALLS[call]
    one, whole, most = ("2\\.24", "96\\.1", 3) if grams else ("1\\.49", "48\\.4", 7)
    model = nn.Linear(4, 10_000)
    x = torch.randn(64, 4)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    with pytest.raises(TorchfimError, match=rf"C = 10,000 output numbers.*one input needs about {one} GiB.*"
                                            r"1 GiB is available.*estimator='score'"):
        run(model, x)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 6 * 2**30)
    if call in UNCUT:
        with pytest.raises(TorchfimError, match=rf"a mini-batch of 64 inputs needs about {whole} GiB.*"
                                                rf"mini-batches of at most {most} inputs"):
            run(model, x)
        return
    # Row groups by size (row_groups.WHOLE_GROUP_ELEMENTS) would record these inputs one at a time from the
    # start: lifted, the memory check alone decides.
    monkeypatch.setattr(row_groups, "WHOLE_GROUP_ELEMENTS", 2**62)
    sizes, record = [], loop.recorded

    def spy(view, backend, part):
        sizes.append(part.size)
        if part.size < 64:  # the first smaller group: its pull-back would take minutes, the cut is what is tested
            raise _Cut
        return record(view, backend, part)

    monkeypatch.setattr(loop, "recorded", spy)
    with pytest.raises(_Cut):
        run(model, x)
    assert sizes[-2:] == [64, most], sizes


@pytest.mark.parametrize("structure", ["trace", "diag"])
def test_a_bounds_per_input_constant_comes_after_the_memory_check(structure, monkeypatch):
    """The kurtosis bound's ``E‖u‖⁴`` reads a ``C × C`` identity per input: it is taken at its first use,
    after the engine has refused the outputs, never before (a vocabulary would fail inside torch)."""
    from torchfim import _memory, variance

    taken = []
    own = variance._bound_scale
    monkeypatch.setattr(variance, "_bound_scale", lambda *args: taken.append(True) or own(*args))
    model, x = nn.Linear(4, 10_000), torch.randn(64, 4)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**30)
    with pytest.raises(TorchfimError, match="one input needs about"):
        torchfim.score_variance_bound_kurtosis(model, x, structure=structure)
    assert not taken
    small = nn.Linear(4, 3)  # the constant is still taken where the outputs fit
    torchfim.score_variance_bound_kurtosis(small, x[:4], structure=structure)
    assert taken


def test_the_functional_backend_sizes_whole_output_pull_backs_by_per_sample_gradients(monkeypatch):
    """The functional backend builds every input's Jacobian: 10,000 outputs by 50,000 parameters (with the
    unit vectors, 6·10⁸ numbers: 4.47 GiB) per input, where the per-module backend holds 1.49 GiB."""
    from torchfim import _memory

    model, x = nn.Linear(4, 10_000), torch.randn(64, 4)
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2 * 2**30)
    with pytest.raises(TorchfimError, match=r"one input needs about 4\.47 GiB"):
        torchfim.fisher_variance(model, x, structure="diag", backend="functional")
    with pytest.raises(TorchfimError, match=r"a mini-batch of 64 inputs needs about 48\.4 GiB.*at most 2 inputs"):
        torchfim.fisher(model, x, estimator="combined", structure="diag", backend="modules")


def test_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(TorchfimError, match=r"BatchNorm layer in training mode.*model\.eval\(\)"):
        torchfim.fisher(model, mlp_inputs(4))
    model.eval()
    torchfim.fisher(model, mlp_inputs(4))


def test_batchnorm_without_running_statistics():
    """In eval mode too it normalises with the batch's statistics; before, a bare ValueError from torch."""
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).double()
    model.eval()
    with pytest.raises(TorchfimError, match=r"'1' is a BatchNorm layer without running statistics.*nn\.GroupNorm"):
        torchfim.fisher(model, mlp_inputs(4))


def _embedding_model(**options) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(6, 3, **options), nn.Flatten(), nn.Linear(12, 3)).double()


def test_embedding_with_max_norm_is_refused_with_the_fix_that_works():
    """Its forward rescales rows of the weight in place; before, the refusal blamed another thread."""
    model, ids = _embedding_model(max_norm=0.5), torch.randint(0, 6, (5, 4), generator=torch.Generator().manual_seed(1))
    with pytest.raises(TorchfimError, match=r"'0' is an embedding with max_norm=0\.5.*emb\.max_norm = None"):
        torchfim.fisher(model, ids)
    with torch.no_grad():  # the fix the message gives
        torch.embedding_renorm_(model[0].weight, ids, 0.5, 2.0)
    model[0].max_norm = None
    want = exact_fisher(model, ids, "categorical")
    assert torch.allclose(torchfim.fisher(model, ids, structure="full"), want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_scale_grad_by_freq_leaves_the_fisher_of_derivatives(backend: str):
    """``scale_grad_by_freq`` rescales an embedding's gradient by the ids' counts in the batch (a training
    heuristic): the Fisher is of derivatives, the same as without it; the user's module keeps the flag."""
    model, ids = _embedding_model(scale_grad_by_freq=True), torch.randint(0, 6, (5, 4), generator=torch.Generator().manual_seed(1))
    want = exact_fisher(_embedding_model(), ids, "categorical")  # the same weights, without the flag
    got = torchfim.fisher(model, ids, structure="full", backend=backend)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13) and model[0].scale_grad_by_freq


@pytest.mark.parametrize("call", ["fisher", "fisher_variance", "samples_needed"])
def test_a_lazy_module_before_its_first_forward_is_refused_with_the_fix(call: str):
    """Its parameters have no shape yet; before, a RuntimeError from inside torch. After the forward the
    message names, the Fisher is the dense oracle's."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3)).double(), mlp_inputs(5)
    with pytest.raises(TorchfimError, match=r"'0\.weight', '0\.bias' of the model are not initialised yet.*model\(x\)"):
        getattr(torchfim, call)(model, x)
    with torch.no_grad():
        model(x)
    assert torch.allclose(torchfim.fisher(model, x, structure="full"), exact_fisher(model, x, "categorical"),
                          rtol=1e-10, atol=1e-13)


def test_training_tools_on_a_lazy_module_before_its_first_forward():
    """A monitor made, and measured, before the training loop's first forward is refused with the fix (before, a
    ValueError from inside torch) and, after that forward, measures what a monitor of the initialised model does;
    the penalty's own forward initialises the model, and its value and gradient are the initialised twin's."""
    import copy

    from torchfim.train import FisherPenalty, FisherTraceMonitor

    torch.manual_seed(0)
    model, x = nn.Sequential(nn.LazyLinear(4), nn.Tanh(), nn.Linear(4, 3)).double(), mlp_inputs(6)
    mon = FisherTraceMonitor(model, x, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TorchfimError, match=r"'0\.weight', '0\.bias' of the model are not initialised yet.*model\(x\)"):
        mon.measure(0)
    pen = FisherPenalty(model, generator=torch.Generator().manual_seed(1))
    value = pen(x, step=0)  # its forward initialises the lazy layer
    grads = torch.autograd.grad(value, list(model.parameters()))
    twin = copy.deepcopy(model)
    twin_value = FisherPenalty(twin, generator=torch.Generator().manual_seed(1))(x, step=0)
    assert float(value.detach()) == float(twin_value.detach()) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(twin_value, list(twin.parameters()))))
    want = FisherTraceMonitor(twin, x, generator=torch.Generator().manual_seed(0)).measure(0)
    got = mon.measure(0)
    assert (got.trace, got.stderr) == (want.trace, want.stderr)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 4), nn.Linear(3, 4)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return self.a(x1) * torch.tanh(self.b(x2))


class _SameInputTwice(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x, x)


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize(("inputs", "call"), [
    ("pair", (r"inputs is a tuple of two tensors, .*that may be \(inputs, targets\) or two mini-batches.*a model of two "
             r"inputs takes a dict keyed by its forward's argument names, e.g. \{'x1': x1, 'x2': x2\}")),
    ("misnamed", (r"model\(x1=…, y2=…\): missing a required argument: 'x2'; the forward takes \(x1, x2\)\. A pair "
                 r"\(x, y\).*as \(inputs, targets\)"))])
def test_a_mini_batch_the_forward_cannot_take_is_named_with_the_fix(inputs: str, call: str, backend: str):
    """Before any forward; before, a TypeError from inside the model's call. A dict by the forward's
    argument names then gives the oracle's Fisher. (A tuple of two inputs is refused before the forward as an
    ambiguous pair, naming the dict.)"""
    torch.manual_seed(0)
    model, x = _TwoInputs().double(), mlp_inputs(5)
    given = (x, x) if inputs == "pair" else {"x1": x, "y2": x}
    with pytest.raises(TorchfimError, match=call):
        torchfim.fisher(model, given, structure="diag", backend=backend)
    got = torchfim.fisher(model, {"x1": x, "x2": x}, structure="full", backend=backend)
    assert torch.allclose(got, exact_fisher(_SameInputTwice(model), x, "categorical"), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(("inputs", "call"), [("tensor", r"model\(<tensor>\): missing a required argument: 'x2'"),
                                              ("misnamed", r"model\(x1=…, y2=…\): missing a required argument: 'x2'")])
def test_the_penalty_names_a_mini_batch_the_forward_cannot_take(inputs: str, call: str):
    """Its mini-batch is a tensor or a dict; before, the model's TypeError. The dict by names then works
    (the penalty's value against its definition is tested in test_train_penalty)."""
    model, x = _TwoInputs().double(), mlp_inputs(5)
    pen = torchfim.train.FisherPenalty(model, alpha=0.1)
    with pytest.raises(TorchfimError, match=call + r"; the forward takes \(x1, x2\)"):
        pen(x if inputs == "tensor" else {"x1": x, "y2": x}, step=0)
    pen = torchfim.train.FisherPenalty(model, alpha=0.1)
    assert pen({"x1": x, "x2": x}, step=0) > 0


class _Named(nn.Module):
    """Returns its logits under a name torchfim does not look for, beside a scalar."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x: torch.Tensor) -> dict:
        h = self.lin(x)
        return {"prediction_logits": h, "loss": h.square().mean(), "note": "not a tensor"}


@pytest.mark.parametrize("call", ["fisher", "penalty"])
def test_an_output_to_pick_from_is_described_with_its_tensors(call: str):
    """Without output=, and with an output= that asks for a field the output lacks (before: the KeyError from
    inside the engine), the message lists the tensors the output holds; the right field then gives the oracle."""
    model, x = _Named().double(), mlp_inputs(5)

    def run(output):
        if call == "fisher":
            return torchfim.fisher(model, x, structure="full", output=output)
        return torchfim.train.FisherPenalty(model, alpha=0.1, output=output)(x, step=0)

    fields = r"a dict with tensors prediction_logits \(5, 3\), loss \(\)"
    with pytest.raises(TorchfimError, match=r"returned " + fields):
        run(None)
    with pytest.raises(TorchfimError, match=r"output= function raised KeyError: 'logits', on the model's output, " + fields):
        run(lambda out: out["logits"])
    got = run(lambda out: out["prediction_logits"])
    if call == "fisher":
        want = exact_fisher(nn.Sequential(model.lin), x, "categorical")
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
    else:
        assert got > 0


@pytest.mark.parametrize(("estimator", "kwargs", "message"), [
    ("exact", {"targets": True}, r"targets= is read only by estimator='empirical'; estimator='exact' uses"),
    ("score", {"targets": True}, r"targets= is read only by estimator='empirical'; estimator='score' uses"),
    ("exact", {"n_samples": 4}, r"n_samples=4 is ignored by estimator='exact', which draws no labels"),
    ("empirical", {"n_samples": 4, "targets": True}, r"n_samples=4 is ignored by estimator='empirical'"),
])
def test_an_argument_the_estimator_does_not_read_is_named_in_a_warning(estimator, kwargs, message, model):
    """Before, silently ignored (targets= with the default estimator looks like the empirical Fisher, and is
    not); the result is the one without the argument. Targets carried by (inputs, targets) pairs, as a
    DataLoader yields them for every estimator, do not warn."""
    x = mlp_inputs(6)
    y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(0))
    given = {k: (y if k == "targets" else v) for k, v in kwargs.items()}
    plain = {"targets": y} if estimator == "empirical" else {}
    with pytest.warns(RuntimeWarning, match=message):
        got = torchfim.fisher(model, x, estimator=estimator, generator=torch.Generator().manual_seed(1), **given)
    want = torchfim.fisher(model, x, estimator=estimator, generator=torch.Generator().manual_seed(1), **plain)
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchfim.fisher(model, [(x, y)], estimator="exact")


def test_dropout_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 3)).double()
    with pytest.raises(TorchfimError, match=r"Dropout.*model\.eval\(\)"):
        torchfim.fisher(model, mlp_inputs(4))


def test_rrelu_in_training_mode_is_named_as_random():
    """Before: refused as mixing samples (its random slopes differ between forwards)."""
    model = nn.Sequential(nn.Linear(3, 4), nn.RReLU(), nn.Linear(4, 3)).double()
    with pytest.raises(TorchfimError, match=r"'1' is an RReLU in training mode.*random.*model\.eval\(\)"):
        torchfim.fisher(model, mlp_inputs(4))
    model.eval()
    assert torch.allclose(torchfim.fisher(model, mlp_inputs(4), structure="full"),
                          exact_fisher(model, mlp_inputs(4), "categorical"), rtol=1e-10, atol=1e-13)


class MixesSamples(nn.Module):
    """Subtracts the batch mean: a forward that couples samples without BatchNorm."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3).double()

    def forward(self, x):
        h = self.linear(x)
        return h - h.mean(0, keepdim=True)


def test_generic_sample_mixing_is_caught():
    with pytest.raises(TorchfimError, match="depends on the other samples"):
        torchfim.fisher(MixesSamples(), mlp_inputs(4))


@pytest.mark.parametrize("inputs", [torch.zeros(0, 3, dtype=torch.float64), []])
def test_empty_inputs(model, inputs):
    with pytest.raises(TorchfimError, match="inputs is empty"):
        torchfim.fisher(model, inputs)


def test_bad_inputs_and_model(model):
    with pytest.raises(TorchfimError, match="must be a torch.nn.Module"):
        torchfim.fisher(lambda x: x, mlp_inputs(2))
    with pytest.raises(TorchfimError, match="iterable of mini-batches"):
        torchfim.fisher(model, 3.0)
    with pytest.raises(TorchfimError, match=r"got ndarray of shape \(4, 3\); pass torch.from_numpy\(inputs\)"):
        torchfim.fisher(model, mlp_inputs(4).numpy())
    dataset = torch.utils.data.TensorDataset(mlp_inputs(4))  # map-style: indexable, not iterable by contract
    with pytest.raises(TorchfimError, match=r"got TensorDataset: wrap the dataset in a DataLoader"):
        torchfim.fisher(model, dataset)
    with pytest.raises(TorchfimError, match="must be a torch.Tensor"):
        torchfim.fisher(model, [[1.0, 2.0, 3.0]])
    frozen = tanh_mlp(3).requires_grad_(False)
    with pytest.raises(TorchfimError, match="no parameters with requires_grad=True"):
        torchfim.fisher(frozen, mlp_inputs(2))
    with pytest.raises(TorchfimError, match=r"targets of shape \(2,\) have 2 rows for a mini-batch of 4 inputs"):
        torchfim.fisher(model, mlp_inputs(4), estimator="empirical", targets=torch.tensor([0, 1]))


class _FixedBatch(nn.Module):
    """A forward with the batch size written into it: it runs on 8 inputs only."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(3, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.inner(x)).view(8, 4))


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_a_forward_with_a_fixed_batch_size_is_named_with_the_fix(backend: str) -> None:
    """Before, the error came from inside the model's forward on the sub-batch torchfim checks."""
    model, x = _FixedBatch().double(), torch.randn(8, 3, dtype=torch.float64)
    model(x)  # the mini-batch itself runs
    with pytest.raises(TorchfimError, match=r"mini-batch of 8 inputs but failed on \d of them .*x.view\(x.shape\[0\], -1\)"):
        torchfim.fisher(model, x, structure="diag", backend=backend)


class _InnerDropout(nn.Module):
    """Layers whose dropout is an argument, not an nn.Dropout module (``kind``: "lstm" or "attention")."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.lstm = nn.LSTM(3, 4, num_layers=2, dropout=0.5, batch_first=True) if kind == "lstm" else None
        self.attn = nn.MultiheadAttention(3, 1, dropout=0.5, batch_first=True) if kind == "attention" else None
        self.head = nn.Linear(4 if kind == "lstm" else 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lstm(x)[0] if self.kind == "lstm" else self.attn(x, x, x, need_weights=False)[0]
        return self.head(h[:, -1])


@pytest.mark.parametrize(("kind", "name"), [("lstm", "'lstm' (LSTM)"), ("attention", "'attn' (MultiheadAttention)")])
def test_dropout_inside_a_recurrent_or_attention_layer_in_training_mode_is_named(kind: str, name: str) -> None:
    """Before, it was refused as a model whose samples mix (its outputs differ from call to call)."""
    model, x = _InnerDropout(kind).train(), torch.randn(6, 5, 3)
    with pytest.raises(TorchfimError, match=re.escape(name) + r" applies its own dropout \(dropout=0.5\) in training mode.*model.eval"):
        torchfim.fisher(model, x, structure="trace")
    assert torch.isfinite(torchfim.fisher(model.eval(), x, structure="trace"))


@pytest.mark.parametrize("compute", [
    lambda m, inputs: torchfim.fisher(m, inputs, structure="diag"),
    lambda m, inputs: torchfim.fisher_variance(m, inputs, structure="trace"),
    lambda m, inputs: torchfim.train.FisherTraceMonitor(m, inputs),
], ids=["fisher", "fisher_variance", "monitor"])
def test_a_tuple_of_inputs_and_targets_is_named_with_the_fix(compute) -> None:
    """Before, the targets ran through the model as a second mini-batch: "failed on integer inputs ... pass
    x.float()". Two mini-batches go in a list; a tuple of two alike with as many rows is refused too (an
    autoencoder's targets are its inputs' shape: Tr(F) 13.22 where it is 12.84, silently)."""
    model, x = tanh_mlp(3), mlp_inputs(6)
    with pytest.raises(TorchfimError, match=r"\(6, 3\) torch.float64 and \(6,\) torch.int64, that may be "
                                            r"\(inputs, targets\).*targets=y.*\[\(x, y\)\].*\[x1, x2\]"):
        compute(model, (x, torch.tensor([0, 1, 2, 0, 1, 2])))
    with pytest.raises(TorchfimError, match=r"\(3, 3\) torch.float64 and \(3, 3\) torch.float64, that may be "):
        compute(model, (x[:3], x[3:]))
    halves = torchfim.fisher(model, [x[:3], x[3:]], structure="diag")
    assert torch.allclose(halves, torchfim.fisher(model, x, structure="diag"), rtol=1e-12, atol=0)
    # beside targets of their own, two alike are mini-batches, not a pair
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    tupled = torchfim.fisher(model, (x[:3], x[3:]), estimator="empirical", targets=[y[:3], y[3:]], structure="diag")
    assert torch.allclose(tupled, torchfim.fisher(model, x, estimator="empirical", targets=y, structure="diag"),
                          rtol=1e-12, atol=0)


@pytest.mark.parametrize(("targets", "described"), [
    (torch.randn(6, 1, dtype=torch.float64), (r"\(6, 1\) torch.float64, that may be \(inputs, targets\) or two "
                                             r"mini-batches of the same size; ")),
    (torch.tensor([0, 1, 2, 0, 1, 2, 0]),
     (r"\(7,\) torch.int64, that looks like \(inputs, targets\) \(but with 6 and 7 rows: a pair needs one target per "
     r"input\); ")),
], ids=["regression", "seven-labels"])
@pytest.mark.parametrize("compute", [
    lambda m, inputs: torchfim.fisher(m, inputs, family="gaussian"),
    lambda m, inputs: torchfim.train.FisherTraceMonitor(m, inputs, family="gaussian"),
], ids=["fisher", "monitor"])
def test_a_tuple_of_inputs_and_regression_targets_or_of_unequal_length_is_named(targets, described, compute) -> None:
    """Float targets (6, 1) of a one-output regression ran through the model as a second mini-batch ("a layer does not
    take the shape it is given"), and 7 labels for 6 inputs as integer inputs ("pass x.float()"): both now get the
    tuple's message, with targets= named. Two mini-batches in a list are read as such."""
    model, x = tanh_mlp(1), mlp_inputs(6)
    with pytest.raises(TorchfimError, match=r"\(6, 3\) torch.float64 and " + described +
                                            r"a tuple or list is read as mini-batches.*targets=y.*\[\(x, y\)\]"):
        compute(model, (x, targets))
    halves = torchfim.fisher(model, [x[:3], x[3:]], family="gaussian", structure="diag")
    assert torch.allclose(halves, torchfim.fisher(model, x, family="gaussian", structure="diag"), rtol=1e-12, atol=0)
    # Images of two sizes with as many rows: a super-resolution pair, or two mini-batches of a model that pools them.
    # A tuple is refused; the list is two mini-batches.
    pooled = nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).double()
    small, large = torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.randn(6, 3, 12, 12, dtype=torch.float64)
    with pytest.raises(TorchfimError, match="that may be \\(inputs, targets\\) or two mini-batches"):
        torchfim.fisher(pooled, (small, large), structure="diag")
    both = torchfim.fisher(pooled, [small, large], structure="diag")
    want = (6 * torchfim.fisher(pooled, small, structure="diag") + 6 * torchfim.fisher(pooled, large, structure="diag"))
    assert torch.allclose(both, want / 12, rtol=1e-12, atol=0)


class _AssertsItsBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = tanh_mlp(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[0] == 6, "trained on batches of 6"
        return self.body(x)


def _exported_at_batch_size(x: torch.Tensor) -> nn.Module:
    return torch.export.export(tanh_mlp(3), (x,)).module()


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("build", [lambda x: _AssertsItsBatch(), _exported_at_batch_size], ids=["assert", "export"])
def test_a_batch_size_fixed_by_an_assert_or_an_export_is_named_with_the_fix(build, backend: str) -> None:
    """Before: the AssertionError from inside the forward (or torch.export's guard, "Guard failed:
    input.size()[0] == 6") on the sub-batch torchfim checks, with no word of what to do."""
    x = mlp_inputs(6)
    model = build(x)
    fix = r"dynamic_shapes=\(\{0: torch.export.Dim\('batch'\)\},\)" if isinstance(model, torch.fx.GraphModule) \
        else r"a batch size fixed in it"
    with pytest.raises(TorchfimError, match=rf"mini-batch of 6 inputs but failed on 2 of them .*{fix}"):
        torchfim.fisher(model, x, structure="diag", backend=backend)


class _PackedGRU(nn.Module):
    """A GRU classifier that packs its padded inputs itself: forward(x (B, T, 3), lengths (B,))."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

        packed = x if isinstance(x, PackedSequence) else pack_padded_sequence(x, lengths.cpu(), batch_first=True,
                                                                               enforce_sorted=False)
        return self.head(self.rnn(packed)[1][-1])


def test_a_packed_sequence_is_refused_and_the_padded_form_it_names_is_exact():
    """A PackedSequence iterates as its four fields, so it was read as mini-batches: its data (all time steps
    of all sequences) ran through the model as one batch, ending in a RecursionError. Every entry point now
    names the padded form; that form's Fisher is the per-sequence oracle's, each sequence unpadded."""
    from torch.nn.utils.rnn import pack_padded_sequence

    from torchfim import report as report_mod
    from torchfim.train import FisherPenalty, FisherTraceMonitor

    torch.manual_seed(0)
    model, x = _PackedGRU().double(), torch.randn(5, 6, 3, dtype=torch.float64)
    lengths = torch.tensor([6, 2, 4, 3, 5])
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    fix = r"a PackedSequence is not a mini-batch .* \{'x': padded, 'lengths': lengths\}"
    for call in (lambda: torchfim.fisher(model, packed), lambda: torchfim.fisher(model, [packed]),
                 lambda: FisherTraceMonitor(model, packed), lambda: FisherPenalty(model)(packed, step=0),
                 lambda: report_mod.as_data(packed, "test")):
        with pytest.raises(TorchfimError, match=fix):
            call()
    params, want = list(model.parameters()), 0
    for i in range(5):  # each sequence alone, unpadded: J by one backward per class
        o = model(x[i : i + 1, : lengths[i]], lengths[i : i + 1])[0]
        jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(o[c], params, retain_graph=True)])
                           for c in range(2)])
        p = torch.softmax(o.detach(), -1)
        want = want + torch.einsum("ap,ab,bp->p", jac, torch.diag(p) - torch.outer(p, p), jac) / 5
    with pytest.warns(RuntimeWarning, match="one sample at a time"):  # sequences of their own lengths
        got = torchfim.fisher(model, {"x": x, "lengths": lengths}, structure="diag")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


class _SummedOverBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).sum(0)


class _UnbatchedGRU(nn.Module):
    """nn.GRU reads a 2-D input as one sequence: inputs (B, features) without a time dim are one sample."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn, self.head = nn.GRU(3, 5), nn.Linear(5, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[1][-1])


@pytest.mark.parametrize("model", [_SummedOverBatch, _UnbatchedGRU])
def test_outputs_without_the_batch_dim_first_are_refused_with_the_cause(model):
    """Before: a size mismatch from inside torch (summed), a RecursionError (the GRU), and from the penalty a
    message about the number of logits (the outputs read as a batch of their own length)."""
    from torchfim.train import FisherPenalty, FisherTraceMonitor

    m, x = model().double(), torch.randn(6, 3, dtype=torch.float64)
    shape = "(4,)" if model is _SummedOverBatch else "(2,)"
    message = re.escape(f"outputs of shape {shape} for a mini-batch of 6 inputs") + ".*batch_first=True"
    calls = [lambda b=backend: torchfim.fisher(m, x, backend=b) for backend in ("auto", "functional")]
    calls += [lambda: FisherTraceMonitor(m, x).measure(0)]
    calls += [lambda k=kind, g=method: FisherPenalty(m, kind=k, grad_method=g)(x, step=0)
              for kind in ("batch_gradient", "trace") for method in ("exact", "finite_difference")]
    calls += [lambda g=method: FisherPenalty(m, grad_method=g).penalised_loss(x, lambda out: out.sum(), step=0)
              for method in ("exact", "finite_difference")]
    for call in calls:
        with pytest.raises(TorchfimError, match=message):
            call()



@pytest.mark.parametrize("said, refused", [
    ("Trying to use forward AD with _grouped_mm that does not support it", True),  # torch's words for a missing rule
    ("this model's own unfinished branch", False),
])
def test_only_a_missing_forward_rule_becomes_the_hessian_estimators_refusal(said: str, refused: bool):
    from torchfim.engine.backend import NoForwardDerivative, second_order_support

    with pytest.raises(NotImplementedError if not refused else NoForwardDerivative) as caught:
        with second_order_support():
            raise NotImplementedError(said)
    assert isinstance(caught.value, TorchfimError) == refused


def test_integer_options_take_numpy_and_tensor_integers_as_the_int_they_hold(tmp_path) -> None:
    """A step counter from np.arange or a 0-dim tensor, n_samples from a NumPy config: taken as the int they hold
    (kept as an int in records and state), while bools, floats and tensors of other shapes are still refused."""
    import numpy as np

    torch.manual_seed(0)
    model, x = tanh_mlp(3), mlp_inputs(8)
    gen = torch.Generator().manual_seed(1)
    reference = torchfim.fisher(model, x, estimator="score", n_samples=2, generator=gen)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(torchfim.fisher(model, x, estimator="score", n_samples=np.int64(2), generator=gen), reference)
    monitor = torchfim.train.FisherTraceMonitor(model, x, every=np.int32(2), subset=np.int64(4),
                                                csv_path=tmp_path / "trace.csv")
    record = monitor.step(torch.tensor(4))
    assert type(record.step) is int and record.step == 4 and monitor.every == 2 and type(monitor.subset) is int
    assert (tmp_path / "trace.csv").read_text().splitlines()[1].startswith("4,")
    penalty = torchfim.train.FisherPenalty(model, alpha=0.1, every=np.int64(3))
    penalty(x, step=np.int64(3))
    assert type(penalty.last_step) is int and penalty.every == 3
    gen = torch.Generator().manual_seed(1)  # a 0-dim array (np.asarray of a config value) holds one integer too
    assert torch.equal(torchfim.fisher(model, x, estimator="score", n_samples=np.array(2), generator=gen), reference)
    for bad in (True, 2.0, np.float64(2.0), torch.tensor([2]), torch.tensor(2.0), np.bool_(True), np.array(2.0),
                np.array([2])):
        with pytest.raises(torchfim.TorchfimError, match="n_samples must be a positive integer"):
            torchfim.fisher(model, x, estimator="score", n_samples=bad)
        with pytest.raises(torchfim.TorchfimError, match="step must be an integer"):
            monitor.step(bad)


def test_bernoulli_width_error_names_independent_binary_labels(model):
    """Several outputs under the Bernoulli family: categorical for exclusive classes, or (batch, T, 1) for T
    independent binary labels (the reading docs/models.md gives)."""
    with pytest.raises(TorchfimError, match=r"for 3 independent binary labels.*\(batch, 3, 1\)"):
        torchfim.fisher(model, mlp_inputs(4), family="bernoulli")


def test_a_positions_family_with_position_outputs_names_the_base_family_and_mask():
    """family=Positions(Bernoulli(), 3, mask) with (B, 3, 1) outputs: pass family='bernoulli', mask=... instead.
    Before: 'Positions needs a base Family instance … pass e.g. Positions(Categorical(), (seq_len,), mask)'."""
    from torchfim.families import Bernoulli, Positions

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 3), nn.Unflatten(1, (3, 1))).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    mask = torch.tensor([[True, True, False]] * 4)
    with pytest.raises(TorchfimError, match=r"family=Bernoulli\(\) \(or 'bernoulli'\) and mask=") as caught:
        torchfim.fisher(net, x, family=Positions(Bernoulli(), 3, mask), structure="trace")
    assert "Positions(Categorical()" not in str(caught.value)
    want = torchfim.fisher(net, x, family="bernoulli", mask=mask, structure="trace")
    flat = torchfim.fisher(net[0], x, family=Positions(Bernoulli(), 3, mask), structure="trace")
    assert torch.allclose(flat, want, rtol=1e-12, atol=0)


def test_matrix_fisher_outputs_as_a_matrix_are_told_to_reshape():
    """(B, 3, 3) outputs were read as 3 positions of 3 outputs ('expects 9 outputs … got 3')."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 9), nn.Unflatten(1, (3, 3))).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"read as 3 positions of 3 outputs; reshape them to \(batch, 9\)"):
        torchfim.fisher(net, x, family="matrix_fisher", structure="trace")
    assert torch.isfinite(torchfim.fisher(net[0], x, family="matrix_fisher", structure="trace"))


def test_matrix_fisher_at_positions_is_not_told_of_a_class_dim():
    """(B, 2, 2, 9): four matrices per input; no 'classes at 2×2 positions' warning (it has no classes)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 36), nn.Unflatten(1, (2, 2, 9))).double()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        value = torchfim.fisher(net, torch.randn(4, 3, dtype=torch.float64), family="matrix_fisher", structure="trace")
    assert torch.isfinite(value) and not [w for w in record if "classes last" in str(w.message)]


def test_the_empirical_fishers_zero_standard_errors_come_with_a_warning():
    """The empirical Fisher draws no labels: its standard errors are 0 while its error, a bias, was 14-42% in a
    downstream-uses trial. The zeros stay (no label noise), with a warning that says what they do not cover."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 4).double(), torch.randn(8, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    with pytest.warns(RuntimeWarning, match=r"standard errors are 0; they say nothing of its bias"):
        _, stderr = torchfim.fisher(model, x, estimator="empirical", targets=y, return_stderr=True)
    assert not bool(stderr.any())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torchfim.fisher(model, x, estimator="empirical", targets=y)
        torchfim.fisher(model, x, estimator="score", return_stderr=True)


def test_a_gamma_shape_that_underflows_is_named_with_the_smallest_outputs():
    """Log-shapes near −800 make the shape e^o exactly 0 in float64, and the label draw divides by it: the refusal
    blamed overflow and sent the user to the largest outputs (a statistics trial)."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 4).double()

    class LogShapes(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = lin

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            o = self.lin(x)
            return torch.cat([o[:, :2], o[:, 2:] - 800], -1)

    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.isfinite(torchfim.fisher(LogShapes(), x, family="gamma", structure="trace"))
    with pytest.raises(TorchfimError, match=r"gamma shape e\^o that underflows to 0.*the largest and the smallest"):
        torchfim.fisher(LogShapes(), x, family="gamma", estimator="score", structure="trace",
                        generator=torch.Generator().manual_seed(0))


def test_samples_needed_of_a_zero_fisher_names_the_mask_and_saturation():
    """Every position masked: the message blamed the model ("check the model"), where the mask leaves nothing."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning that no position is observed comes first
        with pytest.raises(TorchfimError, match=r"no position is observed \(a mask, or labels of -100, leaves out "
                                                r"every one.*or the outputs are saturated"):
            torchfim.samples_needed(model, torch.randn(3, 4, 3), mask=torch.zeros(3, 4, dtype=torch.bool))
