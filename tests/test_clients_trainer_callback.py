"""``FisherTraceCallback`` in transformers' own ``Trainer`` (a BERT classifier built from a config, on CPU).

Oracles: a monitor of copies of the model taken at the measured steps, measured in order with the same
generator, records exactly what the callback records; a run resumed from a checkpoint records exactly what
the uninterrupted run does, and its CSV file holds the same rows. Given the trainer, the callback's records are
the trainer's log entries and TensorBoard's scalars (transformers' own ``TensorBoardCallback``), once each.
"""

from __future__ import annotations

import copy
import csv
import shutil

import clients
import pytest
import torch

transformers = clients.need("transformers")

from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from torchfim import TorchfimError  # noqa: E402
from torchfim.train import FisherTraceMonitor  # noqa: E402
from torchfim.train.trainer_callback import CSV_NAME, STATE_NAME, FisherTraceCallback  # noqa: E402

STEPS, EVERY, SAVE = 10, 2, 4
OPTIONS = {"subset": 8, "control_variate": True}

g = torch.Generator().manual_seed(0)
IDS = torch.randint(1, 40, (64, 8), generator=g)
MASK = torch.ones(64, 8, dtype=torch.long)
MASK[::3, 6:] = 0
LABELS = torch.randint(0, 3, (64,), generator=g)
DATA = [{"input_ids": IDS[i], "attention_mask": MASK[i], "labels": LABELS[i]} for i in range(64)]
HELD = {"input_ids": IDS[:16], "attention_mask": MASK[:16]}


def _model() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=3)
    return BertForSequenceClassification(config).double()


