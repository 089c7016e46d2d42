"""torchfim on Hugging Face transformers models built from a config (random weights, offline): the rule each
module gets. GPT-2's ``Conv1D`` projections take the transposed-Linear rule, position ids shared by the batch
keep each lookup on its module, classifiers keep every module's rule, and the functional backend batches an
SDPA model by switching it (and every model of an ensemble) to eager attention, restoring each after.
"""

from __future__ import annotations

import warnings

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from hf_models import (
    CLASSES,
    LENGTH,
    VOCAB,
    classifier_oracle,
    generic_modules,
    padded_batch,
    tiny_bart,
    tiny_bert,
    tiny_distilbert,
    tiny_gpt2,
    transformers,
)

import torchfim
from torchfim.engine import ModelView, batches, make_backend
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.transposed_linear import TransposedLinearRule

Conv1D = transformers.pytorch_utils.Conv1D


def rule_kinds(model: torch.nn.Module, batch: object) -> dict[str, str]:
    """Path → rule class name of every module the per-module backend gives a rule (after the first record,
    whose coverage check would move a rule whose summed per-sample gradients missed autograd's)."""
    view = ModelView(model)
    engine = make_backend(view, "modules")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # a moved parameter warns
        for b in batches(batch, None, view.device, view.dtype):
            engine.record(b)
    paths = {m: p for p, m in view.model.named_modules()}
    return {paths[m]: type(rule).__name__ for m, rule in engine.rules.items()}


def test_gpt2_projections_have_the_transposed_linear_rule() -> None:
    """GPT-2's projections are transformers' own ``Conv1D`` (a Linear whose weight is stored ``(in, out)``):
    each has the transposed-Linear rule, and nothing goes generic. The tied ``lm_head`` is a Linear, the
    lookups Embeddings and the norms LayerNorms."""
    model = tiny_gpt2()
    kinds = rule_kinds(model, padded_batch([5, 3], seed=3))
    conv1d = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Conv1D")
    assert len(conv1d) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 2 blocks
    assert sorted(n for n, k in kinds.items() if k == TransposedLinearRule.__name__) == conv1d
    assert GenericRule.__name__ not in kinds.values()


