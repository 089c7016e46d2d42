"""The per-module backend's choices, positions with masks, and output adapters."""

from __future__ import annotations

import copy
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from cases import BY_NAME, CASES, Gate, TokenModel
from engine_checks import module_rules
from torch import nn

import torchfim
from torchfim.engine import ModelView, batches
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules import conv as conv_module
from torchfim.engine.modules.attention import AttentionRule
from torchfim.engine.modules.conv import ConvRule
from torchfim.engine.modules.embedding import EmbeddingRule
from torchfim.engine.modules.linear import LinearRule
from torchfim.engine.modules.norm import BatchNormRule, NormRule
from torchfim.engine.per_module import PerModuleBackend


def _rules(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    return {path: type(rule).__name__ for path, rule in module_rules(model, x)[1].items()}


def _assert_equals_functional(model: nn.Module, x: torch.Tensor, estimator: str, seed: int,
                              structures: tuple[str, ...] = ("diag", "blocks"), atol: float = 1e-12) -> None:
    """The per-module backend's Fisher equals the functional backend's (same labels) to 1e-10."""
    for structure in structures:
        kw = dict(estimator=estimator, structure=structure, generator=torch.Generator().manual_seed(seed))
        got = torchfim.fisher(model, x, **kw)
        kw["generator"] = torch.Generator().manual_seed(seed)
        want = torchfim.fisher(model, x, backend="functional", **kw)
        if structure == "diag":
            assert torch.allclose(got, want, rtol=1e-10, atol=atol)
        else:
            assert all(torch.allclose(got[k], want[k], rtol=1e-10, atol=atol) for k in want)


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


def test_attention_has_its_own_rule_covering_its_out_projection() -> None:
    case = BY_NAME["encoder"]
    rules = _rules(case.build(3), case.inputs(3))
    assert rules["layer.self_attn"] == AttentionRule.__name__
    assert "layer.self_attn.out_proj" not in rules  # its parameters are used by the attention's forward
    assert rules["layer.linear1"] == LinearRule.__name__


class _Attend(nn.Module):
    """Multi-head attention over inputs (B, L, 4) with the masks and layouts of one test case."""

    def __init__(self, batch_first: bool, cross: bool, mask: str, bias: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first, bias=bias)
        self.batch_first, self.cross, self.mask = batch_first, cross, mask
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length = x.shape[0], x.shape[1]
        q = x if self.batch_first else x.transpose(0, 1)
        kv = (q.flip(-1) * 0.5) if self.cross else q
        kwargs: dict = {"need_weights": self.mask == "weights"}
        causal = torch.triu(torch.ones(length, length, dtype=torch.bool), 1)
        if self.mask == "causal":
            kwargs.update(attn_mask=causal, is_causal=True)
        elif self.mask == "additive3d":
            score = x[:, :, :1] - x[:, :, :1].transpose(1, 2)  # one additive mask per sample and head
            kwargs["attn_mask"] = torch.stack([score, -2 * score], 1).reshape(b * 2, length, length)
        elif self.mask == "padding":
            pad = (x[:, :, 0] > 0.3) & (torch.arange(length) > 0)  # never the first key, so no row is all masked
            kwargs.update(key_padding_mask=pad, attn_mask=causal.to(x.dtype) * -3.0)
        z = self.attn(q, kv, kv, **kwargs)[0]
        z = z if self.batch_first else z.transpose(0, 1)
        return self.head(z.tanh().mean(1))


@pytest.mark.parametrize(
    "batch_first,cross,mask,bias",
    [(True, False, "none", True), (False, False, "causal", True), (True, True, "additive3d", False),
     (False, True, "padding", True), (True, False, "weights", True)],
)
@pytest.mark.parametrize("estimator", ["exact", "score"])
def test_attention_rule_equals_the_functional_backend(batch_first, cross, mask, bias, estimator) -> None:
    torch.manual_seed(1)
    model = _Attend(batch_first, cross, mask, bias).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert _rules(model, x)["attn"] == AttentionRule.__name__
    _assert_equals_functional(model, x, estimator, seed=3)


class _AttendLonger(nn.Module):
    """Cross-attention whose keys and values have 2 positions more than the queries (S = L + 2)."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.memory = nn.Linear(4, 4)
        self.batch_first = batch_first
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kv = self.memory(torch.cat([x, x[:, :2].flip(-1)], 1))  # (B, L + 2, 4)
        q, kv = (x, kv) if self.batch_first else (x.transpose(0, 1), kv.transpose(0, 1))
        mask = -torch.arange(kv.shape[0 if not self.batch_first else 1], dtype=x.dtype) * 0.3  # (S,) additive
        z = self.attn(q, kv, kv, need_weights=False, attn_mask=mask.expand(x.shape[1], -1))[0]
        z = z if self.batch_first else z.transpose(0, 1)
        return self.head(z.tanh().mean(1))


@pytest.mark.parametrize("batch_first", [True, False])
def test_cross_attention_over_longer_keys_equals_the_functional_backend(batch_first: bool) -> None:
    torch.manual_seed(4)
    model = _AttendLonger(batch_first).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    assert _rules(model, x)["attn"] == AttentionRule.__name__
    for estimator in ("exact", "score"):
        _assert_equals_functional(model, x, estimator, seed=5, structures=("diag",))


@pytest.mark.parametrize(("mask", "cross", "parts", "taps"),
                         [("none", False, 1, 2), ("padding", True, 3, 4), ("weights", False, 0, 2)])
def test_attention_is_recorded_in_parts_unless_its_weights_are_asked_for(mask: str, cross: bool, parts: int,
                                                                         taps: int) -> None:
    """While recording, the attention runs in parts on the engine's copy: its outputs equal the module's
    own, ``q, k, v`` become taps (one packed tap for self-attention, three otherwise), and afterwards
    the copy's forward is the module's again. A call asking for the weights keeps the module's forward."""
    torch.manual_seed(6)
    model = _Attend(False, cross, mask, True).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    view = ModelView(model)
    backend = PerModuleBackend(view)
    rec = backend.record(next(batches(x, None, view.device, view.dtype)))
    (call,) = [c for r, c in rec.calls if isinstance(r, AttentionRule)]
    assert len(call.cache.get("parts", ())) == parts and len(call.taps) == taps  # weights: output and weights
    assert "forward" not in view.model.attn.__dict__
    assert torch.allclose(rec.values, model(x), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("family", ["categorical", "gaussian"])
@pytest.mark.parametrize("estimator", ["exact", "score"])
def test_padded_batch_with_mask_equals_the_unpadded_sequences(family: str, estimator: str) -> None:
    torch.manual_seed(0)
    c = 3 if family == "categorical" else 2
    model = TokenModel(c).double()
    lengths = [4, 2, 3, 1]
    seqs = [torch.randint(1, 5, (n,), generator=torch.Generator().manual_seed(i)) for i, n in enumerate(lengths)]
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.zeros(padded.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        padded[i, : len(s)], mask[i, : len(s)] = s, True
    kw = {"family": family, "estimator": estimator, "structure": "diag", "n_samples": 1}
    if estimator == "exact":
        alone = torch.stack([torchfim.fisher(model, s[None], **kw) for s in seqs]).mean(0)
        together = torchfim.fisher(model, padded, mask=mask, **kw)
        assert torch.allclose(together, alone, rtol=1e-12, atol=1e-14)
    else:  # same expectation: the padded positions add nothing, so the variances agree too
        var_alone = torch.stack([torchfim.fisher_variance(model, s[None], family=family, estimator="score")
                                 for s in seqs]).sum(0) / len(seqs) ** 2
        var_together = torchfim.fisher_variance(model, padded, family=family, estimator="score", mask=mask)
        assert torch.allclose(var_together, var_alone, rtol=1e-10, atol=1e-14)


class _DictOutputs(nn.Module):
    """The token model's logits in a dict, as Hugging Face models return them in an object."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": self.inner(x)}


def test_planning_takes_the_mask_and_output_map_as_fisher_does() -> None:
    """``samples_needed`` and ``compare_estimators`` on a padded batch with its mask, through an output map,
    answer as on the unpadded sequences (each its own mini-batch)."""
    torch.manual_seed(0)
    model = TokenModel(3).double()
    lengths = [4, 2, 3, 1]
    seqs = [torch.randint(1, 5, (n,), generator=torch.Generator().manual_seed(i))[None] for i, n in enumerate(lengths)]
    padded = torch.zeros(len(seqs), max(lengths), dtype=torch.long)
    mask = torch.arange(max(lengths)) < torch.tensor(lengths)[:, None]
    for i, s in enumerate(seqs):
        padded[i, : s.shape[1]] = s[0]
    wrapped, logits = _DictOutputs(model), lambda out: out["logits"]
    for structure in ("trace", "diag"):
        alone = torchfim.samples_needed(model, seqs, structure=structure, rel_error=0.05)
        assert torchfim.samples_needed(wrapped, padded, structure=structure, rel_error=0.05, mask=mask,
                                       output=logits) == alone
    want = torchfim.compare_estimators(model, seqs, n_samples=2)
    got = torchfim.compare_estimators(wrapped, padded, n_samples=2, mask=mask, output=logits)
    assert [r.name for r in got.rows] == ["inner." + r.name for r in want.rows]
    for g, w in zip(got.rows, want.rows):
        for field in ("fisher_diag_sum", "score_variance", "hessian_variance"):
            assert math.isclose(getattr(g, field), getattr(w, field), rel_tol=1e-10, abs_tol=1e-15)


def test_classes_in_dim_one_as_cross_entropy_takes_them() -> None:
    torch.manual_seed(0)
    model = TokenModel(3).double()
    x = torch.randint(0, 5, (4, 3))

    class ClassFirst(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.inner(t).transpose(1, 2)  # (B, C, T)

    want = torchfim.fisher(model, x, structure="diag")
    assert torch.allclose(torchfim.fisher(ClassFirst(), x, structure="diag", class_dim=1), want, atol=1e-14)


class _Pair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2).double()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x


def test_tuple_output_error_names_the_fix_and_output_maps_it() -> None:
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(torchfim.TorchfimError, match=r"output=lambda out: out\[0\]"):
        torchfim.fisher(_Pair(), x)
    model = _Pair()
    got = torchfim.fisher(model, x, output=lambda out: out[0])
    assert torch.allclose(got, torchfim.fisher(model.lin, x))


class _Named(nn.Module):
    """Returns its outputs under another name than ``logits``: in a dict, or as an object's attribute."""

    def __init__(self, as_object: bool) -> None:
        super().__init__()
        self.lin, self.as_object = nn.Linear(3, 2).double(), as_object

    def forward(self, x: torch.Tensor) -> object:
        fields = {"count": 3, "scores": self.lin(x)}
        return SimpleNamespace(**fields) if self.as_object else fields


@pytest.mark.parametrize("as_object", [False, True])
def test_a_structured_output_error_suggests_an_output_that_works(as_object: bool) -> None:
    """The suggested ``output=`` picks the tensor by the output's own key or attribute (it said ``out[0]``, which on
    a dict raised a KeyError), and following it gives the Fisher of the tensor."""
    x = torch.randn(4, 3, dtype=torch.float64)
    model = _Named(as_object)
    with pytest.raises(torchfim.TorchfimError) as err:
        torchfim.fisher(model, x)
    hint = "out.scores" if as_object else "out['scores']"
    assert f"output=lambda out: {hint}" in str(err.value)
    output = (lambda out: out.scores) if as_object else (lambda out: out["scores"])
    assert torch.allclose(torchfim.fisher(model, x, output=output), torchfim.fisher(model.lin, x))


def test_logits_objects_and_dicts_are_read() -> None:
    lin = nn.Linear(3, 2).double()
    x = torch.randn(4, 3, dtype=torch.float64)

    class WithLogits(nn.Module):
        def __init__(self, as_dict: bool) -> None:
            super().__init__()
            self.lin, self.as_dict = lin, as_dict

        def forward(self, x: torch.Tensor) -> object:
            out = self.lin(x)
            return {"logits": out} if self.as_dict else type("Out", (), {"logits": out})()

    want = torchfim.fisher(lin, x)
    for as_dict in (True, False):
        assert torch.allclose(torchfim.fisher(WithLogits(as_dict), x), want)


def test_dict_batches_take_labels_as_targets() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2).double()

        def forward(self, features: torch.Tensor) -> torch.Tensor:
            return self.lin(features)

    model = Keyword()
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.tensor([0, 1, 1, 0])
    got = torchfim.fisher(model, [{"features": x, "labels": y}], estimator="empirical")
    assert torch.allclose(got, torchfim.fisher(model.lin, x, estimator="empirical", targets=y))


def test_mask_of_the_wrong_shape_is_refused() -> None:
    model = TokenModel(3).double()
    x = torch.randint(0, 5, (4, 3))
    with pytest.raises(torchfim.TorchfimError, match="position mask has shape.*pass one boolean per input and position"):
        torchfim.fisher(model, x, mask=torch.ones(4, 2, dtype=torch.bool))


def test_a_token_mask_on_a_classifier_is_told_to_drop_it() -> None:
    """A sequence classifier's outputs have no positions; a newcomer passed the attention mask as mask= and was told
    to pass one boolean per position. Now: drop mask= (the model reads its attention mask), the monitor too."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, tokens = torch.randn(4, 3, dtype=torch.float64), torch.ones(4, 7, dtype=torch.bool)
    with pytest.raises(torchfim.TorchfimError, match=r"have no positions .* drop mask=, or pass a \(batch,\) mask"):
        torchfim.fisher(model, x, mask=tokens)
    with pytest.raises(torchfim.TorchfimError, match="drop mask="):
        torchfim.train.FisherTraceMonitor(model, x, mask=lambda batch: tokens).measure(0)


def test_long_outputs_are_refused() -> None:
    class Argmax(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x).argmax(-1, keepdim=True)

    with pytest.raises(torchfim.TorchfimError, match="floating-point outputs"):
        torchfim.fisher(Argmax(), torch.randn(4, 3))


def test_attention_rule_sample_by_sample_chunks_equal_the_functional_backend(monkeypatch) -> None:
    """The attention backward is computed once per call and reused: chunks of one sample must agree."""
    import torchfim.engine.modules.base as base_module
    import torchfim.engine.per_module as per_module

    monkeypatch.setattr(per_module, "CACHE_ELEMENTS", 1)  # one sample per chunk of per-sample products
    monkeypatch.setattr(base_module, "SQUARES_ELEMENTS", 1)  # and of the squares at positions
    torch.manual_seed(2)
    model = _Attend(False, True, "padding", True).double().eval()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    got = torchfim.fisher(model, x, structure="diag")
    want = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


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


def test_attention_causal_hint_without_a_mask_fails_as_in_torch() -> None:
    """``is_causal=True`` without ``attn_mask`` is refused by torch; recording in parts must not compute
    an unmasked attention instead."""

    class Hinted(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(x, x, x, need_weights=False, is_causal=True)[0].mean(1))

    model, x = Hinted().double(), torch.randn(3, 5, 4, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        model(x)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        torchfim.fisher(model, x)


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


class _TakesUseCache(nn.Module):
    """A model whose forward takes ``use_cache``, as Hugging Face's do; it notes what it was given."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.given: list[object] = []

    def forward(self, x: torch.Tensor, use_cache: bool | None = None) -> torch.Tensor:
        self.given.append(use_cache)
        return self.lin(x)


def test_a_forward_taking_use_cache_runs_without_a_cache_unless_the_batch_asks() -> None:
    model = _TakesUseCache().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    want = torchfim.fisher(model, x, backend="functional")
    for inputs, given in ((x, False), ({"x": x}, False), ({"x": x, "use_cache": True}, True)):
        model.given.clear()
        assert torch.allclose(torchfim.fisher(model, inputs), want, rtol=1e-12, atol=0)
        assert model.given and set(model.given) == {given}


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
