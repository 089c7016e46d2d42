"""torchfim on Hugging Face transformers models built from a config (random weights, offline).

Dict mini-batches ``{"input_ids", "attention_mask"}`` with right padding, outputs read from
``.logits``. The oracle is the definition, from ``torch.func`` Jacobians of the flattened logits
against the flat parameter vector (:func:`clients.jacobians`):

* language model, logits ``(B, T, V)``: ``(1/n) Σ_b Σ_{t unmasked} diag(J_btᵀ Λ(p_bt) J_bt)``;
* sequence classifier, logits ``(B, C)``: ``(1/n) Σ_b diag(J_bᵀ Λ(p_b) J_b)``,

with ``Λ(p) = diag p − p pᵀ``. Both backends (``modules``, ``functional``) must match it and each
other to 1e-10 in float64; the score estimator with many labels must fall within 4 standard errors
of the exact Fisher, the standard errors being :func:`torchfim.fisher_variance`'s.
"""

from __future__ import annotations

import warnings

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from engine_checks import module_rules

import torchfim
import torchfim.report
import torchfim.train
from torchfim.engine import ModelView, batches, make_backend
from torchfim.engine.attention_kernel import math_attention
from torchfim.engine.modules import GenericRule
from torchfim.engine.modules.norm import NormRule
from torchfim.engine.modules.transposed_linear import TransposedLinearRule

transformers = clients.need("transformers")
transformers.logging.set_verbosity_error()
Conv1D = transformers.pytorch_utils.Conv1D

VOCAB, LENGTH, CLASSES = 50, 5, 3
PAD = 0


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
        bos_token_id=1, eos_token_id=1, attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=CLASSES, pad_token_id=PAD, attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config).double().eval()


def tiny_distilbert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        num_labels=CLASSES, pad_token_id=PAD, attn_implementation="eager",
    )
    return transformers.DistilBertForSequenceClassification(config).double().eval()


def built(model: type, config: type, **settings: object) -> torch.nn.Module:
    """A 2-layer causal LM of width 16 and 2 heads over VOCAB tokens (eager attention), in float64, seeded;
    ``settings`` adds to or overrides its config (None drops a setting the config does not take)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16, pad_token_id=PAD, attn_implementation="eager")
    merged = {k: v for k, v in {**common, **settings}.items() if v is not None}
    return model(config(**merged)).double().eval()


def tiny_opt() -> torch.nn.Module:
    """OPT: its position embedding (an ``nn.Embedding`` subclass) takes the attention mask and computes its
    ids, and its decoder layers flatten the hidden states to ``(B·T, d)`` around the feed-forward layers."""
    return built(transformers.OPTForCausalLM, transformers.OPTConfig, ffn_dim=32, word_embed_proj_dim=16)


def tiny_gemma() -> torch.nn.Module:
    """Gemma: its token embedding (an ``nn.Embedding`` subclass) scales the rows it looks up, and its
    RMSNorm is its own class."""
    return built(transformers.GemmaForCausalLM, transformers.GemmaConfig, intermediate_size=32,
                 num_key_value_heads=1, head_dim=8)


def tiny_llama() -> torch.nn.Module:
    """Llama: rotary positions, grouped-query attention, and an RMSNorm of its own class."""
    return built(transformers.LlamaForCausalLM, transformers.LlamaConfig, intermediate_size=32, num_key_value_heads=1)


def tiny_falcon() -> torch.nn.Module:
    """Falcon: its layers are ``FalconLinear``, an ``nn.Linear`` subclass whose own forward computes the same."""
    return built(transformers.FalconForCausalLM, transformers.FalconConfig, new_decoder_architecture=False,
                 multi_query=True, max_position_embeddings=None)


def tiny_bart() -> torch.nn.Module:
    """BART: its decoder looks its positions up from ids ``(T,)`` beside the token ids ``(B, T)``, an output
    ``(1, T, d)`` shared by the batch; its classifier reads the last ``<eos>`` of each input."""
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=16, num_labels=CLASSES,
                                     pad_token_id=PAD, eos_token_id=1, attn_implementation="eager")
    return transformers.BartForSequenceClassification(config).double().eval()


def padded_batch(lengths: list[int], seed: int, positions: bool = True) -> dict[str, torch.Tensor]:
    """Token ids padded on the right to LENGTH, their attention mask and (optionally) position ids.

    Hugging Face models build position ids of shape ``(1, T)`` when none are passed, shared by the
    whole batch; passing them per input (``(B, T)``) keeps every lookup per-sample (see
    :func:`test_shared_position_ids_per_module`).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(lengths), LENGTH), generator=g)
    mask = (torch.arange(LENGTH) < torch.tensor(lengths).unsqueeze(1)).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}
    if positions:
        batch["position_ids"] = torch.arange(LENGTH).repeat(len(lengths), 1)
    return batch


