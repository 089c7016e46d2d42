"""Norms of a class of their own keep the norm rule, with the ``x̂`` their first call shows.

A class named ``…Norm`` with a trainable vector ``weight`` (and a ``bias``) and a float ``eps`` gets the norm
rule on probation; whether it normalises as an RMSNorm or a LayerNorm (over the last dim) is read off its
first call (:func:`torchfim.engine.modules.norm.own_norm_kind`). The oracle is the dense float64
``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` of :mod:`oracles`.
"""

from __future__ import annotations

import warnings

import clients
import pytest
import torch
from engine_checks import assert_equals_dense, assert_quietly_equals_dense_over, assert_same_fisher, module_rules
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.norm import NormRule


class T5LayerNorm(nn.Module):
    """T5's: an RMSNorm named a LayerNorm, ``w ⊙ x/√(mean(x²) + eps)``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.variance_epsilon = nn.Parameter(torch.linspace(0.5, 1.5, d)), 1e-6

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))


class T5Float32LayerNorm(T5LayerNorm):
    """T5's forward as transformers writes it: the variance taken in float32 whatever the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))


class CohereLayerNorm(nn.Module):
    """A LayerNorm written out, ``w ⊙ (x − μ)/√(σ² + eps) + b``."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.linspace(0.5, 1.5, d)), nn.Parameter(torch.linspace(-0.2, 0.2, d))
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centred = x - x.mean(-1, keepdim=True)
        return self.weight * centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps) + self.bias


class GatedNorm(nn.Module):
    """Named like a norm, but ``w ⊙ tanh(x) + b``: neither kind."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.linspace(0.5, 1.5, d)), nn.Parameter(torch.zeros(d))
        self.eps = 1e-5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(x) + self.bias


@pytest.mark.parametrize(("norm", "kind"), [(T5LayerNorm, "rms"), (CohereLayerNorm, "layer"), (GatedNorm, None)])
@pytest.mark.parametrize("structure", ["diag", "layers"])
def test_norms_of_their_own_class_keep_the_norm_rule_of_their_kind(norm: type, kind: str | None, structure: str) -> None:
    """An RMSNorm named a LayerNorm and a LayerNorm written out keep the rule with the right ``x̂`` (the wrong
    one fails the oracle); a module named like a norm that is none gets its generic rule, silently. The
    reference is the whole-model backend (the dense oracle takes no positions); below, the dense oracle."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), norm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)  # positions too: the weight is shared over them
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = torchfim.fisher(model, x, structure=structure)
        want = torchfim.fisher(model, x, structure=structure, backend="functional")
    assert_same_fisher(got, want)
    backend, rules = module_rules(model, x)
    if kind is None:
        assert isinstance(rules["1"], GenericRule)
    else:
        assert isinstance(rules["1"], NormRule) and rules["1"].kind == kind and not backend.demoted


def test_an_own_norm_on_inputs_without_positions_equals_the_dense_oracle() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), CohereLayerNorm(4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    assert_equals_dense(torchfim.fisher(model, x, structure="layers"), exact_fisher(model, x, "categorical"), model,
                        "layers")


def test_cohere_keeps_its_layer_norm_on_the_norm_rule() -> None:
    """Cohere's LayerNorm (no bias, float32 inside): the rule, and the whole-model backend's Fisher."""
    transformers = clients.need("transformers")
    torch.manual_seed(0)
    config = transformers.CohereConfig(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1)
    model = transformers.CohereForCausalLM(config).eval()
    x = {"input_ids": torch.randint(1, 60, (3, 5), generator=torch.Generator().manual_seed(1))}
    logits = lambda out: out.logits  # noqa: E731
    reference = torchfim.fisher(model, x, structure="diag", output=logits, backend="functional")
    got = torchfim.fisher(model, x, structure="diag", output=logits)
    assert torch.allclose(got, reference, rtol=1e-4, atol=1e-6 * reference.abs().max())
    backend, _ = module_rules(model, x, logits)
    norms = [r for m, r in backend.rules.items() if type(m).__name__ == "CohereLayerNorm"]
    assert norms and all(isinstance(r, NormRule) and r.kind == "layer" for r in norms)


@pytest.mark.skipif(not hasattr(torch.nn.functional, "rms_norm"), reason="no torch rms_norm to compare with: the "
                    "oracle tests of rms_norm_mlp run the written-out x̂ on this torch")
@pytest.mark.parametrize("eps", [None, 1e-3])
def test_an_rms_norm_without_torchs_rms_norm_is_normalised_as_torch_does(monkeypatch, eps: float | None) -> None:
    """torch < 2.4 has no ``F.rms_norm``: ``x̂`` is then written out, ``x/√(mean(x²) + ε)`` over the trailing dims with
    the dtype's machine epsilon for ``eps=None``; the same numbers as torch's, and an own RMSNorm keeps the norm rule
    (its probation compares the rule, on that ``x̂``, with autograd) with the oracle's Fisher."""
    from torchfim.engine.modules import norm

    x = torch.randn(4, 3, 2, 5, dtype=torch.float64) * 0.01  # small: the epsilon counts
    want = torch.nn.functional.rms_norm(x, (2, 5), None, eps)
    monkeypatch.delattr(torch.nn.functional, "rms_norm")
    assert torch.allclose(norm._rms_normalised(x, (2, 5), eps), want, rtol=1e-13, atol=0)
    torch.manual_seed(0)
    model, inputs = nn.Sequential(nn.Linear(3, 5), T5LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).double(), \
        torch.randn(6, 3, dtype=torch.float64)
    assert torch.allclose(torchfim.fisher(model, inputs, structure="diag"),
                          exact_fisher(model, inputs, "categorical").diagonal(), rtol=1e-10, atol=1e-14)
    backend, rules = module_rules(model, inputs)
    assert isinstance(rules["1"], NormRule) and not backend.demoted  # kept after probation: its x̂ is right


