"""``FisherPenalty`` in transformers' own ``Trainer``, by docs/training.md's recipe run as that page writes it
(``trainer_ranks.PenalisedTrainer``): a ``compute_loss`` that returns
``pen.penalised_loss(inputs, task_loss, step=self.state.global_step, model=model)``, ``task_loss`` the model's own
``out.loss`` (a BERT classifier built from a config, CPU, no dropout, no gradient clipping), with and without
gradient accumulation; its ``log`` adds the task loss and the penalty to the training loss's log entries.

Oracle: at every optimiser step, the gradient the Trainer hands its optimiser equals the gradient of
``out.loss + penalty`` computed by hand on a copy of the model at that step, on the batch the Trainer used,
with a penalty drawing from a generator seeded alike (exact double backprop: to 1e-12; the finite difference:
to the O(ε) of the task gradient taken at θ + ε ĝ, 1e-6 here). With ``FisherPenaltyCallback``, a run resumed
from a checkpoint ends with the uninterrupted run's parameters, bit for bit.
"""

from __future__ import annotations

import shutil
import warnings

import clients
import pytest
import torch

transformers = clients.need("transformers")

from trainer_ranks import DATA, PenalisedTrainer, Steps, model_at  # noqa: E402
from trainer_ranks import model as _model  # noqa: E402
from transformers import TrainerCallback, TrainingArguments  # noqa: E402

import torchfim  # noqa: E402
from torchfim.train import FisherPenalty  # noqa: E402