def concat(mini_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in mini_batches]) for k in mini_batches[0]}


def generic_modules(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
    """Paths of the modules the per-module backend covers with its generic (torch.func) rule."""
    view = ModelView(model)
    engine = make_backend(view, "modules")
    for b in batches(batch, None, view.device, view.dtype):
        engine.record(b)  # the first record may move parameters to a generic rule
    return sorted(rule.path for rule in engine.rules.values() if isinstance(rule, GenericRule))


# ------------------------------------------------------------------ language model
def test_gpt2_exact_diag_matches_jacobian_oracle() -> None:
    model = tiny_gpt2()
    mini_batches = [padded_batch([5, 3], seed=1), padded_batch([2], seed=2)]
    jac, logits = clients.jacobians(model, kwargs=concat(mini_batches), output="logits")
    mask = concat(mini_batches)["attention_mask"]
    want = clients.categorical_diag(jac, logits, VOCAB, mask)
    got = {
        backend: torchfim.fisher(model, mini_batches, structure="diag", backend=backend, mask="attention_mask")
        for backend in ("modules", "functional")
    }
    assert clients.rel_err(got["modules"], got["functional"]) < 1e-10
    for value in got.values():
        assert clients.rel_err(value, want) < 1e-10
    # the mask matters: counting the padded positions too would be far off
    assert clients.rel_err(clients.categorical_diag(jac, logits, VOCAB), want) > 1e-2


def labelled_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """:func:`padded_batch` with ``labels``: its input ids, -100 at the padding (as a collator makes them)."""
    batch = padded_batch(lengths, seed=seed)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def next_token_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """``(jac, logits, shifted, scores)``: the Jacobian oracle, the labels shifted as a causal LM's loss
    shifts them (``labels[t + 1]``, -100 last) and the per-position scores ``J_tᵀ(e_y − p_t)`` (B, T, P),
    zero where the shifted label is -100."""
    jac, logits = clients.jacobians(model, kwargs={k: v for k, v in batch.items() if k != "labels"}, output="logits")
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)  # (B, T)
    b, p_dim = jac.shape[0], jac.shape[-1]
    residual = torch.nn.functional.one_hot(shifted.clamp(min=0), VOCAB) - torch.softmax(logits.reshape(b, -1, VOCAB), -1)
    scores = torch.einsum("btc,btcp->btp", residual, jac.reshape(b, -1, VOCAB, p_dim))
    return jac, logits, shifted, scores * (shifted != -100).unsqueeze(-1)


def test_the_report_of_a_causal_lm_pairs_its_labels_as_the_library_does() -> None:
    """``torchfim report`` on a tokenizer-style dict with ``labels`` and ``--mask attention_mask``: every number
    is over the positions the model's loss scores, as the library reads the dict (labels shifted, -100 and the
    last position unscored): Tr(F), the per-position count and the empirical Fisher with the labels shifted as
    the model's loss shifts them (before: Tr(F) and the count over every unpadded position, the last too)."""
    model = tiny_gpt2()
    batch = labelled_batch([5, 3, 4, 2], seed=3)
    jac, logits, shifted, scores = next_token_scores(model, batch)
    R = torchfim.report.compute_report(model, torchfim.report.as_data(batch, "test"), mask="attention_mask",
                                       variance_inputs=2, max_block=0, progress=False)
    scored = batch["attention_mask"].bool() & (shifted != -100)
    exact = clients.categorical_diag(jac, logits, VOCAB, scored).sum()
    assert abs(R["trace"]["exact"] - float(exact)) < 1e-10 * float(exact)
    unshifted = clients.categorical_diag(jac, logits, VOCAB, batch["attention_mask"]).sum()
    assert abs(float(unshifted) - float(exact)) > 1e-2 * float(exact)  # the old positions are far off
    assert R["outputs"]["observed_positions_per_input"] == int(scored.sum()) / len(scored)
    empirical = scores.sum(1).square().sum() / len(scores)
    assert abs(R["empirical"]["trace"] - float(empirical)) < 1e-10 * float(empirical)
    assert abs(R["empirical"]["trace_ratio"] - float(empirical / exact)) < 1e-10


