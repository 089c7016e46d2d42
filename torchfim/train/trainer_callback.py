"""Callbacks for a Hugging Face ``Trainer``: the Tr(F) monitor, and the penalty's state in its checkpoints.

``Trainer(..., callbacks=[FisherTraceCallback(held, every=50)])`` measures Tr(F) with its standard error on
the held inputs (a dict of keyword inputs, or mini-batches of them) by a
:class:`~torchfim.train.FisherTraceMonitor` of the trainer's model, made when training begins: at step 0,
then every ``every`` optimiser steps (``state.global_step``, so gradient accumulation's micro-steps do not
count). The records go to ``callback.history`` and to ``fisher_trace.csv`` in the trainer's ``output_dir``
(``csv_path`` picks another file; a run that starts at step 0 starts it afresh). Every checkpoint the trainer
saves gets the monitor's state (``torchfim_monitor.pt`` in its ``checkpoint-N`` folder), and
``trainer.train(resume_from_checkpoint=...)`` loads it back from the checkpoint folder the trainer resumes from
(in ``output_dir`` or elsewhere: a run resumed into another ``output_dir`` goes on there), so the resumed run records exactly what the
uninterrupted one would and the CSV file is cut back to the checkpoint (:mod:`torchfim.train.checkpoint`;
without the saved state, the records start afresh there and the file keeps the rows up to it).
Under several processes every process measures its share of the held inputs (``across_processes=True``,
:mod:`torchfim.train.process_share`: each about ``1/W`` of the work, all with the same records), the first
writes the CSV file, and each saves its own state (``torchfim_monitor-<process index>.pt``); with
``across_processes=False`` the first process alone measures (tests/test_clients_trainer_processes.py).

Several callbacks in one trainer (Tr(F) on training inputs and on validation inputs) each take a ``name``, which
prefixes their files and log keys: ``name="val"`` writes ``val_fisher_trace.csv`` and
``val_torchfim_monitor.pt`` (``val_torchfim_monitor-<process index>.pt``) and logs ``val_fisher_trace``. Two of one
trainer with the same name, the same CSV file or the same ``tensorboard_dir`` would write over each other's records
and states: training refuses to begin with them.

A callback does not see the trainer, so its records reach the trainer's own logs (``state.log_history``, saved in
each checkpoint's ``trainer_state.json``, and every ``report_to`` integration: TensorBoard, Weights & Biases,
MLflow) only when it is given the trainer: ``trainer.add_callback(FisherTraceCallback(held, trainer=trainer))``.
Each measurement is then logged by ``trainer.log`` at its step, as ``fisher_trace`` and ``fisher_trace_stderr``
(and ``fisher_trace_variance_ratio`` with ``control_variate=True``; each prefixed ``<name>_`` where the
callback has a ``name``); records restored on resuming are not
logged again. The trainer's own logs (the training loss every ``logging_steps``) stay as they are without the
callback.

``FisherPenaltyCallback(pen)`` does the same for a :class:`~torchfim.train.FisherPenalty` used in the trainer's
``compute_loss`` (see docs/training.md; ``pen.penalised_loss(..., model=model)`` runs the wrapper the trainer hands
it, whose forwards alone make several processes average their gradients): its state (generator, cached
gradient) goes into every checkpoint, one file per process (``torchfim_penalty-<process index>.pt``, each
process drawing its own labels), and comes back on ``resume_from_checkpoint`` (from the folder it names), so the
resumed run trains as the uninterrupted one would. Several penalties in one trainer each take a ``name``, which
prefixes their files (``name="head"``: ``head_torchfim_penalty-<process index>.pt``); two with the same name would
save into one file and load the same state back: training refuses to begin with them.

transformers hands callbacks no checkpoint path: both callbacks read it, when training begins at a step past 0,
from the ``resume_from_checkpoint`` of the ``Trainer``'s training loop (``Trainer._inner_training_loop``); where
that cannot be read (a trainer that trains otherwise), they look in ``output_dir/checkpoint-<step>``.

Importing this module imports transformers, which torchfim does not depend on.
"""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .._batches import Inputs, reusable
from .._io import atomic_write
from .._processes import process_group
from .._words import counted
from ..errors import TorchfimError, warn_user
from .arguments import check_int
from .held import hold
from .monitor import FisherTraceMonitor
from .penalty import FisherPenalty
from .record_sinks import CsvSink
from .trace_plot import read_trace_csv
from .trace_record import COLUMNS, TraceRecord
from .window_options import check_window, check_window_options