STEPS = 3


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_the_trainer_steps_on_task_plus_penalty(tmp_path, method: str) -> None:
    model = _model()
    penalty = FisherPenalty(model, alpha=0.5, grad_method=method, generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=STEPS,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no",
                             save_strategy="no", learning_rate=1e-2, max_grad_norm=0.0)
    steps = Steps()
    trainer = PenalisedTrainer(model=model, args=args, train_dataset=DATA, callbacks=[steps], penalty=penalty)
    trainer.train()
    assert len(steps.grads) == STEPS == len(trainer.batches) and penalty.last_step == STEPS - 1
    generator = torch.Generator().manual_seed(3)  # the labels the Trainer's penalty drew, in the same order
    tol = 1e-12 if method == "exact" else 1e-6
    for step, (at, got, batch) in enumerate(zip(steps.params, steps.grads, trainer.batches)):
        at_step = model_at(at)
        params = list(at_step.parameters())
        loss = at_step(**batch).loss + FisherPenalty(at_step, alpha=0.5, generator=generator)(batch, step=step)
        want = torch.autograd.grad(loss, params)
        scale = max(float(w.abs().max()) for w in want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


def _grads(params: list[torch.Tensor], batch: dict, step: int | None = None,
           generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """At the parameters ``params``, the gradient of ``out.loss`` on ``batch`` (``step`` None), or of the penalty on it
    with labels from ``generator``."""
    at = model_at(params)
    loss = at(**batch).loss if step is None else FisherPenalty(at, alpha=0.5, generator=generator)(batch, step=step)
    return list(torch.autograd.grad(loss, list(at.parameters())))


def _mean(parts: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [sum(same) / len(parts) for same in zip(*parts)]


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_gradient_accumulation_averages_the_micro_batches(tmp_path, method: str) -> None:
    """Two micro-batches of 4 per optimiser step, every=2: a computed step hands the optimiser the mean over its
    micro-batches of ``out.loss + penalty``; the step after, the mean of their task gradients plus the mean of the
    computed step's penalty gradients. Before, the recipe's loss counted as scaled for accumulation (the model takes
    loss keyword arguments), so the Trainer summed the micro-batches: twice the gradient; and the step after reused
    the last micro-batch's penalty gradient alone."""
    model, ga = _model(), 2
    penalty = FisherPenalty(model, alpha=0.5, every=2, grad_method=method, generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=ga,
                             max_steps=STEPS, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                             logging_strategy="no", save_strategy="no", learning_rate=1e-2, max_grad_norm=0.0)
    steps = Steps()
    trainer = PenalisedTrainer(model=model, args=args, train_dataset=DATA, callbacks=[steps], penalty=penalty)
    trainer.train()
    assert len(steps.grads) == STEPS and len(trainer.batches) == ga * STEPS
    generator, kept = torch.Generator().manual_seed(3), None  # the labels the Trainer's penalty drew, in order
    tol = 1e-12 if method == "exact" else 1e-6
    for step, (at, got) in enumerate(zip(steps.params, steps.grads)):
        batches = trainer.batches[ga * step: ga * (step + 1)]
        if step % 2 == 0:
            kept = _mean([_grads(at, b, step, generator) for b in batches])
        want = [t + k for t, k in zip(_mean([_grads(at, b) for b in batches]), kept)]
        scale = max(float(w.abs().max()) for w in want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
def test_the_logs_hold_the_task_loss_and_the_penalty_apart(tmp_path, method: str) -> None:
    """Logged every 2 steps, two micro-batches a step: each training entry's ``task_loss`` and ``fisher_penalty`` are
    the means over its 4 micro-batches of the task loss and the penalty taken by hand at each step's parameters, and
    ``loss`` (the Trainer's, summed in float32) is their sum. Before, the recipe logged ``loss`` alone: the task loss
    plus the penalty, never apart (its ``eval_loss`` the task loss alone)."""
    model, ga = _model(), 2
    penalty = FisherPenalty(model, alpha=0.5, grad_method=method, generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=ga,
                             max_steps=4, report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="steps",
                             logging_steps=2, save_strategy="no", learning_rate=1e-2, max_grad_norm=0.0)
    steps = Steps()
    trainer = PenalisedTrainer(model=model, args=args, train_dataset=DATA, callbacks=[steps], penalty=penalty)
    trainer.train()
    generator, task, pen = torch.Generator().manual_seed(3), [], []  # the labels the Trainer's penalty drew, in order
    for step, at in enumerate(steps.params):
        for batch in trainer.batches[ga * step: ga * (step + 1)]:
            with torch.no_grad():
                task.append(float(model_at(at)(**batch).loss))
            pen.append(float(FisherPenalty(model_at(at), alpha=0.5, generator=generator)(batch, step=step).detach()))
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["step"] for e in logged] == [2, 4]
    rel = 1e-12 if method == "exact" else 1e-6  # the finite difference's task loss is taken at θ + εĝ
    for k, entry in enumerate(logged):
        assert entry["task_loss"] == pytest.approx(sum(task[4 * k: 4 * k + 4]) / 4, rel=rel)
        assert entry["fisher_penalty"] == pytest.approx(sum(pen[4 * k: 4 * k + 4]) / 4, rel=1e-10)
        assert entry["loss"] == pytest.approx(entry["task_loss"] + entry["fisher_penalty"], rel=1e-6)
        assert entry["fisher_penalty"] > 1e-3 * entry["task_loss"]


class _Values(TrainerCallback):
    """``(global_step, pen.last_step, pen.last_value)`` at the end of every optimiser step."""

    def __init__(self, penalty: FisherPenalty) -> None:
        self.penalty, self.values = penalty, []

    def on_step_end(self, args, state, control, **kwargs):
        value = self.penalty.last_value
        self.values.append((state.global_step, self.penalty.last_step, None if value is None else float(value)))


def _resumable(out, resume=None, steps: int = 6, values: list | None = None) -> list[torch.Tensor]:
    """The parameters after ``steps`` steps of a penalised Trainer (every=2) saving its checkpoints every 3 steps,
    with the penalty's state through ``FisherPenaltyCallback`` (None: without it); ``values`` gets the penalty's
    values step by step."""
    from torchfim.train.trainer_callback import FisherPenaltyCallback

    model = _model()
    penalty = FisherPenalty(model, alpha=0.5, every=2, generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=steps, save_steps=3,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no",
                             learning_rate=1e-2, max_grad_norm=0.0)
    recorded = _Values(penalty)
    trainer = PenalisedTrainer(model=model, args=args, train_dataset=DATA, penalty=penalty,
                               callbacks=[FisherPenaltyCallback(penalty), recorded])
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    if values is not None:
        values.extend(recorded.values)
    return [p.detach().clone() for p in model.parameters()]


def test_a_resumed_penalised_trainer_trains_as_the_uninterrupted_one(tmp_path) -> None:
    """Checkpoint-3 falls between two computed steps (every=2): the next step reuses the cached gradient and the
    one after draws labels from the generator, both restored from the checkpoint; without the penalty's state
    the resumed run ends elsewhere."""
    whole = _resumable(tmp_path / "whole")
    _resumable(tmp_path / "cut")
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")  # as if the run had died after checkpoint-3
    resumed = _resumable(tmp_path / "cut", tmp_path / "cut" / "checkpoint-3")
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole))
    (tmp_path / "cut" / "checkpoint-3" / "torchfim_penalty-0.pt").unlink()
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")
    with pytest.warns(RuntimeWarning, match="resumes at step 3 without a saved penalty state"):
        afresh = _resumable(tmp_path / "cut", tmp_path / "cut" / "checkpoint-3")
    assert not all(torch.equal(a, b) for a, b in zip(afresh, whole))


def test_a_run_resumed_into_another_output_dir_loads_the_penaltys_state_from_the_checkpoint_it_is_given(
        tmp_path) -> None:
    """Before, the callback looked in the new ``output_dir``'s ``checkpoint-3``, warned that the state was missing
    and went on afresh: no cached gradient at step 4 (the step reusing it), fresh labels after."""
    whole_values, resumed_values = [], []
    whole = _resumable(tmp_path / "whole", values=whole_values)
    _resumable(tmp_path / "cut")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning that the state is missing
        resumed = _resumable(tmp_path / "other", tmp_path / "cut" / "checkpoint-3", values=resumed_values)
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole, strict=True))
    assert [v[0] for v in resumed_values] == [4, 5, 6] and resumed_values == whole_values[3:]