def test_the_score_only_reports_empirical_ratio_compares_the_same_positions() -> None:
    """The score-only report (``--mode score-only``, the trial's right-padded GPT-2 with labels) divides the
    empirical trace by an estimate over the same scored positions: with many labels per input the estimate
    is within its error bars of the float64 exact trace over those positions (before: over every unpadded
    position, the last too, 0.754× where like for like is 0.984)."""
    model = tiny_gpt2()
    batch = labelled_batch([5, 3, 4, 2], seed=3)
    jac, logits, shifted, scores = next_token_scores(model, batch)
    R = torchfim.report.compute_report(model, torchfim.report.as_data(batch, "test"), mask="attention_mask",
                                       n_samples=400, score_only=True, progress=False)
    scored = batch["attention_mask"].bool() & (shifted != -100)
    exact = float(clients.categorical_diag(jac, logits, VOCAB, scored).sum())
    unshifted = float(clients.categorical_diag(jac, logits, VOCAB, batch["attention_mask"]).sum())
    T = R["trace"]
    assert abs(T["trace_score_estimate"] - exact) < 4 * T["trace_score_stderr"]
    assert abs(T["trace_score_estimate"] - unshifted) > 8 * T["trace_score_stderr"]
    empirical = float(scores.sum(1).square().sum() / len(scores))
    assert abs(T["trace_empirical"] - empirical) < 1e-10 * empirical


def test_gpt2_empirical_fisher_pairs_logits_with_the_next_label_as_its_loss_does() -> None:
    """A causal LM's ``labels`` (its input ids, -100 at padding) are shifted as the model's own loss shifts
    them: the score at position t is that of ``labels[t + 1]``; -100 (the last position, padding) adds
    nothing. The oracle sums the per-position scores ``J_tᵀ(e_y − p_t)`` of the model's own loss over
    each sequence."""
    model = tiny_gpt2()
    batch = labelled_batch([5, 3], seed=1)
    jac, logits, shifted, scores = next_token_scores(model, batch)
    b, p_dim = jac.shape[0], jac.shape[-1]
    want = scores.sum(1).square().sum(0) / b  # (1/n) Σᵢ gᵢ², gᵢ the sequence's score (docs/math.md §5)
    got = torchfim.fisher(model, batch, estimator="empirical", structure="diag")
    assert clients.rel_err(got, want) < 1e-10
    # with the padding masked too (before the shift, silently paired with the wrong labels)
    masked = torchfim.fisher(model, batch, estimator="empirical", structure="diag", mask="attention_mask")
    assert clients.rel_err(masked, want) < 1e-10
    # the model's own loss has these scores: its gradient is minus their mean over the labelled positions
    # (to float32's precision: the loss upcasts the logits to float32)
    params = [p for _, p in clients.trainable(model)]
    loss_grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(model(**batch).loss, params)])
    assert clients.rel_err(loss_grad, -scores.sum((0, 1)) / int((shifted != -100).sum())) < 1e-6
    # labels paired with the outputs at their own position would be far off
    unshifted = torch.nn.functional.one_hot(batch["input_ids"], VOCAB) - torch.softmax(logits.reshape(b, -1, VOCAB), -1)
    naive = torch.einsum("btc,btcp->btp", unshifted, jac.reshape(b, -1, VOCAB, p_dim)) * batch["attention_mask"].unsqueeze(-1)
    assert clients.rel_err(naive.sum(1).square().sum(0) / b, want) > 1e-2