__all__ = ["CSV_NAME", "STATE_NAME", "FisherPenaltyCallback", "FisherTraceCallback"]

CSV_NAME = "fisher_trace.csv"
STATE_NAME = "torchfim_monitor.pt"


class FisherTraceCallback(TrainerCallback):
    """A :class:`~torchfim.train.FisherTraceMonitor` of a ``Trainer``'s model (see the module docstring). It measures
    as the monitor does, in eval mode on its copy of the model (the model's Dropout and BatchNorm in training mode are
    named in one warning, :mod:`torchfim.train.eval_note`).

    Args:
        inputs: the held inputs, as :class:`~torchfim.train.FisherTraceMonitor` takes them: ``labels`` (a
            ``Trainer`` batch's) are not passed to the model, but decide which positions count (a causal language
            model's shifted, -100 left out), as for the trainer's loss; the labels of the estimate are drawn.
        every: measure on optimiser steps with ``global_step % every == 0``.
        csv_path: the CSV file (None: ``fisher_trace.csv`` in the trainer's ``output_dir``, ``<name>_fisher_trace.csv``
            with a ``name``).
        name: letters, digits, ``_``, ``-`` or ``.`` that prefix the callback's files and log keys, one name per
            callback of a trainer (None: no prefix; see the module docstring).
        trainer: the ``Trainer`` whose ``log`` each record goes through (None: the records are not logged there).
        **options: the monitor's other arguments (``family``, ``n_samples``, ``subset``, ``control_variate``,
            ``mask``, ``output``, ``class_dim``, ``generator``, ``tensorboard_dir``).

    Example:
        >>> from torchfim.train.trainer_callback import FisherTraceCallback  # doctest: +SKIP
        >>> held = tokenizer(texts, padding=True, return_tensors="pt")  # doctest: +SKIP
        >>> trainer = Trainer(model, args, train_dataset=data)  # doctest: +SKIP
        >>> trainer.add_callback(FisherTraceCallback(dict(held), every=50, mask="attention_mask",  # doctest: +SKIP
        ...                                          trainer=trainer))
    """

    def __init__(self, inputs: Inputs, every: int = 50, csv_path: str | os.PathLike | None = None,
                 trainer: Trainer | None = None, name: str | None = None, **options: object) -> None:
        _check_name("FisherTraceCallback", "file names and log keys", "val", name)
        if trainer is not None and not isinstance(trainer, Trainer):
            raise TorchfimError(f"FisherTraceCallback's trainer must be the transformers Trainer it is added to (its "
                                f"records go through trainer.log), got {trainer!r:.80}")
        inputs = reusable(inputs)  # read once: checked here, held when training begins (a generator would be spent)
        _check_monitor_options(inputs, every, options)
        self.inputs, self.every, self.csv_path, self.options = inputs, every, csv_path, options
        self.trainer, self.name = trainer, name
        self._prefix = "" if name is None else f"{name}_"
        self.monitor: FisherTraceMonitor | None = None
        self._state_name = self._prefix + STATE_NAME

    @property
    def history(self) -> list[TraceRecord]:
        """The records of this training run (those restored from a checkpoint included)."""
        return [] if self.monitor is None else self.monitor.history

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        self._check_alone(self.trainer if self.trainer is not None else _training_loop()[0], args)
        options = {"across_processes": args.world_size > 1 and process_group() is not None, **self.options}
        first = state.is_world_process_zero
        if not (first or options["across_processes"]):
            return
        if model is None:
            raise TorchfimError("FisherTraceCallback needs the trainer's model, which the Trainer passes to callbacks")
        path = self._csv_file(args)
        self._state_name = self._prefix + (f"torchfim_monitor-{args.process_index}.pt" if options["across_processes"]
                                           else STATE_NAME)
        saved = _resumed_from(args, state.global_step) / self._state_name
        if first and state.global_step == 0 and path.exists():
            _remove_earlier_records(path)  # a run from step 0: its own records only
        self.monitor = FisherTraceMonitor(model, self.inputs, every=self.every, csv_path=path, **options)
        if state.global_step == 0:
            self._log(self.monitor.measure(0), control)
        elif saved.is_file():
            self.monitor.load_state_dict(torch.load(saved, weights_only=True))
        else:
            warn_user(f"torchfim: training resumes at step {state.global_step} without a saved monitor state "
                      f"({saved} is missing): the Tr(F) records start afresh there, and {path.name} keeps the "
                      "rows up to that step")
            if first and path.exists():  # rows past the checkpoint are of the run that died
                kept = [r for r in read_trace_csv(path) if r.step <= state.global_step]
                CsvSink(path, self.monitor.columns).rewrite(kept)

    def _csv_file(self, args) -> Path:
        return Path(args.output_dir) / (self._prefix + CSV_NAME) if self.csv_path is None else Path(self.csv_path)

    def _check_alone(self, trainer: Trainer | None, args) -> None:
        """Refuse another FisherTraceCallback of ``trainer`` (None: not known) with this one's name, CSV file or
        TensorBoard folder, and this one added twice (it would measure, and log each record, twice a step)."""
        callbacks = [] if trainer is None else trainer.callback_handler.callbacks
        if sum(other is self for other in callbacks) > 1:
            raise TorchfimError("this FisherTraceCallback is added to the Trainer twice (callbacks=[...] and "
                                "add_callback, or add_callback twice), so it would log each record twice; add it once")
        for other in callbacks:
            if other is self or not isinstance(other, FisherTraceCallback):
                continue
            if other.name == self.name:
                raise TorchfimError(
                    f"two FisherTraceCallbacks of one Trainer have name={self.name!r}: both would write "
                    f"{self._csv_file(args).name}, save {self._prefix}{STATE_NAME} into each checkpoint and log "
                    f"{self._prefix}fisher_trace, over each other's; give each its own name, e.g. "
                    "FisherTraceCallback(train_held, name='train') and FisherTraceCallback(val_held, name='val')"
                )
            if os.path.abspath(other._csv_file(args)) == os.path.abspath(self._csv_file(args)):
                raise TorchfimError(
                    f"two FisherTraceCallbacks of one Trainer write the same CSV file {self._csv_file(args)}, over each "
                    "other's rows; give each its own csv_path, or leave csv_path out (each name has its own file)"
                )
            logs = [callback.options.get("tensorboard_dir") for callback in (self, other)]
            if None not in logs and os.path.abspath(logs[0]) == os.path.abspath(logs[1]):
                raise TorchfimError(
                    f"two FisherTraceCallbacks of one Trainer log to the same tensorboard_dir {logs[0]}, both under the "
                    "tag fisher/trace, which TensorBoard draws as one zig-zag curve of both; give each its own "
                    "tensorboard_dir"
                )

    def on_step_end(self, args, state, control, **kwargs) -> None:
        if self.monitor is not None:
            self._log(self.monitor.step(state.global_step), control)

    def _log(self, record: TraceRecord | None, control) -> None:
        """``record`` into the trainer's logs, where the callback was given the trainer; the trainer's own log of
        this step (``control.should_log``) is kept."""
        if self.trainer is None or record is None:
            return
        key = f"{self._prefix}fisher_trace"
        logs = {key: record.trace, f"{key}_stderr": record.stderr}
        if record.variance_ratio is not None:
            logs[f"{key}_variance_ratio"] = record.variance_ratio
        # trainer.log clears should_log, which the trainer's flow set for its own loss log that follows this event
        should_log = control.should_log
        self.trainer.log(logs)
        control.should_log = self.trainer.control.should_log = should_log

    def on_save(self, args, state, control, **kwargs) -> None:
        if self.monitor is not None:
            _save_into(_checkpoint(args, state.global_step), self._state_name, self.monitor)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        if self.monitor is not None:
            self.monitor.close()


