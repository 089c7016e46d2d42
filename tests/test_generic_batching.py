"""Modules that torch.func batches to wrong numbers, PReLU's rule, and attention the generic rule covers.

The per-module backend checks on the first batch that the summed per-sample gradients equal autograd's
batch gradient. A generic rule that misses there may be a module whose parameters are used elsewhere
(they move to a module above) or one whose torch.func products are wrong (a batching rule of torch):
that one is computed one sample at a time instead, with one warning, and the rest of the model keeps
its rules. The oracle is the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of :mod:`oracles`.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from engine_checks import assert_equals_dense, module_rules, torchfim_messages
from oracles import exact_fisher, variance_oracle
from torch import nn

import torchfim
from torchfim import TorchfimError
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.attention import AttentionRule
from torchfim.engine.modules.prelu import PReLURule


class _OwnPReLU(nn.Module):
    """A PReLU of its own class (no rule): the generic rule covers it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.slope = nn.Parameter(torch.linspace(0.1, 0.4, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x, self.slope)


class _Net(nn.Module):
    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.inner, self.act, self.head = nn.Linear(3, 4), act, nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.inner(x)))


class _ConvNet(nn.Module):
    def __init__(self, slopes: int) -> None:
        super().__init__()
        self.conv, self.act, self.head = nn.Conv2d(1, 2, 2), nn.PReLU(slopes, init=0.3), nn.Linear(2 * 3 * 3, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.conv(x)).flatten(1))


def _diag_warnings(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag = torchfim.fisher(model, x, structure="diag")
    return diag, torchfim_messages(caught)


def test_a_generic_rule_whose_batched_products_are_wrong_loops_over_samples_and_keeps_its_place(monkeypatch) -> None:
    """torch.func products made wrong on purpose (scaled by 1.5): the module loops, with one warning naming
    it, the Linear layers keep their rules, nothing moves to the module above, and the Fisher is exact."""
    wrong = GenericRule._vmapped
    monkeypatch.setattr(GenericRule, "_vmapped", lambda self, *a: {i: 1.5 * g for i, g in wrong(self, *a).items()})
    torch.manual_seed(0)
    model, x = _Net(_OwnPReLU(4)).double(), torch.randn(6, 3, dtype=torch.float64)
    diag, caught = _diag_warnings(model, x)
    assert len(caught) == 1 and "'act' (_OwnPReLU)" in caught[0] and "one sample at a time" in caught[0]
    assert torch.allclose(diag, torch.diagonal(exact_fisher(model, x, "categorical")), rtol=1e-10, atol=1e-14)
    backend, rules = module_rules(model, x)
    assert not backend.moved and rules["act"].unbatchable
    assert type(rules["inner"]).__name__ == type(rules["head"]).__name__ == "LinearRule"
    _, again = _diag_warnings(model, x)
    assert again == []  # the check's outcome is kept per model


def test_a_generic_rule_with_right_batched_products_is_not_looped() -> None:
    """The same module without the spy: torch.func is right or cannot batch it (torch 2.13 cannot, under
    nested vmap); either way the Fisher is exact and nothing moves."""
    torch.manual_seed(0)
    model, x = _Net(_OwnPReLU(4)).double(), torch.randn(6, 3, dtype=torch.float64)
    diag, _ = _diag_warnings(model, x)
    assert torch.allclose(diag, torch.diagonal(exact_fisher(model, x, "categorical")), rtol=1e-10, atol=1e-14)
    backend, _ = module_rules(model, x)
    assert not backend.moved


class _SizedScale(nn.Module):
    """A raw scale applied to an input reshaped to a ``torch.Size`` passed beside it (as BEiT's layers take
    the image's ``resolution``)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        return (self.scale * x).reshape(x.shape[0], *shape)


class _SizedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.sized, self.head = nn.Linear(3, 4), _SizedScale(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.sized(self.inner(x), torch.Size([2, 2])).flatten(1)))


def test_a_generic_module_given_a_torch_size_is_batched_and_exact() -> None:
    """A ``torch.Size`` argument is a tuple holding no tensor: no batch dim to split (it was read as a
    nested argument, and the module failed both batched and one sample at a time)."""
    torch.manual_seed(0)
    model, x = _SizedNet().double(), torch.randn(6, 3, dtype=torch.float64)
    diag, caught = _diag_warnings(model, x)
    assert caught == []
    assert torch.allclose(diag, torch.diagonal(exact_fisher(model, x, "categorical")), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("slopes", "conv"), [(1, True), (2, True), (1, False), (4, False)])
@pytest.mark.parametrize("structure", ["diag", "blocks"])
def test_prelu_rule_equals_the_dense_oracle(slopes: int, conv: bool, structure: str) -> None:
    """nn.PReLU with one slope or one per channel, after a convolution (channels and positions) or a
    Linear layer (channels only): its own rule, no warning, exact."""
    torch.manual_seed(0)
    if conv:
        model, x = _ConvNet(slopes).double(), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    else:
        model, x = _Net(nn.PReLU(slopes, init=0.3)).double(), torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure=structure)
    assert torchfim_messages(caught) == []
    assert_equals_dense(got, exact_fisher(model, x, "categorical"), model, structure)
    assert isinstance(module_rules(model, x)[1]["act"], PReLURule)


def test_functional_backend_names_prelu_when_it_cannot_batch_it() -> None:
    """torch.func's batching of nn.PReLU fails inside torch (its weight broadcast against the batch); the refusal
    says so by name and points to the per-module backend, whose rule computes it."""
    model, x = _Net(nn.PReLU(4, init=0.3)).double(), torch.randn(5, 3, dtype=torch.float64)
    try:
        torchfim.fisher(model, x, structure="diag", backend="functional")
    except TorchfimError as err:
        assert "no working batching rule for its nn.PReLU" in str(err) and "backend='auto'" in str(err)
    else:  # a torch whose batching rule works: then the functional backend is right
        assert_equals_dense(torchfim.fisher(model, x, structure="diag", backend="functional"),
                            exact_fisher(model, x, "categorical"), model, "diag")


class _KeyValueDims(nn.Module):
    """Attention with other key and value widths (separate q/k/v projections)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 8)
        self.attend = nn.MultiheadAttention(8, 2, kdim=5, vdim=6, batch_first=True)
        self.keys, self.values, self.head = nn.Linear(8, 5), nn.Linear(8, 6), nn.Linear(8, 3)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        return self.head(self.attend(h, self.keys(h), self.values(h))[0].mean(1))


