"""Mini-batches the model's forward cannot take as given, and outputs it gives in a form the estimators cannot
read, end in a TorchfimError naming the fix (issue 2, point 5): several inputs, tuples of inputs and targets,
empty inputs, batch sizes fixed by the forward (an assert, an export), packed sequences, structured outputs to
pick from, and outputs without the batch dim first.
"""

from __future__ import annotations

import re
import warnings

import error_fixtures
import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from oracles import exact_fisher
from torch import nn

import torchfim
import torchfim.train
from torchfim import TorchfimError

model = error_fixtures.model  # a fixture the tests take


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