class FisherPenaltyCallback(TrainerCallback):
    """The state of a :class:`~torchfim.train.FisherPenalty` saved in each of a ``Trainer``'s checkpoints and
    loaded on ``resume_from_checkpoint`` (see the module docstring); the penalty itself goes into
    ``compute_loss``.

    Args:
        penalty: the penalty whose state it keeps.
        name: letters, digits, ``_``, ``-`` or ``.`` that prefix its state file, one name per penalty of a trainer
            (None: no prefix, ``torchfim_penalty-<process index>.pt``; ``name="head"``:
            ``head_torchfim_penalty-<process index>.pt``). Two callbacks of one trainer with other penalties and the
            same name would save into one file and load the same state back: training refuses to begin with them.

    Example:
        >>> pen = FisherPenalty(model, alpha=0.01, every=10)  # doctest: +SKIP
        >>> trainer = PenalisedTrainer(model, args, train_dataset=data,  # doctest: +SKIP
        ...                            callbacks=[FisherPenaltyCallback(pen)])
    """

    def __init__(self, penalty: FisherPenalty, name: str | None = None) -> None:
        if not isinstance(penalty, FisherPenalty):
            raise TorchfimError(f"FisherPenaltyCallback takes a FisherPenalty, got {type(penalty).__name__}")
        _check_name("FisherPenaltyCallback", "state file", "head", name)
        self.penalty, self.name = penalty, name

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._check_alone(_training_loop()[0], args)
        if state.global_step == 0:
            return
        saved = _resumed_from(args, state.global_step) / self._file(args)
        if saved.is_file():
            self.penalty.load_state_dict(torch.load(saved, weights_only=True))
        else:
            warn_user(f"torchfim: training resumes at step {state.global_step} without a saved penalty state "
                      f"({saved} is missing): its labels and cached gradient start afresh there")

    def on_save(self, args, state, control, **kwargs) -> None:
        _save_into(_checkpoint(args, state.global_step), self._file(args), self.penalty)

    def _file(self, args) -> str:
        """The state file's name: the name chosen, not the callback's place among the trainer's, which a resumed run
        may add in another order (two penalties of one model would load each other's cached gradient silently)."""
        return ("" if self.name is None else f"{self.name}_") + f"torchfim_penalty-{args.process_index}.pt"

    def _check_alone(self, trainer: Trainer | None, args) -> None:
        """Refuse another FisherPenaltyCallback of ``trainer`` (None: not known) with this one's name and another
        penalty (the same penalty twice saves one state twice)."""
        for other in [] if trainer is None else trainer.callback_handler.callbacks:
            if isinstance(other, FisherPenaltyCallback) and other.penalty is not self.penalty and other.name == self.name:
                raise TorchfimError(
                    f"two FisherPenaltyCallbacks of one Trainer keep other penalties under name={self.name!r}: both "
                    f"would save {self._file(args)} into each checkpoint, over each other's, and load the same state "
                    "on resuming; give each its own name, e.g. FisherPenaltyCallback(pen_body, name='body') and "
                    "FisherPenaltyCallback(pen_head, name='head')"
                )


