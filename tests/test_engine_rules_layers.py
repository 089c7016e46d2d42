"""The per-module backend's choice of rule per layer: the coverage check (which moves a parameter used outside its
module), convolutions, batch norm in eval mode, subclasses of the layers with a forward of their own, RMS norms
of their own class, and trainable parameters without entries; each rule against the functional backend.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from cases import CASES, Gate
from engine_checks import _assert_equals_functional, _rules
from torch import nn

import torchfim
from torchfim.engine import ModelView, batches
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules import conv as conv_module
from torchfim.engine.modules.conv import ConvRule
from torchfim.engine.modules.embedding import EmbeddingRule
from torchfim.engine.modules.linear import LinearRule
from torchfim.engine.modules.norm import BatchNormRule, NormRule
from torchfim.engine.per_module import PerModuleBackend


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_every_rule_of_the_oracle_cases_passes_the_coverage_check(case) -> None:
    """The engine moves a parameter whose rule's summed per-sample gradients miss the true gradient to
    the generic rule; the results stay right, so the oracle tests alone would not notice a wrong rule.
    On the cases every parameter keeps the rule its module was given (the GRU's too, whose final hidden
    state comes out as (layers, batch, hidden) whatever batch_first says)."""
    view = ModelView(case.build(3))
    backend = PerModuleBackend(view)
    before = {type(r).__name__ for r in backend.rules.values()}
    backend.record(next(batches(case.inputs(4), None, view.device, view.dtype)))
    assert backend.moved == {}
    assert {type(r).__name__ for r in backend.rules.values()} == before
    if case.name == "gru":
        assert "RecurrentRule" in before


class _TiedLM(nn.Module):
    """Output weights tied to the embedding: through an ``nn.Linear`` sharing the Parameter, or by
    ``F.linear(h, embed.weight)`` in the model's own forward (where no module hook sees that use)."""

    def __init__(self, through_module: bool) -> None:
        super().__init__()
        self.embed, self.mix = nn.Embedding(7, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False) if through_module else None
        if self.head is not None:
            self.head.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.mix(self.embed(tokens)))
        return self.head(h) if self.head is not None else nn.functional.linear(h, self.embed.weight)


@pytest.mark.parametrize("through_module", [False, True])
def test_a_parameter_used_outside_its_module_moves_with_one_warning_naming_it(through_module) -> None:
    """The coverage check moves ``embed.weight`` (used by F.linear in the model's forward) to the whole
    model's generic rule and says so once per model, naming the parameter and the fix; the tie
    through an ``nn.Linear`` keeps every rule and warns nothing. Both stay exact."""
    torch.manual_seed(0)
    model = _TiedLM(through_module).double()
    x = torch.randint(0, 7, (5, 3))
    kw = dict(structure="diag", generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as first:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, x, **kw)
    moved = [w for w in first if "do not add up" in str(w.message)]
    if through_module:
        assert moved == []
    else:
        assert len(moved) == 1 and moved[0].filename == __file__  # attributed to the caller's line
        text = str(moved[0].message)
        assert "embed.weight → the whole model" in text and "nn.Linear" in text and "mix.weight" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a second call on the same model: checked once
        again = torchfim.fisher(model, x, **kw)
    want = torchfim.fisher(model, x, backend="functional", **kw)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12) and torch.equal(got, again)


def test_one_custom_module_keeps_the_other_layers_on_their_rules() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(8, 4), Gate(4), nn.Linear(4, 3)).double()
    x = torch.randn(5, 1, 4, 4, dtype=torch.float64)
    rules = _rules(model, x)
    assert rules == {"0": ConvRule.__name__, "3": LinearRule.__name__, "4": GenericRule.__name__, "5": LinearRule.__name__}
    exact = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(torchfim.fisher(model, x, structure="diag"), exact, atol=1e-12)


