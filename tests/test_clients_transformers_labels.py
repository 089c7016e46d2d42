"""A Hugging Face batch's ``labels`` read as the model's own loss reads them, by every estimator and tool.

* A label -100 scores nothing in the loss, so its position observes nothing for the exact Fisher, the score
  estimator, the monitor and the penalty too, not only for the empirical Fisher: before, they counted every
  position, so the empirical and the true Fisher of one batch covered different positions (a user trial: a
  report's "empirical 0.754× the estimate" was mostly 32 labelled positions against 40).
* A causal LM's labels are shifted (its last position predicts nothing that is scored); an encoder-decoder's
  are not (transformers gives T5 and BART the causal loss's name), and a batch without decoder inputs gets
  those the model builds from its labels (before: T5 refused it from inside, BART decoded its own source).

Oracles: float64 Jacobians of the logits (``clients.jacobians``) with the positions each model's loss scores.
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from hf_models import PAD, VOCAB, labelled_batch, tiny_gpt2

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor

transformers = clients.need("transformers")


def _prompted(lengths: list[int], prompt: int, seed: int) -> dict[str, torch.Tensor]:
    """:func:`labelled_batch` with the first ``prompt`` labels of each input -100 too (a fine-tuning collator's
    prompt masking)."""
    batch = labelled_batch(lengths, seed)
    batch["labels"][:, :prompt] = -100
    return batch


def _scored(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, T)``: the positions a causal LM's loss scores, where the next label is not -100."""
    return torch.nn.functional.pad(batch["labels"][:, 1:], (0, 1), value=-100) != -100


def test_a_causal_lms_labels_leave_out_the_positions_its_loss_does_not_score() -> None:
    """Exact diag over the scored positions only: the prompt (-100), the padding and each input's last token."""
    model, batch = tiny_gpt2(), _prompted([5, 4, 3], prompt=2, seed=7)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    jac, logits = clients.jacobians(model, kwargs=inputs, output="logits")
    want = clients.categorical_diag(jac, logits, VOCAB, _scored(batch))
    got = torchfim.fisher(model, batch, structure="diag")
    assert clients.rel_err(got, want) < 1e-10
    # counting every real token instead (what it did before) is far off
    assert clients.rel_err(clients.categorical_diag(jac, logits, VOCAB, batch["attention_mask"]), want) > 0.1
    with_mask = torchfim.fisher(model, batch, structure="diag", mask="attention_mask")  # the same: labels ⊂ mask
    assert clients.rel_err(with_mask, want) < 1e-10


def test_the_monitor_and_the_score_estimate_cover_the_same_positions() -> None:
    """The score estimate and the monitor's Tr(F) are unbiased for the exact trace over the scored positions:
    within 4 standard errors (of 400 labels per input) of it, and many from the trace over every real token."""
    model, batch = tiny_gpt2(), _prompted([5, 4, 3], prompt=2, seed=8)
    exact = float(torchfim.fisher(model, batch, structure="trace"))
    every_token = float(torchfim.fisher(model, {k: v for k, v in batch.items() if k != "labels"},
                                        structure="trace", mask="attention_mask"))
    est, se = torchfim.fisher(model, batch, estimator="score", structure="trace", n_samples=400,
                              generator=torch.Generator().manual_seed(3), return_stderr=True)
    assert abs(float(est) - exact) < 4 * float(se) and abs(every_token - exact) > 10 * float(se)
    # The monitor's stderr also covers the sampling of inputs (3 here): its label noise is the score estimate's, se.
    monitor = FisherTraceMonitor(model, batch, every=1, n_samples=400, generator=torch.Generator().manual_seed(4))
    assert abs(monitor.step(0).trace - exact) < 4 * float(se)


def test_the_monitors_and_callbacks_docstrings_say_what_the_labels_do() -> None:
    """Their ``inputs`` entries said target keys such as ``labels`` are dropped (a user trial read that the callback
    counts every position of a Trainer batch); the labels decide which positions count, as tested above."""
    from torchfim.train.trainer_callback import FisherTraceCallback

    for doc in (FisherTraceMonitor.__doc__, FisherTraceCallback.__doc__):
        entry = " ".join(doc.split("inputs:", 1)[1].split("every:", 1)[0].split())
        assert "dropped" not in entry and "decide which positions count" in entry and "-100" in entry, entry


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_the_penalty_leaves_out_what_the_loss_leaves_out(kind: str) -> None:
    """The penalty on a batch whose labels hold -100 equals the penalty with those positions masked (the same
    draws: one generator seed), value and gradient; without the labels it differs."""
    model, batch = tiny_gpt2(), _prompted([5, 4, 3], prompt=2, seed=9)
    params = [p for p in model.parameters() if p.requires_grad]

    def term(inputs: dict[str, torch.Tensor], **kw: object) -> list[torch.Tensor]:
        pen = FisherPenalty(model, alpha=0.5, kind=kind, generator=torch.Generator().manual_seed(5))
        value = pen(inputs, step=0, **kw)
        return [value.detach(), *torch.autograd.grad(value, params, allow_unused=True)]

    got = term(batch)
    want = term({k: v for k, v in batch.items() if k != "labels"}, mask=_scored(batch))
    for g, w in zip(got, want):
        assert (g is None and w is None) or torch.allclose(g, w, rtol=1e-10, atol=1e-14)
    unlabelled = term({k: v for k, v in batch.items() if k != "labels"}, mask=batch["attention_mask"].bool())
    assert not torch.allclose(got[0], unlabelled[0], rtol=1e-3)