#: The monitor's arguments a callback takes in ``**options`` (the others it sets itself; ``across_processes``
#: it sets by the trainer's processes unless given).
MONITOR_OPTIONS = frozenset(inspect.signature(FisherTraceMonitor).parameters) - {"model", "inputs", "every", "csv_path"}


def _check_monitor_options(inputs: Inputs, every: object, options: dict[str, object]) -> None:
    """Refuse at once what the monitor, built when training begins, would refuse then: an option it does not take,
    ``every``, and the window's options against the held inputs (in one process: each process's share is checked
    when the monitor is built)."""
    unknown = sorted(set(options) - MONITOR_OPTIONS)
    if unknown:
        raise TorchfimError(f"FisherTraceCallback got {counted(len(unknown), 'option')} the monitor does not take: "
                            f"{', '.join(unknown)}; "
                            f"it takes {', '.join(sorted(MONITOR_OPTIONS))}")
    check_int("every", every, 1, "pass e.g. every=50 to measure every 50 optimiser steps")
    subset = check_window_options(options.get("subset"), options.get("control_variate", False))
    held = sum(b.size for b in hold(inputs))
    check_window(held if subset is None else min(subset, held), bool(options.get("control_variate", False)))


def _check_name(owner: str, prefixes: str, example: str, name: object) -> None:
    """Refuse a callback's ``name`` that is not None nor letters, digits, ``_``, ``-`` or ``.``."""
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", name)):
        raise TorchfimError(f"{owner}'s name prefixes its {prefixes}: it must be letters, digits, '_', '-' or '.', "
                            f"e.g. name={example!r}, got {name!r:.80}")