def test_attention_of_other_key_widths_takes_its_out_projection_without_a_move() -> None:
    """Before, out_proj got a Linear rule that MultiheadAttention never calls: the check moved its
    parameters, with a warning blaming a use outside their module. The attention's rule covers it (the generic
    rule did, before separate projections had the attention rule)."""
    torch.manual_seed(0)
    model, x = _KeyValueDims().double(), torch.randint(0, 7, (5, 3))
    diag, caught = _diag_warnings(model, x)
    assert caught == []
    assert torch.allclose(diag, torch.diagonal(exact_fisher(model, x, "categorical")), rtol=1e-10, atol=1e-14)
    backend, rules = module_rules(model, x)
    assert not backend.moved and "attend.out_proj" not in rules
    assert isinstance(rules["attend"], AttentionRule) and {"out_proj.weight", "q_proj_weight"} <= set(rules["attend"].params)


class _ReturnsItsInput(nn.Module):
    """``(s ⊙ x, x)``, with a branch on the data that torch.func cannot batch (so one sample at a time), and its
    input among its outputs, as a Hugging Face encoder returns the hidden states it was given: on one sample,
    that output does not depend on the parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 4))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = self.scale * x if bool(x.sum() > -1e9) else x
        return scaled, x


class _UsesBoth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner, self.block, self.head = nn.Linear(3, 4), _ReturnsItsInput(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scaled, same = self.block(torch.tanh(self.inner(x)))
        return self.head(scaled + same**2)


def test_a_module_looped_one_sample_at_a_time_that_returns_its_input_equals_the_dense_oracle() -> None:
    """(Before: autograd refused the output that does not depend on the parameters, "element 1 of tensors
    does not require grad", from inside the rule; DeBERTa's encoder failed so.)"""
    torch.manual_seed(0)
    model, x = _UsesBoth().double(), torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure="layers")
    assert_equals_dense(got, exact_fisher(model, x, "categorical"), model, "layers")
    assert any("cannot batch module 'block'" in m for m in torchfim_messages(caught))  # it went one at a time


