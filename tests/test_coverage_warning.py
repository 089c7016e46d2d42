"""The coverage check's warning names the likely cause of each parameter it moves; the result stays exact."""

from __future__ import annotations

import dataclasses
import functools
import warnings

import clients
import pytest
import torch
from engine_checks import assert_quietly_equals_dense, module_rules
from torch import nn
from torch_versions import TORCH_VERSION

import torchfim
from torchfim.engine.coverage import CAUSES


class _Block(nn.Module):
    """Returns its hidden state and an output computed from it (as a tuple, a dict, a transformers ``ModelOutput``,
    or with ``h`` twice)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.w, self.kind = nn.Parameter(torch.randn(4, 4) * 0.5), kind

    def forward(self, x: torch.Tensor) -> object:
        h = torch.tanh(x @ self.w)
        out = torch.tanh(h @ self.w.T)
        if self.kind == "dict":
            return {"hidden": h, "out": out}
        if self.kind == "model-output":
            return _model_output_class()(hidden=h, out=out)
        return (h, h) if self.kind == "twice" else (h, out)


@functools.cache
def _model_output_class() -> type:
    """A transformers ``ModelOutput`` (a dict subclass whose items are also attributes) of two tensors."""
    transformers = clients.need("transformers")

    @dataclasses.dataclass
    class BlockOutput(transformers.utils.ModelOutput):
        hidden: torch.Tensor | None = None
        out: torch.Tensor | None = None

    return BlockOutput


class _TwoOutputs(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.block, self.head = _Block(kind), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = self.block(x)
        return self.head(torch.cat(list(outs.values()) if isinstance(outs, dict) else outs, -1))


class _TiedOutside(nn.Module):
    """An embedding whose weight the forward also uses directly (no module sees that use)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(torch.tanh(self.mix(self.embed(tokens))), self.embed.weight)


class _ReadOutsideOnSquareRows(nn.Module):
    """A Linear on ``(B, T, d)`` whose weight the forward also reads directly: with ``B = T`` its rows read either
    way, and it misses read as they came (a first try read them sequence first, then recursed without end)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(3, 3), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((torch.tanh(self.lin(x)) @ self.lin.weight).mean(1))


@pytest.mark.parametrize(
    ("build", "inputs", "moved", "cause"),
    [(_TiedOutside, lambda: torch.randint(0, 7, (5, 3)), "embed.weight", "outside"),
     (_ReadOutsideOnSquareRows, lambda: torch.randn(2, 2, 3, dtype=torch.float64), "lin.weight", "outside")],
    ids=["used-outside-its-module", "read-outside-on-rows-read-either-way"],
)
def test_the_moved_parameter_is_named_with_its_likely_cause_and_stays_exact(build, inputs, moved: str,
                                                                           cause: str) -> None:
    torch.manual_seed(0)
    model, x = build().double(), inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure="diag")
    texts = [str(w.message) for w in caught if "do not add up" in str(w.message)]
    assert len(texts) == 1
    assert f"{moved} → the whole model" in texts[0] and f"{moved}: {CAUSES[cause]}" in texts[0]
    assert all(CAUSES[other] not in texts[0] for other in CAUSES if other != cause)
    want = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("kind", ["tuple", "dict", "model-output", "twice"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_module_returning_outputs_computed_one_from_another_keeps_its_rule(kind: str, structure: str) -> None:
    """Each output's sensitivity is that of its uses outside the module alone (the taps are views of the
    outputs), so the block's generic rule does not count the paths from ``h`` through ``out`` (or through
    ``h``'s second copy) twice: nothing moves, and the Fisher is the dense oracle's. Before, ``block.w``
    missed and went to the whole model."""
    torch.manual_seed(0)
    model, x = _TwoOutputs(kind).double(), torch.randn(6, 4, dtype=torch.float64)
    backend, rules = assert_quietly_equals_dense(model, x, structure)
    assert type(rules["block"]).__name__ == "GenericRule" and not backend.moved


class _OutsideInBlock(nn.Module):
    """A Linear whose weight the block also uses directly; the block has a parameter of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.scale = nn.Linear(4, 4), nn.Parameter(torch.tensor(1.5))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.tanh(self.lin(x) + 0.3 * x @ self.lin.weight.T)
        return h, torch.tanh(h * self.scale)


class _BlockAbove(nn.Module):
    """With ``above``, the model uses the Linear's weight directly too, outside the block."""

    def __init__(self, above: bool) -> None:
        super().__init__()
        self.block, self.head, self.above = _OutsideInBlock(), nn.Linear(8, 3), above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.head(torch.cat(self.block(x), -1))
        return out + (x @ self.block.lin.weight.T)[:, :3] if self.above else out


@pytest.mark.parametrize(("above", "holder"), [(False, "block"), (True, "the whole model")],
                         ids=["block-suffices", "block-misses-too"])