def test_a_causal_lms_explicit_targets_are_read_as_given_and_its_input_ids_warned_of() -> None:
    """Explicit targets are one per output position, not shifted: ``targets`` shifted by hand give what the
    dict's ``labels`` give, silently; the input ids themselves (a causal LM's labels unshifted, the likely
    slip) warn and name both fixes."""
    model = tiny_gpt2()
    batch = labelled_batch([5, 3], seed=1)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    shifted = torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100)
    want = torchfim.fisher(model, batch, estimator="empirical", structure="diag")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = torchfim.fisher(model, inputs, targets=shifted, estimator="empirical", structure="diag")
    assert clients.rel_err(got, want) < 1e-12
    with pytest.warns(RuntimeWarning, match=r"targets given are the batch's input_ids.*predict token t \+ 1.*"
                                            r"shifted.*'labels'"):
        torchfim.fisher(model, inputs, targets=inputs["input_ids"], estimator="empirical", structure="diag")


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_masked_lm_labels_are_not_shifted_and_minus_100_observes_nothing() -> None:
    """A masked LM's loss pairs each position with its own label, -100 off the masked tokens: the empirical
    Fisher is the sum over the masked positions of their scores, squared per sequence. Its head registers
    the output bias twice (``predictions.bias``, ``predictions.decoder.bias``): the decoder's Linear rule
    covers it, with no warning and no generic rule (before: the whole model's generic rule)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, attn_implementation="eager")
    model = transformers.BertForMaskedLM(config).double().eval()
    ids = torch.randint(2, VOCAB, (3, LENGTH), generator=torch.Generator().manual_seed(4))
    labels = torch.full_like(ids, -100)
    labels[:, 2], labels[0, 4] = ids[:, 2], ids[0, 4]
    # per-input position ids: the ones the model builds, (1, T), would send the position embedding generic
    batch = {"input_ids": ids.masked_fill(labels != -100, 1), "labels": labels,
             "position_ids": torch.arange(LENGTH).repeat(len(ids), 1)}
    params = [p for _, p in clients.trainable(model)]
    want = torch.zeros(sum(p.numel() for p in params), dtype=torch.float64)
    for i in range(len(ids)):
        log_p = torch.log_softmax(model(input_ids=batch["input_ids"][i : i + 1]).logits[0], -1)  # positions 0..T-1
        kept = labels[i] != -100
        score = torch.autograd.grad(log_p[kept].gather(-1, labels[i, kept, None]).sum(), params, allow_unused=True)
        want += torch.cat([torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
                           for p, g in zip(params, score)]).square() / len(ids)
    got = torchfim.fisher(model, batch, estimator="empirical", structure="diag")
    assert clients.rel_err(got, want) < 1e-10
    assert generic_modules(model, batch) == []


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


@pytest.mark.parametrize(("make", "generic", "tol"), [
    pytest.param(tiny_opt, ["model.decoder.embed_positions"], 1e-10, id="opt"),
    # Gemma's and Llama's RMSNorm compute in float32 whatever the model's dtype: float32 rounding on both sides
    pytest.param(tiny_gemma, [], 1e-6, id="gemma"),
    pytest.param(tiny_falcon, [], 1e-10, id="falcon"),
    pytest.param(tiny_llama, [], 1e-6, id="llama"),
])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_causal_lms_whose_layers_the_rules_do_not_follow_match_the_jacobian_oracle(make, generic, tol: float) -> None:
    """A subclass of ``nn.Embedding`` with a forward of its own that the rule does not follow (OPT's positions
    from the attention mask) fails its rule's probation and gets the generic rule of that module alone, while
    Gemma's scaled lookup keeps the Embedding rule (its scale read off the call), and Falcon's Linear subclass, whose forward computes what ``nn.Linear``'s does, keeps the Linear rule (no
    module of Falcon goes generic). Llama's and Gemma's RMSNorm, classes of their own, keep the RMSNorm rule
    on probation (their weight's gradient is the rule's). OPT's feed-forward layers and final layer norms, on
    inputs flattened to ``(B·T, d)`` sample by sample, keep their rules, reading the rows as positions (they
    went to the generic rule of their decoder layer before). Before that: an ``index_copy_`` error from inside
    the Embedding rule (OPT without a mask), or the whole model's generic rule, one sample at a time (with a
    mask)."""
    model = make()
    batch = padded_batch([5, 3, 4], seed=8, positions=False)
    jac, logits = clients.jacobians(model, kwargs={**batch, "use_cache": False}, output="logits")
    want = clients.categorical_diag(jac, logits, VOCAB, batch["attention_mask"])
    got = torchfim.fisher(model, batch, structure="diag", mask="attention_mask")
    assert clients.rel_err(got, want) < tol
    without_mask = {"input_ids": batch["input_ids"]}
    jac, logits = clients.jacobians(model, kwargs={**without_mask, "use_cache": False}, output="logits")
    assert clients.rel_err(torchfim.fisher(model, without_mask, structure="diag"),
                           clients.categorical_diag(jac, logits, VOCAB)) < tol
    assert generic_modules(model, {**batch, "use_cache": False}) == generic


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


def test_gpt2_score_within_four_standard_errors() -> None:
    """Î1 with k labels per position against the exact Fisher, in units of its standard error."""
    model = tiny_gpt2()
    batch = padded_batch([5, 3, 4], seed=5)
    k = 64
    exact = torchfim.fisher(model, batch, structure="diag", mask="attention_mask")
    score = torchfim.fisher(model, batch, estimator="score", structure="diag", n_samples=k, mask="attention_mask",
                            generator=torch.Generator().manual_seed(0))
    var = torchfim.fisher_variance(model, batch, estimator="score", structure="diag", n_samples=k,
                                   mask="attention_mask")
    se = var.clamp_min(0).sqrt()
    varies = se > 1e-12 * se.max()
    assert (score[~varies] - exact[~varies]).abs().max() <= 1e-10 * exact.abs().max()
    z = (score - exact)[varies] / se[varies]
    # ~7000 correlated entries: a normal z exceeds 3 with probability 0.27 %, 4 with 0.006 %
    assert (z.abs() > 3).float().mean() < 0.01
    assert (z.abs() > 4).float().mean() < 1e-3
    assert z.abs().max() < 6
    assert 0.7 < z.square().mean() < 1.3  # the standard errors have the right size, not only a bound

    trace_se = torchfim.fisher_variance(model, batch, estimator="score", structure="trace", n_samples=k,
                                        mask="attention_mask").sqrt()
    assert abs(score.sum() - exact.sum()) < 4 * trace_se


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


@pytest.mark.parametrize(("problem", "family"), [("multi_label_classification", "bernoulli"),
                                                ("regression", "gaussian")])
def test_a_classifiers_problem_type_names_the_family_of_its_loss(problem: str, family: str) -> None:
    """A BERT classifier whose config.problem_type makes its loss a BCE (multi-label) or an MSE (regression): the
    default family computed a softmax Fisher silently (0.753 where the per-label Bernoulli's is 0.835, a trial) or
    pointed a one-output regression to the Bernoulli family. A warning names the loss and the family; with that family
    there is none, and the multi-label Fisher equals the sum of the labels' Bernoulli Fishers by brute force."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=16, pad_token_id=PAD,
                                     num_labels=3 if family == "bernoulli" else 1, problem_type=problem,
                                     attn_implementation="eager")
    model = transformers.BertForSequenceClassification(config).double().eval()
    ids = torch.randint(2, VOCAB, (4, LENGTH), generator=torch.Generator().manual_seed(3))
    with pytest.warns(RuntimeWarning, match=f"problem_type is '{problem}'.*pass family='{family}'"):
        try:
            torchfim.fisher(model, ids, structure="trace")
        except torchfim.TorchfimError:  # one output: the categorical family refuses it, after the warning
            assert family == "gaussian"
    output = (lambda out: out.logits.unsqueeze(-1)) if family == "bernoulli" else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        got = torchfim.fisher(model, ids, family=family, structure="full", output=output)
    jac, logits = clients.jacobians(model, args=(ids,), output="logits")  # (n, C, P), (n, C)
    weights = torch.sigmoid(logits) * (1 - torch.sigmoid(logits)) if family == "bernoulli" else torch.ones_like(logits)
    want = torch.einsum("ncp,nc,ncq->pq", jac, weights, jac) / len(ids)
    assert clients.rel_err(got, want) < 1e-10


