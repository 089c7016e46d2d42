"""torchfim on Hugging Face transformers models built from a config (random weights, offline): the labels and
targets read as the model's loss reads them. A causal LM's logits pair with the next label (in the report, its
score-only ratio and the empirical Fisher), explicit targets are read as given, a masked LM's labels are not
shifted (-100 observes nothing), and a classifier's ``problem_type`` names the family of its loss.

Oracles: ``torch.func`` Jacobians of the flattened logits (:func:`clients.jacobians`) with the labels each
model's loss pairs them with.
"""

from __future__ import annotations

import warnings

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from hf_models import LENGTH, PAD, VOCAB, generic_modules, labelled_batch, tiny_gpt2, transformers

import torchfim
import torchfim.report


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
