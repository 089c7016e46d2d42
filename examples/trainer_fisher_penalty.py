"""The Fisher penalty and the Tr(F) monitor in transformers' own ``Trainer`` (needs ``transformers``).

A small BERT classifier, built from a config (no download), learns a rule of synthetic token sequences twice with
the same seed: once plainly, once with the Fisher penalty of Jastrzębski et al. (2021) through docs/training.md's
``compute_loss`` recipe, both with gradient accumulation (two micro-batches per step). Early in the plain run Tr(F)
rises far above where it ends (the early peak the paper studies); the penalty holds it down while the rule is learnt. ``FisherTraceCallback``
measures Tr(F) on held sequences every 10 optimiser steps (into ``output_dir/fisher_trace.csv``), and
``FisherPenaltyCallback`` keeps the penalty's state in the checkpoints. Run: ``python examples/trainer_fisher_penalty.py``
(one to two minutes on 2 cores: 78 s and 113 s measured on a shared machine).
"""

from __future__ import annotations

import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from torchfim.train import FisherPenalty
from torchfim.train.trainer_callback import FisherPenaltyCallback, FisherTraceCallback

g = torch.Generator().manual_seed(0)
IDS = torch.randint(1, 30, (512, 12), generator=g)
LABELS = IDS[:, 0] % 3  # the rule to learn: the class of the first token
DATA = [{"input_ids": IDS[i], "labels": LABELS[i]} for i in range(len(IDS))]
HELD = {"input_ids": torch.randint(1, 30, (64, 12), generator=g)}


def bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config)


def train(penalised: bool, out: str) -> tuple[list, float]:
    """Tr(F) records of the run and its final accuracy on the training sequences."""
    model = bert()
    pen = FisherPenalty(model, alpha=0.05, every=1, generator=torch.Generator().manual_seed(1))

    class PlainTrainer(Trainer):
        loss_is_scaled_for_ga = False  # a micro-batch mean: divided by the Trainer under gradient accumulation
        # (BERT's classifier takes loss keyword arguments but its loss ignores them: without this line the plain
        # Trainer would sum the micro-batches' means)

    class PenalisedTrainer(PlainTrainer):  # docs/training.md's recipe
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if return_outputs or not model.training:  # evaluation: the task loss alone
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return pen.penalised_loss(inputs, lambda out: out.loss, step=self.state.global_step, model=model)

    monitor = FisherTraceCallback(HELD, every=10)
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=16, gradient_accumulation_steps=2,
                             max_steps=40, learning_rate=3e-3, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, logging_strategy="no", save_strategy="no")
    trainer_class = PenalisedTrainer if penalised else PlainTrainer
    callbacks = [monitor, FisherPenaltyCallback(pen)] if penalised else [monitor]
    trainer_class(model=model, args=args, train_dataset=DATA, callbacks=callbacks).train()
    with torch.no_grad():
        accuracy = (model.eval()(input_ids=IDS).logits.argmax(-1) == LABELS).float().mean().item()
    return monitor.history, accuracy


if __name__ == "__main__":
    runs, accuracy = {}, {}
    for penalised in (False, True):
        name = "penalised" if penalised else "plain"
        with tempfile.TemporaryDirectory() as out:
            runs[name], accuracy[name] = train(penalised, out)
    print(f"{'step':>4}  {'plain Tr(F)':>18}  {'penalised Tr(F)':>18}")
    for a, b in zip(runs["plain"], runs["penalised"]):
        print(f"{a.step:>4}  {a.trace:>10.3f} ± {a.stderr:<5.3f}  {b.trace:>10.3f} ± {b.stderr:<5.3f}")
    peak = {name: max(runs[name], key=lambda r: r.trace) for name in runs}
    print(f"peak Tr(F): {peak['penalised'].trace:.3f} (step {peak['penalised'].step}) with the penalty, "
          f"{peak['plain'].trace:.3f} (step {peak['plain'].step}) without; training accuracy "
          f"{accuracy['penalised']:.1%} with it, {accuracy['plain']:.1%} without")
