"""torchfim on Hugging Face transformers models built from a config (random weights, offline): the exact
Fisher of language models, sequence classifiers and T5 against the definition.

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

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from engine_checks import module_rules
from hf_models import (
    CLASSES,
    PAD,
    VOCAB,
    classifier_oracle,
    concat,
    generic_modules,
    padded_batch,
    tiny_bert,
    tiny_distilbert,
    tiny_falcon,
    tiny_gemma,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    tiny_t5,
    transformers,
)

import torchfim
import torchfim.train
from torchfim.engine.attention_kernel import math_attention
from torchfim.engine.modules.norm import NormRule


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


# ------------------------------------------------------------ sequence classifiers
CLASSIFIERS = [pytest.param(tiny_bert, id="bert"), pytest.param(tiny_distilbert, id="distilbert")]
NO_VMAP = pytest.mark.xfail(
    strict=True, raises=torchfim.TorchfimError,
    reason="torch.func cannot vmap transformers' padding-mask construction (data-dependent control flow); "
           "backend='functional' says so and points to backend='auto'",
)


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