@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_moved_parameter_goes_on_up_while_the_module_above_misses_it_too(above: bool, holder: str,
                                                                          structure: str) -> None:
    # The block's generic rule covers the uses inside the block; one in the model's own forward is the
    # whole model's.
    torch.manual_seed(0)
    model, x = _BlockAbove(above).double(), torch.randn(6, 4, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure=structure)
    texts = [str(w.message) for w in caught if "do not add up" in str(w.message)]
    assert len(texts) == 1 and f"block.lin.weight → {holder}" in texts[0]
    assert "block.scale" not in texts[0]  # the block's own parameter stays with the block
    want = torchfim.fisher(model, x, structure=structure, backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


class _Pair(tuple):
    """A tuple subclass whose constructor takes its two items apart (it cannot be rebuilt from one iterable)."""

    def __new__(cls, first: torch.Tensor, second: torch.Tensor) -> _Pair:
        return super().__new__(cls, (first, second))


class _PairBlock(_Block):
    def forward(self, x: torch.Tensor) -> _Pair:
        return _Pair(*super().forward(x))


def test_an_output_container_that_cannot_be_rebuilt_keeps_its_tensors_and_the_result_stays_exact() -> None:
    """Its outputs are not replaced by views; the check finds the paths counted twice, the block's parameter goes
    above with the container named as the cause, and the result stays exact."""
    torch.manual_seed(0)
    model, x = _TwoOutputs("tuple").double(), torch.randn(6, 4, dtype=torch.float64)
    model.block.__class__ = _PairBlock
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, structure="diag")
    texts = [str(w.message) for w in caught if "do not add up" in str(w.message)]
    assert len(texts) == 1 and f"block.w: {CAUSES['container']}" in texts[0]
    want = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("first_frozen", [True, False], ids=["unfrozen-after-the-check", "frozen-after-the-check"])
def test_a_tied_weight_frozen_or_unfrozen_after_the_check_is_checked_again(first_frozen: bool) -> None:
    """The check's result is kept per model; θ is the parameters that require gradients. Before, unfreezing
    the tied weight after a call that checked the model without it kept a coverage that missed its use
    outside its module (16.7 % off, silently), and freezing it after a call that moved it raised a KeyError
    from inside the engine. Oracle: the functional backend on the same model, θ as it is then."""
    torch.manual_seed(0)
    model, x = _TiedOutside().double(), torch.randint(0, 7, (5, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the move's, tested above
        model.embed.weight.requires_grad_(not first_frozen)
        torchfim.fisher(model, x, structure="diag")
        model.embed.weight.requires_grad_(first_frozen)
        got = torchfim.fisher(model, x, structure="diag")
    want = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert got.shape == want.shape == (sum(p.numel() for p in model.parameters() if p.requires_grad),)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)


def test_parameters_of_modules_never_called_are_named_as_such_and_stay_exact() -> None:
    """A program from ``torch.export`` inlines its modules: no rule sees a use of their parameters, which go
    to the whole model's generic rule. Before, the warning blamed "a use outside their module's forward"
    (tied weights) for every one of them."""
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double(), torch.randn(6, 3)
    x = x.double()
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},)).module()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(exported, x, structure="diag")
    want = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-13)
    if TORCH_VERSION < (2, 3):
        assert not list(exported.children())
        pytest.skip("torch 2.2's export puts every parameter on the program itself: no module is left uncalled")
    texts = [str(w.message) for w in caught if "do not add up" in str(w.message)]
    assert len(texts) == 1 and CAUSES["uncalled"] in texts[0] and CAUSES["outside"] not in texts[0]


class _ForceField(nn.Module):
    """Forces ``−∂E/∂x`` of an energy MLP: the forward differentiates through the layers' parameters itself."""

    def __init__(self) -> None:
        super().__init__()
        self.energy = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x if x.requires_grad else x.requires_grad_(True)
            (force,) = torch.autograd.grad(self.energy(x).sum(), x, create_graph=True)
        return -force


def test_a_forward_that_differentiates_itself_is_exact_and_named():
    """A force field's outputs depend on the weights through a backward pass of the forward's own, which no
    module rule sees: the coverage check moves them to the generic rule, the warning says so, and the Gaussian
    Fisher is the brute-force ``(1/n) Σᵢ Jᵢᵀ Jᵢ`` (the last bias does not reach the forces: zero)."""
    torch.manual_seed(0)
    model, x = _ForceField().double(), torch.randn(6, 3, dtype=torch.float64)
    params, want = list(model.parameters()), 0
    for i in range(len(x)):
        out = model(x[i : i + 1].clone())[0]
        rows = []
        for c in range(3):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for g, p in zip(grads, params)]))
        jac = torch.stack(rows)
        want = want + (jac * jac).sum(0) / len(x)
    with pytest.warns(RuntimeWarning, match="one sample at a time"), \
            pytest.warns(RuntimeWarning, match="the forward differentiates through them itself"):
        got = torchfim.fisher(model, x, family="gaussian", structure="diag")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14) and float(got[-1]) == 0.0


class _KeyBiasAttention(nn.Module):
    """Self-attention with its own key projection: its bias shifts every score of a query alike, which softmax
    ignores, so its gradient is exactly zero (rounding noise in any computation of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.query, self.key, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        weights = torch.softmax(self.query(h) @ self.key(h).transpose(1, 2), -1)
        return self.head((weights @ h).mean(1))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_parameter_whose_gradient_is_zero_alone_trainable_keeps_its_rule_quietly(dtype: torch.dtype) -> None:
    """With the key bias alone trainable (the report's per-layer passes), the check had no other gradient to scale
    its tolerance by and compared two computations of rounding noise: it moved the bias to the whole model's
    generic rule with a warning that the rules "do not add up", blaming a read through a name outside the model."""
    torch.manual_seed(0)
    model, x = _KeyBiasAttention().to(dtype), torch.randn(4, 5, 3, dtype=dtype)
    for name, p in model.named_parameters():
        p.requires_grad_(name == "key.bias")
    if dtype == torch.float64:
        backend, _ = assert_quietly_equals_dense(model, x, "diag")
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = torchfim.fisher(model, x, structure="diag")
        assert float(got.abs().max()) < 1e-12  # rounding noise squared (float32: ε² ≈ 1.4e-14)
        backend, _ = module_rules(model, x)
    assert not backend.moved