class _Convs(nn.Module):
    """Convolutions with groups, dilation, stride, asymmetric and 'valid' padding (2-d and 1-d)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, (3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2)
        self.b = nn.Conv2d(4, 4, 2, padding="valid", groups=4, bias=False)
        self.c = nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2)
        self.head = nn.Linear(6, 6)  # the exact Fisher's 5 vectors: enough for the patches to be asked for

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        h = torch.tanh(self.c(h.flatten(2)))
        return self.head(h.mean(-1))


@pytest.mark.parametrize("estimator", ["exact", "score"])
def test_conv_rule_with_groups_dilation_stride_and_padding_equals_the_functional_backend(estimator: str) -> None:
    """The per-sample weight gradients (one grouped weight gradient per chunk) for every convolution option."""
    torch.manual_seed(7)
    model = _Convs().double()
    x = torch.randn(5, 2, 6, 5, dtype=torch.float64)
    rules = _rules(model, x)
    assert all(rules[n] == ConvRule.__name__ for n in ("a", "b", "c"))
    _assert_equals_functional(model, x, estimator, seed=8, atol=1e-13)


class _UngroupedConvs(nn.Module):
    """Convolutions without groups or dilation (their squares go through patches): stride, asymmetric
    and 'valid' padding, 2-d and 1-d."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2))
        self.b = nn.Conv2d(3, 3, 2, padding="valid", bias=False)
        self.c = nn.Conv1d(3, 4, 3, stride=2, padding=1)
        self.head = nn.Linear(4, 6)  # the exact Fisher's 5 vectors: enough to build patches

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        h = torch.tanh(self.c(h.flatten(2)))
        return self.head(h.mean(-1))


@pytest.mark.parametrize("patches", [True, False], ids=["patches", "grouped"])
@pytest.mark.parametrize("model_class", [_Convs, _UngroupedConvs])
def test_conv_squares_by_patches_or_grouped_gradients_equal_the_functional_backend(model_class, patches: bool,
                                                                                 monkeypatch) -> None:
    """The exact diagonal through either way of building the per-sample weight gradients; the patches
    are taken exactly where the layer has no groups or dilation (and they are small, and there are
    enough vectors)."""
    if not patches:
        monkeypatch.setattr(conv_module, "PATCH_ELEMENTS", 0)
    built: list[bool] = []
    own = ConvRule._patches

    def spy(rule: ConvRule, x: torch.Tensor) -> torch.Tensor | None:
        result = own(rule, x)
        built.append(result is not None)
        return result

    monkeypatch.setattr(ConvRule, "_patches", spy)
    torch.manual_seed(7)
    model = model_class().double()
    x = torch.randn(5, 2, 6, 5, dtype=torch.float64)
    _assert_equals_functional(model, x, "exact", seed=8, structures=("diag",), atol=1e-13)
    assert built == [patches and model_class is _UngroupedConvs] * 3


class _EvalBatchNorm(nn.Module):
    """A convolution, an eval-mode BatchNorm over ``dims`` spatial dims (none: ``(b, C)`` inputs), a head."""

    def __init__(self, dims: int, frozen: str | None, sync: bool = False) -> None:
        super().__init__()
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[max(dims, 1) - 1]
        norm = nn.SyncBatchNorm if sync else (nn.BatchNorm1d, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)[dims]
        self.conv, self.norm, self.head = conv(2, 3, 2), norm(3), nn.Linear(3, 4)
        self.dims = dims
        with torch.no_grad():
            self.norm.running_mean.uniform_(-1.0, 1.0)
            self.norm.running_var.uniform_(0.5, 2.0)
            self.norm.weight.uniform_(0.5, 1.5)
            self.norm.bias.uniform_(-0.5, 0.5)
        if frozen is not None:
            getattr(self.norm, frozen).requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.conv(x))
        h = self.norm(h.flatten(2).mean(-1) if self.dims == 0 else h)
        return self.head(torch.tanh(h).flatten(2).mean(-1) if self.dims else torch.tanh(h))