class _RowGate(nn.Module):
    """Gates each row of the flattened tokens ``(B·T, d)`` by a weight given per row ``(B·T, 1)``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 4) * 0.5)

    def forward(self, rows: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        return torch.tanh(rows @ self.weight) * gates


class _Routed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.score, self.gate, self.head = nn.Embedding(7, 4), nn.Linear(4, 1), _RowGate(), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        rows = h.reshape(-1, 4)
        return self.head(self.gate(rows, torch.sigmoid(self.score(rows))).view_as(h).mean(1))


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_generic_module_read_folded_cuts_its_other_inputs_with_as_many_rows_by_sample(structure: str) -> None:
    """A generic call whose first input is read folded, ``(B·T, d)`` as ``(B, T, d)``, also reads its other
    inputs that lead with ``B·T`` rows (a router's weights for those rows) by sample: it keeps its own rule,
    nothing moves, and the Fisher is the dense oracle's. Before, they went whole to each sample's run and the
    module's parameters went to the whole model."""
    torch.manual_seed(0)
    model, ids = _Routed().double(), torch.randint(0, 7, (3, 5), generator=torch.Generator().manual_seed(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torchfim.fisher(model, ids, structure=structure)
    assert_equals_dense(got, exact_fisher(model, ids, "categorical"), model, structure)
    backend, rules = module_rules(model, ids)
    assert isinstance(rules["gate"], GenericRule) and not backend.moved and backend.layout_of


class _SelfAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.attention, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.attention(x, x, x, need_weights=False)[0].mean(1))


@pytest.mark.parametrize("compute", [
    lambda m, x: torchfim.fisher(m, x, structure="diag", backend="functional"),
    lambda m, x: torchfim.train.FisherPenalty(m, kind="trace", grad_method="finite_difference")(x, step=0).backward(),
], ids=["functional-backend", "finite-difference-trace-penalty"])
def test_vmapped_attention_runs_the_math_kernel_without_torchs_fallback_warning(compute) -> None:
    """Under ``vmap`` the fused CPU attention kernel has no batching rule: torch ran it sample by sample
    with a warning ("There is a performance drop ... batching rule for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward. Please file us an issue") at every call of
    these two paths. They now pick the math kernel, as the per-module rules do; the values are those of the
    oracle (the functional backend's against the dense Fisher)."""
    model, x = _SelfAttention().double().eval(), torch.randn(4, 3, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = compute(model, x)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    if got is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the oracle's own jacrev through the fused kernel
            want = exact_fisher(model, x, "categorical").diagonal()
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


class _BagAndBilinear(nn.Module):
    """An ``EmbeddingBag`` and an ``nn.Bilinear``: operations that ``vmap`` runs sample by sample (no batching
    rule for ``_embedding_bag`` or ``_trilinear``), exactly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.bag, self.mix, self.head = nn.EmbeddingBag(7, 4, mode="max"), nn.Bilinear(4, 4, 4), nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.bag(ids)
        return self.head(torch.tanh(self.mix(h, h)))


@pytest.mark.parametrize("compute", [
    lambda m, x: torchfim.fisher(m, x, structure="diag"),
    lambda m, x: torchfim.fisher(m, x, structure="diag", backend="functional"),
    lambda m, x: torchfim.train.FisherPenalty(m, kind="trace", grad_method="finite_difference")(x, step=0).backward(),
], ids=["modules-backend", "functional-backend", "trace-penalty"])
def test_torchs_notice_of_vmaps_exact_fallback_is_off_inside_torchfim_only(compute) -> None:
    """torch warned "There is a performance drop because we have not yet implemented the batching rule for
    aten::_embedding_bag. Please file us an issue on GitHub" wherever torchfim's generic rules or torch.func
    paths met such an operation (by design: the fallback is exact). Off while torchfim computes; on again
    after (a fallback outside torchfim still warns)."""
    model, ids = _BagAndBilinear().double(), torch.randint(0, 7, (5, 3), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute(model, ids)
    assert not [w for w in caught if "batching rule" in str(w.message)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.func.vmap(lambda i: model.bag(i.unsqueeze(0)))(ids)
    assert [w for w in caught if "batching rule" in str(w.message)]


class _Distances(nn.Module):
    """Minus the distances to 3 learned centres, by ``torch.cdist`` (``written_out``: the same numbers by hand), whose
    backward's batching rule over output vectors gives wrong numbers in torch 2.13 (146% off against a loop)."""

    def __init__(self, written_out: bool = False) -> None:
        super().__init__()
        self.features, self.centres = nn.Linear(3, 3), nn.Parameter(torch.randn(3, 3))
        self.written_out = written_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        if self.written_out:
            return -(h.unsqueeze(-2) - self.centres).square().sum(-1).sqrt()
        return -torch.cdist(h, self.centres)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_a_batching_rule_that_is_wrong_over_output_vectors_is_found(n: int) -> None:
    """``torch.cdist`` anywhere in the forward: both backends were 7-70% off at any batch size, silently (a review):
    the coverage check pulled back one output vector alone, which runs no batching rule over vectors. Now it takes two,
    the auto backend computes the module one sample and vector at a time, and the functional one refuses. The oracle
    is the same model with the distances written out (torch.func's own Jacobians of cdist are wrong too)."""
    torch.manual_seed(0)
    model = _Distances().double()
    twin = _Distances(written_out=True).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(n, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(model(x), twin(x), rtol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the module computed one sample at a time is named
        got = torchfim.fisher(model, x, structure="diag")
    want = torchfim.fisher(twin, x, structure="diag")
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    with pytest.raises(TorchfimError, match="torch.func's per-sample gradients of this model differ from autograd's"):
        torchfim.fisher(model, x, structure="diag", backend="functional")


def test_the_functional_backend_refuses_prelu_on_two_inputs_too() -> None:
    """On two inputs torch.func batched nn.PReLU without an error, 9% off (three or more raised inside torch)."""
    model, x = _Net(nn.PReLU(4, init=0.3)).double(), torch.randn(2, 3, dtype=torch.float64)
    with pytest.raises(TorchfimError, match="no working batching rule for its nn.PReLU.*backend='auto'"):
        torchfim.fisher(model, x, structure="diag", backend="functional")
    assert_equals_dense(torchfim.fisher(model, x, structure="diag"), exact_fisher(model, x, "categorical"), model,
                        "diag")


def test_output_vectors_go_back_one_at_a_time_where_their_batched_backward_differs(monkeypatch) -> None:
    """Where the check finds torch's batched backward of several vectors unlike one backward per vector (no op of
    torch 2.13 known here does it: the check's finding is simulated), every later pull-back of several vectors goes
    one backward each, with a warning, and the Fisher is the dense oracle's."""
    from torchfim.engine import coverage_check, pullback

    calls = []
    real = pullback.pull_back

    def spied(*args, **kwargs):
        calls.append(kwargs.get("one_by_one", args[5] if len(args) > 5 else False))
        return real(*args, **kwargs)

    monkeypatch.setattr(coverage_check, "pulls_back_alike", lambda *a: False)
    monkeypatch.setattr("torchfim.engine.per_module.pull_back", spied)
    torch.manual_seed(0)
    model, x = _Net(nn.Tanh()).double(), torch.randn(5, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="pulled back one at a time"):
        got = torchfim.fisher(model, x, structure="diag")
    assert calls and all(calls)
    assert_equals_dense(got, exact_fisher(model, x, "categorical"), model, "diag")


def test_the_functional_backends_batching_check_runs_once_per_model(monkeypatch) -> None:
    """It ran at every call (a loop of calls on one input each took twice as long, in a review); now once per model
    and number of inputs (one, then two), as the coverage check."""
    from torchfim.engine.functional import FunctionalBackend

    checks = []
    original = FunctionalBackend._refuse_wrong_batching
    monkeypatch.setattr(FunctionalBackend, "_refuse_wrong_batching",
                        lambda self, rec: checks.append(rec.batch.size) or original(self, rec))
    model = _Net(nn.Tanh()).double()
    for n in (1, 1, 3, 3, 1):
        torchfim.fisher(model, torch.randn(n, 3, dtype=torch.float64), backend="functional")
    assert checks == [1, 3]


class _WrittenPReLU(nn.Module):
    """``nn.PReLU`` written out elementwise: no batching rule of PReLU's in the oracle's derivatives."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 0, x, self.weight * x)


@pytest.mark.parametrize("backend", ["auto", "functional"])
def test_the_second_order_paths_through_prelu_equal_the_oracle_of_its_written_out_twin(backend: str) -> None:
    """The Hessian estimator's closed-form variance (output Hessians by forward over reverse, batched over directions
    and samples) through torch's PReLU, whose per-sample gradients torch.func batches wrongly in torch 2.13, equals the
    dense oracle of the same network with PReLU written out."""
    torch.manual_seed(0)
    model, twin = _Net(nn.PReLU(4, init=0.3)).double(), _Net(_WrittenPReLU(4)).double()
    twin.load_state_dict(model.state_dict())
    x = torch.randn(5, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func cannot batch the output Hessians over samples: one at a time
        got = torchfim.fisher_variance(model, x, estimator="hessian", structure="full", backend=backend)
    want = variance_oracle(twin, x, "categorical", 1)["hessian"]
    assert float(want.abs().max()) > 1e-3  # the cross terms of the slopes with the head (the diagonal is zero)
    assert torch.allclose(torch.as_tensor(got), want, rtol=1e-10, atol=1e-14)
