"""One training run of the study: SGD with or without the Fisher penalty, Tr(F) and accuracies
recorded along the way; deterministic for a given run specification."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ...compare import derive_seeds
from .data import Split, build_model, make_split
from .settings import RunSpec, Settings

__all__ = ["train_one", "compact"]

#: What a run records at each measurement, in results.json's order.
CURVES = ("step", "trace", "trace_stderr", "train_loss", "train_acc", "clean_acc", "noisy_acc",
          "noisy_true_acc", "val_acc", "test_acc", "penalty")


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    """One intra-op thread and deterministic algorithms inside; the previous state restored after."""
    threads = torch.get_num_threads()
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.set_num_threads(threads)


def compact(x: float) -> float | None:
    """A float rounded to 6 significant digits (None when not finite), for compact JSON."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return float(f"{x:.6g}")


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Accuracy of ``logits`` on labels ``y``; rows with non-finite logits count as wrong (NaN if empty)."""
    if y.shape[0] == 0:
        return math.nan
    ok = torch.isfinite(logits).all(1)
    return float(((logits.argmax(1) == y) & ok).float().mean())


def _loss(logits: torch.Tensor, y: torch.Tensor) -> float:
    """Mean cross-entropy; infinite when a logit is not finite."""
    if not bool(torch.isfinite(logits).all()):
        return math.inf
    return float(F.cross_entropy(logits, y))


def _two_seeds(seed: int) -> tuple[int, int]:
    """Two independent seeds from one (the monitor's and the penalty's label sampling)."""
    a, b = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(a), int(b)


def train_one(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """Train one run and return its curves and summary numbers (deterministic, no timings).

    Curves are recorded at the steps :meth:`Settings.is_eval_step` picks, at each plateau check and at the last
    step (training accuracy at four fifths of the run is kept for the summary's plateau check); the means over
    training of the clean and noisy subsets' accuracies are over the least epochs, which every run trains:
    ``trace``/``trace_stderr`` (FisherTraceMonitor on the held training inputs), the training
    loss and accuracy against the labels used for training, accuracy on the clean and on the noisy
    training subsets, validation and test accuracy, and the last computed penalty value.
    """
    plan = derive_seeds(spec.seed)
    with _deterministic():
        run = _Run(spec, settings, plan)
        step, epochs, diverged = run.train()
    curves, data = run.curves, run.data
    least_steps = settings.epochs_for(spec.dataset) * settings.steps_per_epoch(int(data.x_train.shape[0]))
    traces = [t for t in curves["trace"] if t is not None]
    best = _argmax([v if v is not None else -1.0 for v in curves["val_acc"]])
    return {
        "diverged": diverged,
        "steps": step,
        "n_train": int(data.x_train.shape[0]),
        "steps_per_epoch": settings.steps_per_epoch(int(data.x_train.shape[0])),
        "n_noisy": int(data.noisy.sum()),
        "n_val": int(data.x_val.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "final": {
            "test_acc": curves["test_acc"][-1],
            "val_acc": curves["val_acc"][-1],
            "train_acc": curves["train_acc"][-1],
            "clean_acc": curves["clean_acc"][-1],
            "noisy_acc": curves["noisy_acc"][-1],
            "best_val_acc": curves["val_acc"][best],
            "test_acc_at_best_val": curves["test_acc"][best],
            "step_of_best_val": curves["step"][best],
            "train_acc_at_four_fifths": _at_fraction(curves, "train_acc", 0.8),
            "peak_trace": max(traces) if traces else None,
            "step_of_peak_trace": curves["step"][curves["trace"].index(max(traces))] if traces else None,
            "final_trace": curves["trace"][-1],
            # Over the least epochs, which every run trains: runs that go on to a plateau would average in more of
            # their late, higher accuracy.
            "clean_acc_auc": _mean_until(curves, "clean_acc", least_steps),
            "noisy_acc_auc": _mean_until(curves, "noisy_acc", least_steps),
            "epochs": epochs,
        },
        "curves": curves,
    }


class _Run:
    """The state of one run: data, network, optimiser, monitor, penalty and the recorded curves."""

    def __init__(self, spec: RunSpec, settings: Settings, plan: Any) -> None:
        from ...train import FisherPenalty, FisherTraceMonitor

        self.spec, self.settings = spec, settings
        self.data: Split = make_split(spec.dataset, spec.model, settings, plan, spec.noise_fraction)
        self.model = build_model(spec.dataset, spec.model, settings, plan.init)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=spec.lr, momentum=settings.momentum)
        seed_mon, seed_pen = _two_seeds(plan.sampling)
        self.monitor = FisherTraceMonitor(
            self.model, self.data.x_train[self.data.held], every=settings.eval_every,
            generator=torch.Generator().manual_seed(seed_mon),
        )  # fmt: skip
        self.penalty = None
        if spec.alpha > 0:
            self.penalty = FisherPenalty(
                self.model, alpha=spec.alpha, every=settings.fp_every, kind="batch_gradient",
                generator=torch.Generator().manual_seed(seed_pen),
            )  # fmt: skip
        self.order = plan.generator("data_order")
        self.curves: dict[str, list] = {k: [] for k in CURVES}

    def train(self) -> tuple[int, int, bool]:
        """SGD for the data set's least number of epochs, then on, a check every :meth:`Settings.plateau_every`
        epochs, until the training accuracy has plateaued (:meth:`plateaued`) or the most epochs are done (or until
        the loss stops being finite); returns ``(steps done, epochs done, diverged)``."""
        settings, dataset = self.settings, self.spec.dataset
        least, every = settings.epochs_for(dataset), settings.plateau_every(dataset)
        step, epochs, diverged = 0, 0, False
        self.model.train()
        while epochs < settings.max_epochs_for(dataset) and not diverged:
            step, diverged = self.epoch(step)
            epochs += 1
            if not diverged and epochs >= least and (epochs - least) % every == 0 and self.plateaued(step):
                break
        diverged = diverged or not _parameters_finite(self.model)
        if not self.curves["step"] or self.curves["step"][-1] != step:
            self.record(step, not diverged and _outputs_finite(self.model, self.data.x_train[self.data.held]))
        return step, epochs, diverged

    def epoch(self, step: int) -> tuple[int, bool]:
        """One epoch of SGD from ``step``, measuring at the steps :meth:`Settings.is_eval_step` picks; returns
        ``(the step reached, diverged)``."""
        model, data, pen, B = self.model, self.data, self.penalty, self.settings.batch_size
        n = data.x_train.shape[0]
        perm = torch.randperm(n, generator=self.order)
        # Whole mini-batches only: the penalty's gradient, computed every 10 steps and reused for 9, came from
        # the epoch's last 14-16 inputs whenever that step fell there, about 8× larger (‖g_B‖² ~ Tr(F)/B), and
        # made the penalised runs collapse (a review).
        for start in range(0, n - B + 1, B):
            if self.settings.is_eval_step(step) and self.curves["step"][-1:] != [step]:  # a plateau check's
                if not _outputs_finite(model, data.x_train[data.held]):  # a finite loss, then overflow
                    return step, True  # (the monitor would refuse the model; the study records a divergence)
                self.record(step, True)
            idx = perm[start : start + B]
            xb, yb = data.x_train[idx], data.y_train[idx]
            self.opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            if pen is not None:
                loss = loss + pen(xb, step=step)
            if not torch.isfinite(loss):
                return step, True
            loss.backward()
            self.opt.step()
            step += 1
        return step, False

    def plateaued(self, step: int) -> bool:
        """Whether the training accuracy has plateaued at ``step`` (measured there first, where it was not), as the
        summary judges a configuration: moved by at most ``plateau_tolerance`` since four fifths of the steps so
        far. False where the parameters or the outputs are no longer finite (the run ends as diverged)."""
        if not _parameters_finite(self.model):
            return False
        if self.curves["step"][-1] != step:
            if not _outputs_finite(self.model, self.data.x_train[self.data.held]):
                return False
            self.record(step, True)
        return self.settings.plateaued(_at_fraction(self.curves, "train_acc", 0.8), self.curves["train_acc"][-1])

    def record(self, step: int, measure_trace: bool) -> None:
        """Append one measurement to every curve (Tr(F) only when ``measure_trace``)."""
        model, data, curves, pen = self.model, self.data, self.curves, self.penalty
        model.eval()
        with torch.no_grad():
            o_train, o_val, o_test = model(data.x_train), model(data.x_val), model(data.x_test)
        trace = stderr = math.nan
        if measure_trace:
            rec = self.monitor.measure(step)
            trace, stderr = rec.trace, rec.stderr
        model.train()
        nz, clean = data.noisy, ~data.noisy
        curves["step"].append(step)
        curves["trace"].append(compact(trace))
        curves["trace_stderr"].append(compact(stderr))
        curves["train_loss"].append(compact(_loss(o_train, data.y_train)))
        curves["train_acc"].append(compact(_accuracy(o_train, data.y_train)))
        curves["clean_acc"].append(compact(_accuracy(o_train[clean], data.y_train[clean])))
        curves["noisy_acc"].append(compact(_accuracy(o_train[nz], data.y_train[nz])))
        curves["noisy_true_acc"].append(compact(_accuracy(o_train[nz], data.y_train_true[nz])))
        curves["val_acc"].append(compact(_accuracy(o_val, data.y_val)))
        curves["test_acc"].append(compact(_accuracy(o_test, data.y_test)))
        curves["penalty"].append(compact(pen.last_value) if pen is not None and pen.last_value is not None else None)


def _parameters_finite(model: nn.Module) -> bool:
    """Whether every parameter of ``model`` is finite."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _outputs_finite(model: nn.Module, x: torch.Tensor) -> bool:
    """Whether the model's outputs on ``x`` are all finite."""
    with torch.no_grad():
        return bool(torch.isfinite(model(x)).all())


def _argmax(values: Sequence[float]) -> int:
    """Index of the first largest value."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _at_fraction(curves: dict[str, list], key: str, fraction: float) -> float | None:
    """``curves[key]`` at the last measurement at or before ``fraction`` of the run's steps."""
    limit = fraction * curves["step"][-1]
    return [v for st, v in zip(curves["step"], curves[key]) if st <= limit][-1]


def _mean_until(curves: dict[str, list], key: str, last_step: int) -> float | None:
    """Mean of ``curves[key]`` over the measurements at or before ``last_step`` that are not None, compacted (None if
    there are none)."""
    vals = [v for st, v in zip(curves["step"], curves[key]) if st <= last_step and v is not None]
    return compact(sum(vals) / len(vals)) if vals else None

