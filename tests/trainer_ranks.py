"""One process of the two-process ``Trainer`` runs of tests/test_clients_trainer_processes.py.

Run by ``torch.distributed.run --standalone --nproc_per_node 2 trainer_ranks.py ROOT PHASE``. For each gradient
method, a penalised ``Trainer`` (docs/training.md's recipe, ``model=model``) trains a BERT classifier under
``DistributedDataParallel`` (gloo, CPU) with both torchfim callbacks; each process draws its labels from its
own generator. Phase ``whole`` trains from step 0 in ``ROOT/<method>/whole``, phase ``resume`` resumes
``ROOT/<method>/cut`` from its ``checkpoint-2``. Each process saves what the test checks in
``ROOT/<method>/<phase>-<rank>.pt``: the batches it trained on, the parameters and the (averaged) gradients
the optimiser received at each step, the final parameters, the monitor's records, the warnings raised, and
those of one penalised loss taken through the bare model instead of the wrapper.
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import clients  # noqa: F401  (before transformers: hides a torchvision that cannot load)
import torch
from doc_blocks import code_blocks
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

from torchfim.train import FisherPenalty
from torchfim.train.trainer_callback import FisherPenaltyCallback, FisherTraceCallback

METHODS = ("exact", "finite_difference")
STEPS, SAVE, EVERY, ALPHA = 4, 2, 2, 0.5

g = torch.Generator().manual_seed(0)
IDS = torch.randint(1, 40, (32, 8), generator=g)
LABELS = torch.randint(0, 3, (32,), generator=g)
DATA = [{"input_ids": IDS[i], "labels": LABELS[i]} for i in range(32)]
HELD = {"input_ids": IDS[:12]}


def model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).double()


def model_at(params: list[torch.Tensor]) -> BertForSequenceClassification:
    """The model with the parameters ``params``."""
    net = model()
    with torch.no_grad():
        for p, value in zip(net.parameters(), params, strict=True):
            p.copy_(value)
    return net


def penalty(net: torch.nn.Module, method: str, rank: int) -> FisherPenalty:
    return FisherPenalty(net, alpha=ALPHA, grad_method=method, generator=torch.Generator().manual_seed(3 + rank))


def _documented_recipe() -> tuple[type[Trainer], dict]:
    """docs/training.md's ``PenalisedTrainer``, as written there, and the namespace its ``pen`` is looked up in."""
    blocks = code_blocks("docs/training.md")
    namespace = {"Trainer": Trainer}
    exec(next(b for b in blocks if "class PenalisedTrainer(Trainer):" in b), namespace)
    return namespace["PenalisedTrainer"], namespace


_Recipe, _RECIPE = _documented_recipe()


class PenalisedTrainer(_Recipe):
    """docs/training.md's recipe, run as written with this trainer's penalty as its ``pen``, recording each step's
    batch."""

    def __init__(self, *args, penalty: FisherPenalty, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.penalty, self.batches = penalty, []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model.training and not return_outputs:
            self.batches.append({k: v.clone() for k, v in inputs.items()})
        _RECIPE["pen"] = self.penalty
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


class Steps(TrainerCallback):
    """The parameters and the gradients the optimiser receives, at every step."""

    def __init__(self) -> None:
        self.params, self.grads = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.params.append([p.detach().clone() for p in model.parameters()])
        self.grads.append([p.grad.clone() for p in model.parameters()])


def _run(root: Path, method: str, phase: str, rank: int) -> None:
    out = root / method / ("whole" if phase == "whole" else "cut")
    net = model()
    pen, steps, monitor = penalty(net, method, rank), Steps(), FisherTraceCallback(HELD, every=EVERY)
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=STEPS, save_steps=SAVE,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no",
                             learning_rate=1e-2, max_grad_norm=0.0, ddp_backend="gloo")
    trainer = PenalisedTrainer(model=net, args=args, train_dataset=DATA, penalty=pen,
                               callbacks=[monitor, FisherPenaltyCallback(pen), steps])
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train(resume_from_checkpoint=None if phase == "whole" else str(out / f"checkpoint-{SAVE}"))
    with warnings.catch_warnings(record=True) as unsynchronised:  # the bare model, which DDP does not see
        warnings.simplefilter("always")
        penalty(model(), method, rank).penalised_loss({"input_ids": IDS[:4], "labels": LABELS[:4]},
                                                     lambda out: out.loss, step=0)
    torch.save({"batches": trainer.batches, "params": steps.params, "grads": steps.grads,
                "final": [p.detach().clone() for p in net.parameters()],
                "records": [(r.step, r.trace, r.stderr) for r in monitor.history],
                "warnings": [str(w.message) for w in seen],
                "bare": [str(w.message) for w in unsynchronised]}, root / method / f"{phase}-{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo" if sys.platform.startswith("linux") else "lo0")
    for name in METHODS:
        _run(Path(sys.argv[1]), name, sys.argv[2], int(os.environ["RANK"]))