@pytest.mark.parametrize("dims", [0, 1, 2, 3])
@pytest.mark.parametrize("frozen", [None, "weight", "bias"])
@pytest.mark.parametrize("estimator", ["exact", "score"])
def test_eval_batch_norm_rule_equals_the_functional_backend(dims: int, frozen: str | None, estimator: str) -> None:
    """Eval-mode BatchNorm on (b, C) and on 1-3 spatial dims (the fused per-sample path), either affine
    part frozen, running statistics away from 0 and 1."""
    torch.manual_seed(11)
    model = _EvalBatchNorm(dims, frozen).double()
    x = torch.randn(5, 2, *(4,) * max(dims, 1), dtype=torch.float64)
    assert _rules(model, x)["norm"] == BatchNormRule.__name__
    _assert_equals_functional(model, x, estimator, seed=12, atol=1e-13)


@pytest.mark.parametrize("dims", [0, 2])
def test_eval_sync_batch_norm_takes_the_batch_norm_rule(dims: int) -> None:
    """``nn.SyncBatchNorm`` (``convert_sync_batchnorm``'s) normalises as BatchNorm does in eval mode; before,
    it went to the generic rule."""
    torch.manual_seed(11)
    model = _EvalBatchNorm(dims, None, sync=True).double()
    x = torch.randn(5, 2, *(4,) * max(dims, 1), dtype=torch.float64)
    assert _rules(model, x)["norm"] == BatchNormRule.__name__
    _assert_equals_functional(model, x, "exact", seed=12, atol=1e-13)


def test_eval_batch_norm_is_recorded_as_one_affine_map_with_the_module_output() -> None:
    """While the engine records, eval-mode BatchNorm runs as ``x ⊙ s + t``: the recorded output is the
    model's own (to rounding), the copy's forward is restored afterwards, and the parameters stay in
    the recorded graph (the engine's check of the summed per-sample gradients needs them)."""
    torch.manual_seed(13)
    model = _EvalBatchNorm(2, None).double()
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    view = ModelView(model)
    backend = PerModuleBackend(view)
    rec = backend.record(next(batches(x, None, view.device, view.dtype)))
    assert torch.allclose(rec.output.reshape(4, -1), model(x), rtol=1e-12, atol=1e-14)
    norm = dict(view.model.named_modules())["norm"]
    assert "forward" not in norm.__dict__
    weight_grad = torch.autograd.grad(rec.output.sum(), norm.weight)[0]
    assert torch.count_nonzero(weight_grad) == 3


def test_float32_batch_norm_inside_a_bfloat16_model_hands_on_the_model_dtype() -> None:
    """A BatchNorm kept in float32 inside a bfloat16 model returns bfloat16, as torch's batch norm does;
    the recorded affine map must too (the next layer refuses float32 inputs), and the Fisher stays
    close to the float64 one."""
    torch.manual_seed(14)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 3), nn.Flatten(),
                          nn.Linear(48, 4))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    x = torch.randn(5, 2, 8, 8)
    want = torchfim.fisher(copy.deepcopy(model).double(), x.double(), structure="diag")
    model.to(torch.bfloat16)
    model[1].float()
    got = torchfim.fisher(model, x.to(torch.bfloat16), structure="diag")
    assert got.dtype == torch.bfloat16
    assert float((got.double() - want).norm() / want.norm()) < 0.05


class _ScaledEmbedding(nn.Embedding):
    """A lookup scaled in its own forward (as Gemma's): the Embedding rule reads the scale off the call."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * 3.0


class _SquaredEmbedding(nn.Embedding):
    """A lookup squared in its own forward: the Embedding rule would miss the square."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).square()


class _PositionsFromMask(nn.Embedding):
    """Position ids computed from a float mask in its own forward (as OPT's): the Embedding rule, reading
    the mask as ids, fails inside torch."""

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return super().forward((mask.cumsum(1) - 1).long())


class _OwnLinear(nn.Linear):
    """A forward of its own that computes what ``nn.Linear``'s does (as Falcon's)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias


class _SameLinear(nn.Linear):
    """A subclass that keeps ``nn.Linear``'s forward."""