class Conv1DNet(torch.nn.Module):
    """transformers' ``Conv1D`` on inputs without positions ``(B, in)``, where its squares factor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = Conv1D(5, 3), Conv1D(4, 5)
        torch.nn.init.normal_(self.second.bias)  # zero at construction

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_conv1d_on_inputs_without_positions_matches_the_oracle() -> None:
    """The factored squares and squared norms (inputs ``(B, in)``): the exact diagonal and trace and the
    monitor's squared norms against the Jacobian oracle, the score variances of diagonal and trace
    against the functional backend."""
    model = Conv1DNet().double()
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(13), dtype=torch.float64)
    assert set(rule_kinds(model, x).values()) == {TransposedLinearRule.__name__}
    jac, logits = clients.jacobians(model, args=(x,))
    want = clients.categorical_diag(jac, logits, 4)
    assert clients.rel_err(torchfim.fisher(model, x, structure="diag"), want) < 1e-10
    assert abs(float(torchfim.fisher(model, x, structure="trace")) - float(want.sum())) < 1e-10 * float(want.sum())
    for structure in ("diag", "trace"):
        got, ref = (torchfim.fisher_variance(model, x, estimator="score", structure=structure, backend=backend)
                    for backend in ("modules", "functional"))
        assert clients.rel_err(got, ref) < 1e-10
    # the monitor's per-sample squared norms ‖Jᵢᵀ v_ij‖², against the Jacobians
    view = ModelView(model)
    engine = make_backend(view, "modules")
    rec = engine.record(next(batches(x, None, view.device, view.dtype)))
    v = torch.randn(9, 3, 4, generator=torch.Generator().manual_seed(14), dtype=torch.float64)
    want_norms = torch.einsum("bcp,bkc->bkp", jac, v).square().sum(-1)
    assert clients.rel_err(engine.sample_squares(rec, v), want_norms) < 1e-10


@pytest.mark.parametrize("backend", ["functional", "modules"])
def test_shared_position_ids_per_module(backend: str) -> None:
    """Without ``position_ids`` the model builds them ``(1, T)``, shared by the batch: same Fisher.

    The reference passes the same positions per input, which the exact-diagonal test above ties to
    the Jacobian oracle; the models' outputs are the same.
    """
    model = tiny_gpt2()
    shared = padded_batch([5, 3, 4], seed=4, positions=False)
    per_input = {**shared, "position_ids": torch.arange(LENGTH).repeat(3, 1)}
    want = torchfim.fisher(model, per_input, structure="diag", backend="functional", mask="attention_mask")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = torchfim.fisher(model, shared, structure="diag", backend=backend, mask="attention_mask")
    assert clients.rel_err(got, want) < 1e-10
    if backend == "modules":  # the position embedding keeps its rule: no module goes generic
        assert generic_modules(model, shared) == []


@pytest.mark.parametrize("make", [pytest.param(tiny_bert, id="bert"),
                                  pytest.param(tiny_distilbert, id="distilbert")])
def test_classifiers_given_no_position_ids_keep_every_module_rule(make) -> None:
    """Called as a tokenizer's output is, without position ids, the models build theirs ``(1, T)``: with a
    padding mask the Fisher still matches the Jacobian oracle, and no module goes generic (before, the
    position embedding went to the whole model's generic rule, which ``torch.func`` cannot batch under
    the mask: one sample at a time, with a warning)."""
    model = make()
    batch = padded_batch([5, 2, 4, 3], seed=6, positions=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = torchfim.fisher(model, batch, structure="diag")
    assert clients.rel_err(got, classifier_oracle(model, batch)) < 1e-10
    assert generic_modules(model, batch) == []


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_bart_classifier_positions_shared_by_the_batch_keep_their_module() -> None:
    """BART's decoder position lookup returns ``(1, T, d)`` from ids ``(T,)``: the engine spreads that output
    over the batch, so the lookup's generic rule reads it per sample (before, its parameters went to the
    generic rule of the whole decoder). The exact diagonal matches the Jacobian oracle."""
    model = tiny_bart()
    ids = torch.randint(2, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(9))
    ids[:, -1] = 1  # every input ends with <eos>, which the classifier reads
    batch = {"input_ids": ids}
    jac, logits = clients.jacobians(model, kwargs={**batch, "use_cache": False}, output="logits")
    assert clients.rel_err(torchfim.fisher(model, batch, structure="diag"),
                           clients.categorical_diag(jac, logits, CLASSES)) < 1e-10
    assert generic_modules(model, {**batch, "use_cache": False}) == ["model.decoder.embed_positions",
                                                                     "model.encoder.embed_positions"]


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_the_functional_backend_batches_an_sdpa_model_with_eager_attention() -> None:
    """GPT-2 with SDPA attention (transformers' default) and a padding mask: its mask construction asks whether the
    padding mask is all ones, which vmap cannot batch, and backend='functional' refused the model. Its passes now
    attend eagerly (the same attention to round-off): the two backends agree, and the model is SDPA again after."""
    eager = tiny_gpt2()
    model = type(eager)(transformers.GPT2Config(**{**eager.config.to_dict(), "attn_implementation": "sdpa"}))
    model.load_state_dict(eager.state_dict())
    model = model.double().eval()
    batch = padded_batch([5, 3, 4], seed=2)
    got = {backend: torchfim.fisher(model, batch, structure="diag", mask="attention_mask", backend=backend)
           for backend in ("modules", "functional")}
    assert clients.rel_err(got["functional"], got["modules"]) < 1e-10
    assert model.config._attn_implementation == "sdpa"
    # the output Hessians too (they went one sample at a time, warning): Var(Tr Î2) by both backends
    batch = padded_batch([5, 3], seed=2)
    got = {backend: torchfim.fisher_variance(model, batch, estimator="hessian", structure="trace",
                                             mask="attention_mask", backend=backend)
           for backend in ("modules", "functional")}
    assert clients.rel_err(got["functional"], got["modules"]) < 1e-10
    assert model.config._attn_implementation == "sdpa"


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_eager_attention_switches_every_model_of_an_ensemble_and_restores_each() -> None:
    """Two SDPA GPT-2s in one module: both attend eagerly inside the block (only the first did), and each is SDPA again
    after it, an error included."""
    from torchfim.engine.eager_attention import eager_attention, switchable_attention

    def sdpa() -> torch.nn.Module:
        eager = tiny_gpt2()
        return type(eager)(transformers.GPT2Config(**{**eager.config.to_dict(), "attn_implementation": "sdpa"}))

    pair = torch.nn.ModuleDict({"a": sdpa(), "b": sdpa()})
    assert switchable_attention(pair)
    with pytest.raises(KeyError), eager_attention(pair):
        assert [m.config._attn_implementation for m in pair.values()] == ["eager", "eager"]
        assert not switchable_attention(pair)
        raise KeyError("an error inside the block")
    assert [m.config._attn_implementation for m in pair.values()] == ["sdpa", "sdpa"]