def test_a_norm_that_takes_its_variance_in_float32_keeps_the_rule_on_its_own_x_hat() -> None:
    """T5's norm in a float64 model: ``x̂`` from its own forward (variance in float32), not recomputed in float64.
    Before, the rule's ``x̂`` missed the model's by about 1e-8 relative: the coverage check gave the norm to the
    generic rule (6 of T5's 7 norms), or kept it with the diagonal 5e-8 off the oracle. The norm comes first here:
    a parameter before it would get its gradient through the norm's float32 backward, whose rounding depends on
    which output vectors are pulled back (the oracle's one-hot ones, the engine's others: 3e-8 apart on T5)."""
    torch.manual_seed(0)
    model = nn.Sequential(T5Float32LayerNorm(3), nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    got, want = torchfim.fisher(model, x, structure="diag"), exact_fisher(model, x, "categorical").diagonal()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15 * want.abs().max()), (got - want).abs().max()
    backend, rules = module_rules(model, x)
    assert isinstance(rules["0"], NormRule) and rules["0"].kind == "rms" and not backend.demoted


class SteeredNet(nn.Module):
    """A linear layer, an own RMSNorm with the user's hooks, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.norm, self.b = nn.Linear(3, 3), T5LayerNorm(3), nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.norm(self.a(x))))


@pytest.mark.parametrize("hook", ["pre", "post", "steered later"])
def test_the_users_hooks_on_an_own_norm_run_as_the_model_runs_them(hook: str) -> None:
    """The rule's ``x̂`` comes from the norm's own forward, not its ``__call__``: a forward pre-hook (steering the
    input, ``a + 1``) or a forward hook (steering the output, ``o + 0.5``) runs in the model's forward alone, and the
    rule reads the input after the pre-hook. Run inside ``x̂`` too, the pre-hook made the input ``x + 2`` (the whole
    model went to the generic rule) and the hook gave ``x̂ + 0.5`` (the norm went to it); switched on after a first call
    (whose coverage check is kept), the diagonal was 0.15 relative off the oracle."""
    torch.manual_seed(0)
    model, x, steer = SteeredNet().double(), torch.randn(5, 3, dtype=torch.float64), {"on": hook != "steered later"}
    if hook == "pre":
        model.norm.register_forward_pre_hook(lambda module, args: (args[0] + 1.0,))
    else:
        model.norm.register_forward_hook(lambda module, args, out: out + 0.5 if steer["on"] else out)
    if not steer["on"]:
        torchfim.fisher(model, x, structure="diag")
        steer["on"] = True
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torchfim.fisher(model, x, structure="diag")
    want = exact_fisher(model, x, "categorical").diagonal()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15 * want.abs().max()), (got - want).abs().max()
    backend, rules = module_rules(model, x)
    assert isinstance(rules["norm"], NormRule) and not backend.demoted


def test_a_hook_on_an_own_norm_fires_once_per_forward_of_the_model() -> None:
    """An activation recorder on an own norm fires as often as one on the layer before it: once per forward of the
    model that the call makes (it fired 7 times where the model ran 5, twice more in the rule's ``x̂``)."""
    torch.manual_seed(0)
    model, fired = SteeredNet().double(), {"a": 0, "norm": 0}
    for name in fired:
        model.get_submodule(name).register_forward_hook(lambda module, args, out, name=name: fired.update(
            {name: fired[name] + 1}))
    torchfim.fisher(model, torch.randn(5, 3, dtype=torch.float64), structure="diag")
    assert fired["a"] > 0 and fired["norm"] == fired["a"], fired


class PrenormRMSNorm(T5LayerNorm):
    """A prenorm fused RMSNorm's forward (flash-attn's, Mamba's): the residual added first, ``(normed, residual)``
    returned; in float32 inside where ``float32``; ``(residual, normed)`` where ``residual_first``."""

    def __init__(self, d: int, float32: bool = False, residual_first: bool = False) -> None:
        super().__init__(d)
        self.float32, self.residual_first = float32, residual_first

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is not None:
            x = x + residual
        variance = (x.to(torch.float32) if self.float32 else x).pow(2).mean(-1, keepdim=True)
        normed = self.weight * (x * torch.rsqrt(variance + self.variance_epsilon))
        return (x, normed) if self.residual_first else (normed, x)


class PrenormNet(nn.Module):
    def __init__(self, norm_first: bool, **kwargs: bool) -> None:
        super().__init__()
        self.norm_first, self.a, self.norm, self.b = norm_first, nn.Linear(3, 3), PrenormRMSNorm(3, **kwargs), \
            nn.Linear(3, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            normed, residual = self.norm(x)[:: -1 if self.norm.residual_first else 1]
            return self.b(torch.tanh(self.a(normed))) + 0.1 * residual.sum(-1, keepdim=True)
        normed, residual = self.norm(self.a(x))
        return self.b(normed) + 0.1 * residual.sum(-1, keepdim=True)


@pytest.mark.parametrize("settings", [{"norm_first": False}, {"norm_first": True, "float32": True},
                                      {"norm_first": True, "float32": True, "residual_first": True}],
                         ids=["residual with grad", "float32", "float32, residual first"])
def test_an_own_norm_that_returns_its_residual_too_keeps_the_rule(settings: dict) -> None:
    """An own norm that returns ``(normed, residual)`` keeps the rule, its ``x̂`` the output its kind was found on (it
    went to the generic rule: the rule's ``x̂`` was the tuple). Its ``x̂`` is its own forward's, not recomputed: the
    norm taking its variance in float32 (first in the model, as in the float32 test above) equals the oracle to
    1e-12, with its residual returned first or last."""
    torch.manual_seed(0)
    model, x = PrenormNet(**settings).double(), torch.randn(5, 3, dtype=torch.float64)
    got, want = torchfim.fisher(model, x, structure="diag"), exact_fisher(model, x, "categorical").diagonal()
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-15 * want.abs().max()), (got - want).abs().max()
    backend, rules = module_rules(model, x)
    assert isinstance(rules["norm"], NormRule) and not backend.demoted


class RowsRegrouped(nn.Module):
    """Calls its norm on the rows of ``(B, T, d)`` in another layout: the batch folded into the rows,
    ``(B·T, d)``, or sequence first, ``(T, B, d)``."""

    def __init__(self, norm: nn.Module, layout: str) -> None:
        super().__init__()
        self.norm, self.layout = norm, layout

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.layout == "folded":
            return self.norm(h.reshape(-1, h.shape[-1])).reshape(h.shape)
        return self.norm(h.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("layout", ["folded", "sequence_first"])
def test_an_own_norm_on_regrouped_rows_keeps_the_rule_of_its_kind(layout: str) -> None:
    """The kind of an own norm called on rows in another layout is read in the layout its input is kept in: the
    output and the input were compared as they came and as kept, never the same shape, so the norm went to the
    generic rule (a class first met so)."""
    norm_class = type("RegroupedCohereNorm", (CohereLayerNorm,), {})  # a class of its own: no kind known for it yet
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), RowsRegrouped(norm_class(4), layout), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    backend, rules = module_rules(model, x)
    assert isinstance(rules["1.norm"], NormRule) and rules["1.norm"].kind == "layer" and not backend.demoted
    assert_same_fisher(torchfim.fisher(model, x, structure="diag"),
                       torchfim.fisher(model, x, structure="diag", backend="functional"))


class PlainBatchNorm(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # torch's, under a forward of its own
        return super().forward(x)


class ScaledBatchNorm(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * torch.tanh(super().forward(x)) + x


class LastDimBatchNorm(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # over the features of (B, T, C)
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class BatchNormed(nn.Module):
    def __init__(self, norm: type) -> None:
        super().__init__()
        self.lin, self.bn, self.head = nn.Linear(4, 4), norm(4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, 4)
        h = self.lin(x)
        h = self.bn(h) if isinstance(self.bn, LastDimBatchNorm) else self.bn(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h).mean(1)


@pytest.mark.parametrize(("norm", "rule"), [(PlainBatchNorm, NormRule), (ScaledBatchNorm, GenericRule),
                                            (LastDimBatchNorm, GenericRule)])
def test_a_batch_norm_with_a_forward_of_its_own_runs_it(norm: type, rule: type) -> None:
    """BatchNorm's rule recorded its module by its own formula, in place of a subclass's forward: the check refused
    the model as mixing samples, or torch raised on a shape. Such a norm keeps its forward, with the norm rule on
    probation (the generic rule where it misses); batches of 2, then of 3 inputs of 3 positions."""
    torch.manual_seed(0)
    model = BatchNormed(norm).double()
    model(torch.randn(16, 3, 4, dtype=torch.float64) * 2 + 1)  # running statistics
    model.eval()
    with torch.no_grad():
        model.bn.weight.normal_(), model.bn.bias.normal_()
    xs = [torch.randn(n, 3, 4, dtype=torch.float64) for n in (2, 3)]
    assert_quietly_equals_dense_over(model, xs)
    assert type(module_rules(model, xs[1])[1]["bn"]) is rule