# ------------------------------------------------------------ sequence classifiers
CLASSIFIERS = [pytest.param(tiny_bert, id="bert"), pytest.param(tiny_distilbert, id="distilbert")]
NO_VMAP = pytest.mark.xfail(
    strict=True, raises=torchfim.TorchfimError,
    reason="torch.func cannot vmap transformers' padding-mask construction (data-dependent control flow); "
           "backend='functional' says so and points to backend='auto'",
)


def classifier_oracle(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    jac, logits = clients.jacobians(model, kwargs=batch, output="logits")
    return clients.categorical_diag(jac, logits, CLASSES)


@pytest.mark.parametrize("make", CLASSIFIERS)
@pytest.mark.parametrize("backend", ["modules", pytest.param("functional", marks=NO_VMAP)])
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_padded_classifier_exact_diag_matches_jacobian_oracle(make, backend: str) -> None:
    model = make()
    batch = padded_batch([5, 2, 4, 3], seed=6)
    got = torchfim.fisher(model, batch, structure="diag", backend=backend)
    assert clients.rel_err(got, classifier_oracle(model, batch)) < 1e-10


@pytest.mark.parametrize("make", CLASSIFIERS)
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_unpadded_classifier_backends_agree(make) -> None:
    """Without an attention mask ``torch.func`` batches the model: both backends and the oracle agree. Nor
    position ids: transformers ≥ 5.25 looks for packed sequences in given position ids with a
    data-dependent check, which torch.func cannot batch (the model builds its own, shared by the batch)."""
    model = make()
    batch = {k: v for k, v in padded_batch([5, 5, 5], seed=7, positions=False).items() if k != "attention_mask"}
    got = {backend: torchfim.fisher(model, batch, structure="diag", backend=backend)
           for backend in ("modules", "functional")}
    assert clients.rel_err(got["modules"], got["functional"]) < 1e-10
    assert clients.rel_err(got["modules"], classifier_oracle(model, batch)) < 1e-10


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_a_tokenizer_batch_encoding_is_read_as_its_dict() -> None:
    """What a tokenizer returns (a ``BatchEncoding``: a mapping, not a dict) is a dict mini-batch to the
    Fisher, its variance bounds and planning, the monitor's held inputs and the penalty, with the same
    results as the dict itself (the bounds and ``samples_needed`` iterated over its keys before)."""
    model, batch = tiny_bert(), padded_batch([5, 3, 4], seed=3)
    encoding = transformers.BatchEncoding(batch)
    assert not isinstance(encoding, dict)
    want = torchfim.fisher(model, batch, structure="diag")
    for given in (encoding, [encoding]):
        assert torch.equal(torchfim.fisher(model, given, structure="diag"), want)
    assert torch.equal(torchfim.variance_bound(model, encoding, structure="trace"),
                       torchfim.variance_bound(model, batch, structure="trace"))
    assert torchfim.samples_needed(model, encoding, rel_error=0.1) == torchfim.samples_needed(model, batch, rel_error=0.1)

    def trace(held: object) -> float:
        monitor = torchfim.train.FisherTraceMonitor(model, held, n_samples=4,
                                                    generator=torch.Generator().manual_seed(1))
        return monitor.measure(0).trace

    assert trace(encoding) == trace(batch)

    def penalty(inputs: object) -> torch.Tensor:
        pen = torchfim.train.FisherPenalty(model, generator=torch.Generator().manual_seed(2))
        return pen(inputs, step=0)

    assert torch.equal(penalty(encoding), penalty(batch))


@pytest.mark.parametrize("make", CLASSIFIERS)
@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_sequence_classifier_needs_no_generic_rule(make) -> None:
    """Linear, Embedding and LayerNorm rules cover every parameter of BERT and DistilBERT."""
    assert generic_modules(make(), padded_batch([5, 2, 4, 3], seed=6)) == []


@pytest.mark.filterwarnings("error::RuntimeWarning")
def test_bert_sdpa_hessian_variance_diag_matches_reverse_over_reverse() -> None:
    """Î2's variance diagonal needs ``∂²o/∂θ_p²`` through SDPA attention and LayerNorm, where torch's own
    forward-mode rules fail (no rule for the CPU flash kernel) or are wrong (layer_norm to second order).
    Oracle for the first query projection: ``(1/n²) Σᵢ dᵢ_pᵀ Λᵢ dᵢ_p`` with ``dᵢ_p`` the diagonal of
    reverse-over-reverse Hessians of each input's logits (attention on torch's math kernel)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=CLASSES, pad_token_id=PAD, attn_implementation="sdpa",
    )
    model = transformers.BertForSequenceClassification(config).double().eval()
    batch = padded_batch([5, 3, 4], seed=1)
    var = torchfim.fisher_variance(model, batch, estimator="hessian", structure="diag")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    params = dict(clients.trainable(model))
    start = sum(p.numel() for n, p in clients.trainable(model)[: list(params).index(name)])
    query = params[name].detach()
    want = torch.zeros(query.numel(), dtype=torch.float64)
    n = batch["input_ids"].shape[0]
    for i in range(n):
        one = {k: v[i : i + 1] for k, v in batch.items()}

        def logits(w: torch.Tensor, one=one) -> torch.Tensor:
            return torch.func.functional_call(model, {name: w}, kwargs=one).logits[0]

        with math_attention():
            hess = torch.func.jacrev(torch.func.jacrev(logits))(query).reshape(CLASSES, query.numel(), -1)
        d = torch.diagonal(hess, dim1=1, dim2=2)  # (C, p)
        p = torch.softmax(logits(query).detach(), -1)
        want += torch.einsum("ap,ab,bp->p", d, torch.diag(p) - torch.outer(p, p), d)
    want /= n**2
    assert clients.rel_err(var[start : start + query.numel()], want) < 1e-10


# ------------------------------------------------------------------- encoder-decoder
def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=PAD,
    )
    return transformers.T5ForConditionalGeneration(config).double().eval()


def t5_batch() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(15)
    return {"input_ids": torch.randint(2, VOCAB, (3, 5), generator=g),
            "decoder_input_ids": torch.randint(2, VOCAB, (3, 4), generator=g)}


# T5's layer norm takes its variance in float32 whatever the model's dtype, so its backward rounds to float32 on that
# path, by an amount that depends on the output vectors pulled back (the oracle's one-hot ones, the engine's others):
# agreement to float32 precision. Its own rule's x̂ is the model's (tests/test_own_norms.py: to 1e-12 where no
# parameter lies before the norm).
T5_TOLERANCE = 1e-6


@pytest.mark.filterwarnings("ignore::UserWarning")  # torch: SDPA's fused CPU kernel has no batching rule
@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_t5_exact_diag_matches_jacobian_oracle(backend: str) -> None:
    """The relative-position biases are lookups shared by the batch, so the coverage check moves them to
    the whole model's generic rule, whose call also returns ``encoder_last_hidden_state``. Before, the
    decoder's path from it to the logits was counted twice (the encoder bias's diagonal came out 4×)."""
    model, batch = tiny_t5(), t5_batch()
    jac, logits = clients.jacobians(model, kwargs=batch, output="logits")
    want = clients.categorical_diag(jac, logits, VOCAB)
    got = torchfim.fisher(model, batch, structure="diag", backend=backend)
    assert clients.rel_err(got, want) < T5_TOLERANCE
    if backend == "modules":  # every T5LayerNorm on its rule (before: 6 of 7 given to the generic rule)
        checked, rules = module_rules(model, {**batch, "use_cache": False})
        norms = [r for path, r in rules.items() if path.endswith("layer_norm")]
        assert len(norms) == 7 and all(isinstance(r, NormRule) for r in norms) and not checked.demoted