class _Snapshots(TrainerCallback):
    """Copies of the model at the steps the callback measures (registered after it)."""

    def __init__(self) -> None:
        self.models: dict[int, torch.nn.Module] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.models[state.global_step] = copy.deepcopy(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % EVERY == 0:
            self.models[state.global_step] = copy.deepcopy(model)


def _args(out, logged: bool = False, logging_steps: int | None = None) -> TrainingArguments:
    """``logging_steps``: the trainer logs its training loss every so many steps (None: it logs nothing)."""
    return TrainingArguments(output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, save_steps=SAVE,
                             report_to=["tensorboard"] if logged else [], use_cpu=True, seed=0, disable_tqdm=True,
                             logging_strategy="no" if logging_steps is None else "steps",
                             logging_steps=logging_steps or 500, learning_rate=1e-2)


def _train(out, resume=None, *extra, logged: bool = False, logging_steps: int | None = None) -> FisherTraceCallback:
    """``logging_steps``: see :func:`_args`."""
    trainer = Trainer(model=_model(), args=_args(out, logged, logging_steps), train_dataset=DATA, callbacks=list(extra))
    callback = FisherTraceCallback(HELD, every=EVERY, trainer=trainer if logged else None, **OPTIONS)
    trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    callback.log_history = trainer.state.log_history
    return callback


def _records(callback: FisherTraceCallback) -> list[tuple]:
    return [(r.step, r.trace, r.stderr, r.variance_ratio) for r in callback.history]


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [row[:5] + row[6:] for row in csv.reader(f)]  # without the seconds column


def test_the_callback_measures_the_trainers_model_at_its_steps(tmp_path) -> None:
    snapshots = _Snapshots()
    callback = _train(tmp_path, None, snapshots)
    assert [r.step for r in callback.history] == list(range(0, STEPS + 1, EVERY))
    reference = FisherTraceMonitor(snapshots.models[0], HELD, **OPTIONS)
    want = []
    for step, model in sorted(snapshots.models.items()):
        reference.model = model  # the same monitor (its generator, windows and chains) on the step's copy
        record = reference.measure(step)
        want.append((record.step, record.trace, record.stderr, record.variance_ratio))
    assert _records(callback) == want
    assert len(_rows(tmp_path / CSV_NAME)) == len(want) + 1


def test_a_resumed_trainer_records_what_the_uninterrupted_one_does(tmp_path) -> None:
    whole = _train(tmp_path / "whole")
    _train(tmp_path / "cut")
    for later in range(2 * SAVE, STEPS + 1, SAVE):  # as if the run had died after the checkpoint of step SAVE
        shutil.rmtree(tmp_path / "cut" / f"checkpoint-{later}", ignore_errors=True)
    resumed = _train(tmp_path / "cut", tmp_path / "cut" / f"checkpoint-{SAVE}")
    assert _records(resumed) == _records(whole)
    assert _rows(tmp_path / "cut" / CSV_NAME) == _rows(tmp_path / "whole" / CSV_NAME)
    (tmp_path / "cut" / f"checkpoint-{SAVE}" / STATE_NAME).unlink()
    with pytest.warns(RuntimeWarning, match=f"resumes at step {SAVE} without a saved monitor state") as caught:
        afresh = _train(tmp_path / "cut", tmp_path / "cut" / f"checkpoint-{SAVE}")
    assert {w.filename for w in caught if "monitor state" in str(w.message)} == {__file__}  # trainer.train's line
    assert [r.step for r in afresh.history] == list(range(SAVE + EVERY, STEPS + 1, EVERY))
    rows = _rows(tmp_path / "cut" / CSV_NAME)  # the dead run's rows up to the checkpoint, then the new ones
    assert [int(r[0]) for r in rows[1:]] == list(range(0, SAVE + 1, EVERY)) + list(range(SAVE + EVERY, STEPS + 1, EVERY))
    assert rows[1:] != _rows(tmp_path / "whole" / CSV_NAME)[1:]  # fresh labels after the checkpoint
    _train(tmp_path / "cut")  # a run from step 0 in the same folder: its own rows only
    assert _rows(tmp_path / "cut" / CSV_NAME) == _rows(tmp_path / "whole" / CSV_NAME)


def test_a_run_resumed_into_another_output_dir_loads_the_state_of_the_checkpoint_it_is_given(tmp_path) -> None:
    """Before, the callback looked for its state in the new ``output_dir``'s ``checkpoint-N``, warned that it was
    missing and recorded afresh (3 records from step 6, against the uninterrupted run's 6)."""
    whole = _train(tmp_path / "whole")
    _train(tmp_path / "cut")
    resumed = _train(tmp_path / "other", tmp_path / "cut" / f"checkpoint-{SAVE}")
    assert _records(resumed) == _records(whole)
    assert _rows(tmp_path / "other" / CSV_NAME) == _rows(tmp_path / "whole" / CSV_NAME)


def _logged(log_history: list[dict]) -> list[tuple]:
    return [(e["step"], e["fisher_trace"], e["fisher_trace_stderr"], e["fisher_trace_variance_ratio"])
            for e in log_history if "fisher_trace" in e]


def test_given_the_trainer_the_records_go_to_its_logs_once(tmp_path) -> None:
    whole = _train(tmp_path / "whole", logged=True)
    assert _logged(whole.log_history) == _records(whole) and len(whole.history) == STEPS // EVERY + 1
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = (tmp_path / "whole" / "runs").iterdir()
    events = EventAccumulator(str(run))
    events.Reload()
    scalars = [(e.step, e.value) for e in events.Scalars("train/fisher_trace")]
    assert scalars == [(r.step, pytest.approx(r.trace, rel=1e-6)) for r in whole.history]  # float32 in the file
    _train(tmp_path / "cut", logged=True)
    resumed = _train(tmp_path / "cut", tmp_path / "cut" / f"checkpoint-{SAVE}", logged=True)
    assert _logged(resumed.log_history) == _records(whole)  # the checkpoint's entries, then the new ones
    assert not _logged(_train(tmp_path / "plain").log_history)
    with pytest.raises(TorchfimError, match="must be the transformers Trainer it is added to"):
        FisherTraceCallback(HELD, trainer=Trainer)  # the class, not the trainer


def _losses(log_history: list[dict]) -> list[tuple]:
    return [(e["step"], e["loss"], e["grad_norm"], e["learning_rate"]) for e in log_history if "loss" in e]


@pytest.mark.parametrize("logging_steps", [EVERY, 3])
def test_given_the_trainer_its_own_loss_logs_are_kept(tmp_path, logging_steps: int) -> None:
    """The trainer's loss entries are those of the run whose callback is not given the trainer, beside the records.
    Before, logging a record cleared the trainer's ``should_log`` at each measured step: with ``every ==
    logging_steps`` no loss was logged at all, and otherwise the next loss averaged two intervals."""
    plain = _train(tmp_path / "plain", logging_steps=logging_steps)
    logged = _train(tmp_path / "logged", logged=True, logging_steps=logging_steps)
    want = _losses(plain.log_history)
    assert [step for step, *_ in want] == list(range(logging_steps, STEPS + 1, logging_steps))
    assert _losses(logged.log_history) == want
    assert _logged(logged.log_history) == _records(logged) == _records(plain)


VAL = {"input_ids": IDS[16:32], "attention_mask": MASK[16:32]}


def _train_pair(out, resume=None, **kwargs: object) -> list[FisherTraceCallback]:
    """A trainer with two callbacks, on ``HELD`` and on ``VAL``, named ``train`` and ``val`` (``kwargs``: each's
    arguments instead, as a pair)."""
    trainer = Trainer(model=_model(), args=_args(out, logged=True), train_dataset=DATA)
    kwargs = {"name": ("train", "val"), **kwargs}
    pair = [FisherTraceCallback(held, every=EVERY, trainer=trainer, **{k: v[i] for k, v in kwargs.items()}, **OPTIONS)
            for i, held in enumerate((HELD, VAL))]
    for callback in pair:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    pair[0].log_history = trainer.state.log_history
    return pair


def test_two_named_callbacks_keep_their_own_files_and_resume(tmp_path) -> None:
    """Tr(F) on training and on validation inputs in one trainer: each callback records what it records alone, into
    its own CSV file, state file and log keys, and a resumed run records what the uninterrupted one does. Before,
    both wrote fisher_trace.csv (the second's start deleted the first's step-0 row, then their rows interleaved) and
    checkpoint-N/torchfim_monitor.pt (the second's state over the first's), and resuming refused the first's state."""
    alone = _train(tmp_path / "alone")
    whole = _train_pair(tmp_path / "whole")
    assert _records(whole[0]) == _records(alone) and [r.step for r in whole[1].history] == [r.step for r in alone.history]
    assert _rows(tmp_path / "whole" / f"train_{CSV_NAME}") == _rows(tmp_path / "alone" / CSV_NAME)
    assert len(_rows(tmp_path / "whole" / f"val_{CSV_NAME}")) == STEPS // EVERY + 2 and whole[1].history != alone.history
    logged = [(e["step"], e["train_fisher_trace"], e["train_fisher_trace_stderr"], e["train_fisher_trace_variance_ratio"])
              for e in whole[0].log_history if "train_fisher_trace" in e]
    assert logged == _records(whole[0]) and len([e for e in whole[0].log_history if "val_fisher_trace" in e]) == 6
    assert not (tmp_path / "whole" / CSV_NAME).exists()
    assert {f.name for f in (tmp_path / "whole" / f"checkpoint-{SAVE}").glob("*torchfim*")} == \
        {f"train_{STATE_NAME}", f"val_{STATE_NAME}"}
    _train_pair(tmp_path / "cut")
    for later in range(2 * SAVE, STEPS + 1, SAVE):  # as if the run had died after the checkpoint of step SAVE
        shutil.rmtree(tmp_path / "cut" / f"checkpoint-{later}", ignore_errors=True)
    resumed = _train_pair(tmp_path / "cut", tmp_path / "cut" / f"checkpoint-{SAVE}")
    for name, before, after in zip(("train", "val"), whole, resumed):
        assert _records(after) == _records(before)
        assert _rows(tmp_path / "cut" / f"{name}_{CSV_NAME}") == _rows(tmp_path / "whole" / f"{name}_{CSV_NAME}")


def test_two_callbacks_with_one_name_or_csv_file_are_refused_before_training(tmp_path) -> None:
    with pytest.raises(TorchfimError, match=r"two FisherTraceCallbacks of one Trainer have name=None: both would write "
                                            r"fisher_trace.csv, save torchfim_monitor.pt .*give each its own name"):
        _train_pair(tmp_path / "same", name=(None, None))
    assert not (tmp_path / "same" / CSV_NAME).exists()  # refused before the first measured
    trainer = Trainer(model=_model(), args=_args(tmp_path / "unseen"), train_dataset=DATA,
                      callbacks=[FisherTraceCallback(HELD), FisherTraceCallback(VAL)])  # neither given the trainer
    with pytest.raises(TorchfimError, match=r"two FisherTraceCallbacks of one Trainer have name=None"):
        trainer.train()
    with pytest.raises(TorchfimError, match=r"have name='val'.*val_fisher_trace.csv"):
        _train_pair(tmp_path / "same", name=("val", "val"))
    with pytest.raises(TorchfimError, match=r"write the same CSV file .*trace.csv, over each other's rows; give each "
                                            r"its own csv_path"):
        _train_pair(tmp_path / "same", csv_path=(tmp_path / "trace.csv",) * 2)
    # one TensorBoard folder: TensorBoard drew both under fisher/trace as one zig-zag curve
    with pytest.raises(TorchfimError, match=r"log to the same tensorboard_dir .*tb, both under the tag fisher/trace"):
        _train_pair(tmp_path / "same", tensorboard_dir=(tmp_path / "tb", str(tmp_path / "tb")))
    assert not (tmp_path / "tb").exists()
    with pytest.raises(TorchfimError, match=r"must be letters, digits, '_', '-' or '.', e.g. name='val', got 'a/b'"):
        FisherTraceCallback(HELD, name="a/b")
    twice = FisherTraceCallback(HELD)  # one instance added twice logged each record twice (a review)
    trainer = Trainer(model=_model(), args=_args(tmp_path / "twice"), train_dataset=DATA, callbacks=[twice, twice])
    with pytest.raises(TorchfimError, match=r"this FisherTraceCallback is added to the Trainer twice"):
        trainer.train()


def test_options_the_monitor_would_refuse_are_refused_when_the_callback_is_built() -> None:
    """Before, the callback took them and training stopped at its first step, inside ``trainer.train()``."""
    with pytest.raises(TorchfimError, match=r"control_variate=True needs at least 4 inputs per measurement.*got 3"):
        FisherTraceCallback(HELD, subset=3, control_variate=True)
    with pytest.raises(TorchfimError, match=r"got 1 option the monitor does not take: subsett; it takes .*subset"):
        FisherTraceCallback(HELD, subsett=3)
    with pytest.raises(TorchfimError, match=r"every must be an integer ≥ 1, got 0"):
        FisherTraceCallback(HELD, every=0)
    with pytest.raises(TorchfimError, match=r"control_variate must be True or False"):
        FisherTraceCallback(HELD, control_variate="yes")
    FisherTraceCallback(HELD, subset=4, control_variate=True, n_samples=2, across_processes=False)  # all taken


def test_held_inputs_given_as_a_generator_are_read_once() -> None:
    """The options' check at construction reads the inputs; a generator must still hold them when training begins."""
    callback = FisherTraceCallback({"input_ids": IDS[i : i + 8], "attention_mask": MASK[i : i + 8]} for i in (0, 8))
    monitor = FisherTraceMonitor(_model(), callback.inputs, mask="attention_mask")
    assert monitor.n_inputs == 16


def test_a_csv_path_of_other_data_or_a_folder_is_refused_and_kept(tmp_path) -> None:
    """A run from step 0 deleted whatever file csv_path named (a user's results were lost, in a review), and a folder
    raised a bare IsADirectoryError; an earlier run's records are still started afresh."""
    mine = tmp_path / "my_results.csv"
    mine.write_text("epoch,accuracy\n1,0.91\n")
    trainer = Trainer(model=_model(), args=_args(tmp_path / "a"), train_dataset=DATA)
    trainer.add_callback(FisherTraceCallback(HELD, every=EVERY, csv_path=mine))
    with pytest.raises(TorchfimError, match="holds other data"):
        trainer.train()
    assert mine.read_text() == "epoch,accuracy\n1,0.91\n"
    folder = tmp_path / "folder"
    folder.mkdir()
    trainer = Trainer(model=_model(), args=_args(tmp_path / "b"), train_dataset=DATA)
    trainer.add_callback(FisherTraceCallback(HELD, every=EVERY, csv_path=folder))
    with pytest.raises(TorchfimError, match="is a folder; name the CSV file"):
        trainer.train()
    earlier = tmp_path / "earlier.csv"
    earlier.write_text("step,trace,stderr,n_inputs,n_samples,seconds\n99,1.0,0.1,16,1,0.01\n")
    callback = FisherTraceCallback(HELD, every=EVERY, csv_path=earlier)
    trainer = Trainer(model=_model(), args=_args(tmp_path / "c"), train_dataset=DATA, callbacks=[callback])
    trainer.train()
    assert [row[0] for row in _rows(earlier)[1:]] == [str(s) for s in range(0, STEPS + 1, EVERY)]


def test_a_csv_file_whose_header_was_cut_while_written_is_started_afresh(tmp_path) -> None:
    """A run killed while writing its first record (the header and the record are one write) left the header cut
    short; the same command run again was refused, the file said to hold other data. It holds no record: a run from
    step 0 starts it afresh, as it does an earlier run's records."""
    cut = tmp_path / "cut.csv"
    cut.write_text("step,trace,std")
    callback = FisherTraceCallback(HELD, every=EVERY, csv_path=cut)
    trainer = Trainer(model=_model(), args=_args(tmp_path / "a"), train_dataset=DATA, callbacks=[callback])
    trainer.train()
    assert [row[0] for row in _rows(cut)[1:]] == [str(s) for s in range(0, STEPS + 1, EVERY)]