class _Subclasses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.position = _ScaledEmbedding(5, 3), _PositionsFromMask(4, 3)
        self.squared = _SquaredEmbedding(5, 3)
        self.mix, self.head = _OwnLinear(3, 3), _SameLinear(3, 4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.position(torch.ones(tokens.shape, dtype=torch.float64)) + self.squared(tokens)
        return self.head(torch.tanh(self.mix(h)))


def test_subclasses_with_a_forward_of_their_own_keep_their_rule_only_where_it_holds() -> None:
    """Their rule is on probation: the squared lookup's per-sample gradients miss and the mask-reading
    lookup's rule fails, so both get the generic rule of their own module (before: such a lookup went to
    the whole model with a warning, the other failed with torch's error); the scaled lookup (its scale
    read off the call) and the Linear that computes what ``nn.Linear`` does keep their rules."""
    torch.manual_seed(0)
    model = _Subclasses().double()
    x = torch.randint(0, 5, (4, 3), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert _rules(model, x) == {"embed": EmbeddingRule.__name__, "position": GenericRule.__name__,
                                    "squared": GenericRule.__name__, "mix": LinearRule.__name__,
                                    "head": LinearRule.__name__}
        _assert_equals_functional(model, x, "exact", seed=0)


class _LlamaRMSNorm(nn.Module):
    """An RMSNorm of its own class, as Llama's (without its float32 round trip): ``w ⊙ x/√(mean(x²) + eps)``;
    ``scale`` multiplies the weight first (a computation the norm rule does not follow)."""

    def __init__(self, d: int, scale: float = 1.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.3 + 1.0)
        self.variance_epsilon, self.scale = 1e-6, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)


class GemmaRMSNorm(nn.Module):
    """Gemma's form, ``(1 + w) ⊙ x̂``: the same gradient in ``w`` as Llama's, so the same rule."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.randn(d) * 0.3), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (1.0 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class ScaledRMSNorm(_LlamaRMSNorm):
    """``2w ⊙ x̂``: named like an RMSNorm, but its weight's gradient is twice the rule's."""

    def __init__(self, d: int) -> None:
        super().__init__(d, scale=2.0)


def test_rms_norms_of_their_own_class_get_the_norm_rule_where_it_holds() -> None:
    """Recognised by name, the rule on probation: Llama's and Gemma's forms keep the RMSNorm rule, a form
    with another gradient fails the coverage check and gets its generic rule, silently; all agree with the
    functional backend (before: all three generic)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), _LlamaRMSNorm(4), nn.Tanh(), nn.Linear(4, 4), GemmaRMSNorm(4),
                          nn.Tanh(), nn.Linear(4, 4), ScaledRMSNorm(4), nn.Linear(4, 3)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)  # positions too: the weight is shared over them
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        rules = _rules(model, x)
        _assert_equals_functional(model, x, "exact", seed=0)
    assert (rules["1"], rules["4"], rules["7"]) == (NormRule.__name__, NormRule.__name__, GenericRule.__name__)


def test_a_trainable_parameter_without_entries_is_refused_with_the_fix() -> None:
    """A size-0 trainable parameter reached a bare RuntimeError deep in the coverage check ("max(): Expected reduction
    dim"); it is refused at the start, and frozen it leaves the Fisher of the rest as it is."""

    class WithEmpty(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()
            self.empty = nn.Parameter(torch.zeros(0, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) + self.empty.sum()

    torch.manual_seed(0)
    model, x = WithEmpty(), torch.randn(12, 3, dtype=torch.float64)
    with pytest.raises(torchfim.TorchfimError, match=r"without entries \(size 0\): empty; .*\(p\.requires_grad_\(False\)\)"):
        torchfim.fisher(model, x)
    model.empty.requires_grad_(False)
    torch.testing.assert_close(torchfim.fisher(model, x, structure="full"),
                               torchfim.fisher(model.lin, x, structure="full"))