class _TwoPenalties(transformers.Trainer):
    """A trainer whose loss is the task loss plus two penalties' terms."""

    def __init__(self, *args, penalties: list[FisherPenalty], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.penalties = penalties

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return model(**inputs).loss + sum(pen(inputs, step=self.state.global_step) for pen in self.penalties)


def _two_penalised(out, resume=None, names: tuple = ("body", "head")) -> list[torch.Tensor]:
    """The parameters after 6 steps of a trainer with two penalties (every=2 and every=3, their own generators), each
    kept by its own FisherPenaltyCallback named ``names``, saving its checkpoints every 3 steps."""
    from torchfim.train.trainer_callback import FisherPenaltyCallback

    model = _model()
    penalties = [FisherPenalty(model, alpha=0.5, every=2, generator=torch.Generator().manual_seed(3)),
                 FisherPenalty(model, alpha=0.3, every=3, generator=torch.Generator().manual_seed(7))]
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=6, save_steps=3,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no",
                             learning_rate=1e-2, max_grad_norm=0.0)
    callbacks = [FisherPenaltyCallback(pen, name=name) for pen, name in zip(penalties, names)]
    trainer = _TwoPenalties(model=model, args=args, train_dataset=DATA, penalties=penalties, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return [p.detach().clone() for p in model.parameters()]


def test_two_penalties_of_one_trainer_keep_their_states_apart_by_name(tmp_path) -> None:
    """Each callback saves its penalty's state under its name, and a run resumed from checkpoint-3 (between the
    computed steps of both) ends with the uninterrupted run's parameters, bit for bit. Before, both saved
    ``torchfim_penalty-0.pt``, the second over the first, and both loaded the second's state back (the resumed run
    ended up to 9e-3 away); two callbacks without names are now refused before training."""
    from torchfim.train.trainer_callback import FisherPenaltyCallback

    whole = _two_penalised(tmp_path / "whole")
    _two_penalised(tmp_path / "cut")
    saved = sorted(p.name for p in (tmp_path / "cut" / "checkpoint-3").glob("*torchfim_penalty*"))
    assert saved == ["body_torchfim_penalty-0.pt", "head_torchfim_penalty-0.pt"]
    shutil.rmtree(tmp_path / "cut" / "checkpoint-6")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no warning that a state is missing
        resumed = _two_penalised(tmp_path / "cut", tmp_path / "cut" / "checkpoint-3")
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole, strict=True))
    with pytest.raises(torchfim.TorchfimError, match="two FisherPenaltyCallbacks of one Trainer keep other "
                       "penalties under name=None: both would save torchfim_penalty-0.pt"):
        _two_penalised(tmp_path / "unnamed", names=(None, None))
    assert not (tmp_path / "unnamed").exists() or not any((tmp_path / "unnamed").glob("checkpoint-*"))
    with pytest.raises(torchfim.TorchfimError, match="FisherPenaltyCallback's name prefixes its state file"):
        FisherPenaltyCallback(FisherPenalty(_model()), name="a/b")


def _evaluated(out, evaluate: bool) -> tuple[PenalisedTrainer, Steps, FisherPenalty]:
    """Three penalised steps, with an evaluation after each (or none)."""
    model = _model()
    penalty = FisherPenalty(model, alpha=0.5, generator=torch.Generator().manual_seed(3))
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, logging_strategy="no", save_strategy="no",
                             learning_rate=1e-2, max_grad_norm=0.0, eval_strategy="steps" if evaluate else "no",
                             eval_steps=1, per_device_eval_batch_size=8)
    steps = Steps()
    trainer = PenalisedTrainer(model=model, args=args, train_dataset=DATA, eval_dataset=DATA[:8], penalty=penalty,
                               callbacks=[steps])
    trainer.train()
    return trainer, steps, penalty


def test_evaluation_takes_the_task_loss_and_draws_none_of_the_penaltys_labels(tmp_path) -> None:
    """The recipe hands evaluation (which asks for the outputs) to the Trainer's own compute_loss: each eval loss is
    the task loss at that step's parameters, and the evaluated run trains bit for bit as the one without evaluation.
    Before, evaluation unpacked the penalised loss as ``(loss, outputs)`` and raised."""
    evaluated, steps, penalty = _evaluated(tmp_path / "evaluated", True)
    plain, _, plain_penalty = _evaluated(tmp_path / "plain", False)
    final = [p.detach() for p in evaluated.model.parameters()]
    assert all(torch.equal(a, b.detach()) for a, b in zip(final, plain.model.parameters(), strict=True))
    assert torch.equal(penalty.generator.get_state(), plain_penalty.generator.get_state())
    losses = [(row["step"], row["eval_loss"]) for row in evaluated.state.log_history if "eval_loss" in row]
    assert [s for s, _ in losses] == [1, 2, 3]
    batch = {k: torch.stack([d[k] for d in DATA[:8]]) for k in DATA[0]}
    for step, loss in losses:
        at = model_at(steps.params[step] if step < STEPS else final)
        with torch.no_grad():
            assert float(loss) == pytest.approx(float(at.eval()(**batch).loss), rel=1e-6)