def tiny_bart_generator() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=16, pad_token_id=PAD, bos_token_id=2,
                                     eos_token_id=1, decoder_start_token_id=1, attn_implementation="eager")
    return transformers.BartForConditionalGeneration(config).double().eval()


def test_an_encoder_decoders_labels_are_not_shifted_and_build_its_decoder_inputs() -> None:
    """BART on a Trainer-style batch ``{input_ids, attention_mask, labels}``: the decoder reads
    ``shift_tokens_right(labels)`` as the model builds it, and the logits at position t pair with ``labels[t]``
    (its loss); exact diag against the Jacobian oracle on those decoder inputs, the empirical trace against
    per-input autograd of its loss. Before: the shift of a causal LM, and the decoder fed the source."""
    model = tiny_bart_generator()
    g = torch.Generator().manual_seed(11)
    ids, labels = torch.randint(3, VOCAB, (3, 6), generator=g), torch.randint(3, VOCAB, (3, 4), generator=g)
    labels[2, 3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    decoder = transformers.models.bart.modeling_bart.shift_tokens_right(labels, PAD, 1)
    inputs = {"input_ids": ids, "attention_mask": batch["attention_mask"], "decoder_input_ids": decoder}
    jac, logits = clients.jacobians(model, kwargs=inputs, output="logits")
    want = clients.categorical_diag(jac, logits, VOCAB, labels != -100)
    assert clients.rel_err(torchfim.fisher(model, batch, structure="diag"), want) < 1e-10
    params = [p for p in model.parameters() if p.requires_grad]
    empirical = 0.0
    for i in range(3):
        out = model(**{k: v[i : i + 1] for k, v in inputs.items()}).logits[0]
        loss = torch.nn.functional.cross_entropy(out, labels[i], reduction="sum")  # ignore_index=-100
        empirical += sum(float(t.square().sum()) for t in torch.autograd.grad(loss, params, allow_unused=True)
                         if t is not None) / 3
    got = float(torchfim.fisher(model, batch, estimator="empirical", structure="trace"))
    assert abs(got - empirical) < 1e-10 * empirical


def test_a_models_outputs_given_as_inputs_are_named() -> None:
    model = tiny_gpt2()
    out = model(input_ids=torch.randint(2, VOCAB, (2, 4)))
    for call in (lambda: torchfim.fisher(model, out), lambda: FisherTraceMonitor(model, out),
                 lambda: FisherPenalty(model, alpha=0.1)(out, step=0)):
        with pytest.raises(torchfim.TorchfimError, match=r"CausalLMOutputWithCrossAttentions with keys.*looks like a "
                                                         r"model's outputs, not its inputs"):
            call()


def test_padding_that_counts_is_warned_of_and_a_tensor_mask_takes_one_dict_batch() -> None:
    """A dict batch whose attention_mask marks padding, given no mask= and no labels: the padding counts, with a
    warning that names mask='attention_mask'; a tensor mask with one dict batch is that mini-batch's mask (before:
    refused as "inputs come in mini-batches")."""
    model, batch = tiny_gpt2(), labelled_batch([5, 3], seed=12)
    del batch["labels"]
    with pytest.warns(RuntimeWarning, match=r"attention_mask marks 2 padding positions, counted as observed since.*"
                                            r"mask='attention_mask'"):
        torchfim.fisher(model, batch, structure="trace")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        named = torchfim.fisher(model, batch, structure="trace", mask="attention_mask")
        given = torchfim.fisher(model, batch, structure="trace", mask=batch["attention_mask"].bool())
    assert torch.equal(named, given)


def test_an_encoder_decoders_source_padding_is_not_taken_for_output_padding() -> None:
    """BART with a padded source as long as its labels: the attention_mask is the encoder's, so no padding warning
    (its advice, mask='attention_mask', would mask decoder positions by the source's padding); and the report
    reads the decoder's positions, with the labels kept (before: the source decoded, the labels refused as not
    fitting, the empirical Fisher skipped)."""
    model = tiny_bart_generator()
    g = torch.Generator().manual_seed(1)
    ids, labels = torch.randint(3, VOCAB, (2, 4), generator=g), torch.randint(3, VOCAB, (2, 3), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 2:], ids[1, 2:] = 0, PAD
    batch = {"input_ids": ids, "attention_mask": mask, "labels": torch.cat([labels, labels[:, :1]], 1)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        torchfim.fisher(model, batch, structure="trace")
    from torchfim.report.check import check_model_and_data
    from torchfim.report.data import as_data

    shorter = {**batch, "labels": labels}  # 3 decoder positions against a source of 4
    data, note, layout, _ = check_model_and_data(model, as_data(shorter, "test"), torchfim.families.Categorical(),
                                                 "categorical", None, None)
    assert note is None and data.targets is not None and layout.positions == (3,)
    # mask='attention_mask' would mask the decoder's positions by the source's padding (silently, where the two are as
    # long: BART's Tr(F) 29% low in a trial): refused with the fix, by the library and the penalty alike
    with pytest.raises(torchfim.TorchfimError, match="mask='attention_mask' on an encoder-decoder.*decoder_attention"):
        torchfim.fisher(model, batch, structure="trace", mask="attention_mask")
    penalty = torchfim.train.FisherPenalty(model, generator=torch.Generator().manual_seed(0))
    with pytest.raises(torchfim.TorchfimError, match="mask='attention_mask' on an encoder-decoder"):
        penalty(batch, step=0, mask="attention_mask")


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_the_penalty_warns_of_padding_it_counts_as_fisher_does(grad_method: str) -> None:
    """docs/training.md's PenalisedTrainer recipe passes no mask=: on a padded batch without labels -100 there, the
    penalty draws labels at the padding too. It is warned of once (the penalty was silent), and not where
    mask='attention_mask' is given or the labels leave the padding out."""
    model, batch = tiny_gpt2(), labelled_batch([5, 3], seed=13)
    unlabelled = {k: v for k, v in batch.items() if k != "labels"}
    pen = FisherPenalty(model, alpha=0.1, grad_method=grad_method, generator=torch.Generator().manual_seed(1))
    with pytest.warns(RuntimeWarning, match=r"attention_mask marks 2 padding positions, counted as observed since"):
        pen(unlabelled, step=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        pen(unlabelled, step=1)  # once per penalty
        for inputs, mask in ((unlabelled, "attention_mask"), (batch, None)):
            fresh = FisherPenalty(model, alpha=0.1, grad_method=grad_method, generator=torch.Generator().manual_seed(1))
            fresh.penalised_loss(inputs, lambda out: out.logits.sum(), step=0, mask=mask)


@pytest.mark.parametrize("wrapper", ["DataParallel", "DistributedDataParallel", "compiled"])
def test_a_wrapped_causal_lm_reads_its_labels_as_the_bare_one(wrapper: str) -> None:
    """The wrapper has no ``loss_function``: a causal LM in DistributedDataParallel (as docs/training.md builds the
    penalty) had its labels read unshifted, the last token of each input counted (a processes trial: exact Tr(F)
    178.1 against the brute force's 132.4). Exact, empirical, the monitor and the penalty equal the bare model's,
    and the exact diagonal the float64 oracle over the scored positions."""
    from processes import one_process_group

    model, batch = tiny_gpt2(), _prompted([5, 4, 3], prompt=1, seed=10)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    jac, logits = clients.jacobians(model, kwargs=inputs, output="logits")
    want = clients.categorical_diag(jac, logits, VOCAB, _scored(batch))

    def measured(m: torch.nn.Module) -> list[torch.Tensor]:
        monitor = FisherTraceMonitor(m, batch, every=1, generator=torch.Generator().manual_seed(4))
        penalty = FisherPenalty(m, alpha=0.5, generator=torch.Generator().manual_seed(5))
        return [torchfim.fisher(m, batch, structure="diag"),
                torchfim.fisher(m, batch, estimator="empirical", structure="trace"),
                torch.tensor(monitor.step(0).trace, dtype=torch.float64), penalty(batch, step=0).detach()]

    bare = measured(model)
    assert clients.rel_err(bare[0], want) < 1e-10
    with warnings.catch_warnings(), one_process_group() if wrapper == "DistributedDataParallel" else nullcontext():
        warnings.simplefilter("ignore")  # torch.compile's and DDP's own notes
        wrapped = {"DataParallel": lambda: torch.nn.DataParallel(model),
                   "DistributedDataParallel": lambda: torch.nn.parallel.DistributedDataParallel(model),
                   "compiled": lambda: torch.compile(model)}[wrapper]()
        for got, expected in zip(measured(wrapped), bare):
            assert torch.allclose(got, expected, rtol=1e-10, atol=1e-14)