def _remove_earlier_records(path: Path) -> None:
    """Delete the Tr(F) records of an earlier run at ``path``; refuse a folder or a file of other data (it deleted
    any file there: a user's results given as csv_path were lost, in a review)."""
    if path.is_dir():
        raise TorchfimError(f"FisherTraceCallback's csv_path {str(path)!r} is a folder; name the CSV file, e.g. "
                            f"csv_path={str(path / 'fisher_trace.csv')!r}")
    with path.open(newline="") as f:
        header = f.readline()
    cut = not header.endswith("\n") and ",".join(COLUMNS).startswith(header)  # a header cut while written: no record
    if header.strip() and not header.startswith(",".join(COLUMNS)) and not cut:
        raise TorchfimError(f"FisherTraceCallback's csv_path {str(path)!r} holds other data (its header is "
                            f"{header.strip()[:80]!r}); a run from step 0 starts its records afresh there: pass "
                            "another csv_path, or leave it out (the trainer's output_dir)")
    path.unlink()


def _save_into(folder: Path, name: str, tool: FisherTraceMonitor | FisherPenalty) -> None:
    """``tool.state_dict()`` written atomically as ``folder/name``, where the trainer saved a checkpoint."""
    if folder.is_dir():
        state_dict = tool.state_dict()
        atomic_write(folder / name, lambda f: torch.save(state_dict, f), binary=True)


def _checkpoint(args, step: int) -> Path:
    """The folder the trainer saves the checkpoint of ``step`` in."""
    return Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{step}"


def _resumed_from(args, step: int) -> Path:
    """The checkpoint folder the trainer resumes from at ``step``: the ``resume_from_checkpoint`` its training loop
    holds (``True`` already made the last checkpoint's path there), else the trainer's own ``checkpoint-<step>``."""
    path = _training_loop()[1]
    return Path(path) if isinstance(path, (str, os.PathLike)) else _checkpoint(args, step)


def _training_loop() -> tuple[Trainer | None, object]:
    """The ``Trainer`` whose training loop (``Trainer._inner_training_loop``) runs the callbacks' event in progress,
    and the ``resume_from_checkpoint`` that loop holds; ``(None, None)`` where none does (a trainer that trains
    otherwise)."""
    # transformers hands callbacks neither the trainer nor the checkpoint path, so both are read from the frame of
    # Trainer._inner_training_loop, which calls the callbacks' on_train_begin
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "_inner_training_loop" and isinstance(frame.f_locals.get("self"), Trainer):
                return frame.f_locals["self"], frame.f_locals.get("resume_from_checkpoint")
            frame = frame.f_back
    finally:
        del frame  # a frame held here would keep the trainer's locals alive in a reference cycle
    return None, None
