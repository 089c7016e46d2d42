"""Jastrzębski et al. (ICML 2021), "Catastrophic Fisher Explosion", at CPU scale.

``torchfim explosion [--out DIR] [--quick] [--resume] [--seeds N] [--master-seed S] [--jobs J]``
runs :func:`run`, which trains small networks without BatchNorm (an MLP and a small CNN: 1-D
convolutions on MNIST-1D, 2-D convolutions on the 8×8 scikit-learn digits; both data sets are
built locally, nothing is downloaded) with SGD (momentum 0.9, batch 128, constant learning rate)
and checks three of the paper's claims:

(a) *Fisher explosion*: with a small learning rate (η*/10) ``Tr(F)`` rises much higher early in
    training than with the tuned one (η*). ``Tr(F)`` and its standard error are measured with
    :class:`torchfim.train.FisherTraceMonitor` on a fixed held subset of the training inputs (one
    label sampled from the model per input) every ``eval_every_early`` steps in the early phase and
    every ``eval_every`` steps after.
(b) *Fisher penalty*: final test accuracy is lower at η*/10 than at η*, and adding the Fisher
    penalty (:class:`torchfim.train.FisherPenalty`, ``kind="batch_gradient"``, ``every=10``, the
    paper's Eq. 3 with its every-10-steps cache) at η*/10 closes most of that gap.
(c) *Memorisation*: with a fraction of the training labels replaced by uniformly drawn ones, the
    Fisher penalty slows the fitting of the corrupted examples more than that of the clean ones
    (training accuracy on each subset, against the labels used for training, over training), at
    η*/10 and at η*, with a tuned α and with a fixed α (``noisy_fixed_alpha``).

How the hyper-parameters are chosen (on validation accuracy, one tuning seed per data set and
model, as the paper tunes η* "once with a single seed"): η* is the learning rate of ``lr_grid``
with the best final validation accuracy (runs that diverge are never chosen; ties go to the smaller
value), and α is the value of ``alpha_grid`` (the digest's ``{0.01, 0.03, 0.1}`` in the full
study) with the best final validation accuracy at η*/10 with the penalty. On noisy labels α is
tuned separately, as in the paper, over ``noisy_alpha_grid`` at each noisy-run learning rate, by
the best validation accuracy over training (the paper's early stopping; validation labels are
clean). The tuning seed is derived from the master seed apart from the evaluation seeds.

Every configuration is trained on ``n_seeds`` seeds, ``torchfim.compare.seeds(n_seeds,
master_seed)``, each split by :func:`torchfim.compare.derive_seeds` into the seeds of the weight
initialisation, the data order, the data split (validation/test sets and the held Tr(F) subset), the
label-noise draw and the label sampling of the Fisher penalty and the monitor. The configurations
of one seed share that seed, so the comparisons, :func:`torchfim.compare.prob_outperform`, are
paired by seed.

Interrupting and resuming. Each (configuration, seed) result is written, atomically, to
``DIR/runs/<run id>.json`` as soon as that run finishes; ``--resume`` loads those and runs only the
missing ones. ``results.json``, ``summary.md`` and the figures are always rebuilt from the run
files, and every run is deterministic (one intra-op thread, ``torch.use_deterministic_algorithms``,
seeded generators), so an interrupted and resumed study writes the same ``results.json`` as an
uninterrupted one. Wall-clock times are kept out of ``results.json``, in ``timings.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..cli import nonnegative_int, positive_int
from ..compare import derive_seeds, prob_outperform, seeds
from ..errors import TorchfimError

__all__ = [
    "HELP",
    "DEFAULT_OUT",
    "Settings",
    "FULL",
    "QUICK",
    "TINY",
    "RunSpec",
    "build_model",
    "train_one",
    "count_runs",
    "run",
    "assemble",
    "add_arguments",
    "main",
]

HELP = "the Catastrophic Fisher Explosion study (Jastrzębski et al. 2021) at CPU scale"
DEFAULT_OUT = "torchfim-explosion"
RESULTS_VERSION = 1
N_CLASSES = 10

FILES = {
    "json": "results.json",
    "summary": "summary.md",
    "timings": "timings.json",
    "memorisation": "memorisation.png",
}

# Spawn key of the tuning run's seed ("TUNE" in ASCII): apart from the evaluation seeds.
_TUNE_SPAWN_KEY = 0x54554E45

#: Training configurations on clean labels, in plotting order.
CLEAN_VARIANTS = ("large", "small", "small_fp")
#: Training configurations on noisy labels.
NOISY_VARIANTS = ("base", "fp", "fp_fixed")
LABELS = {
    "large": "η* (large LR)",
    "small": "η*/10 (small LR)",
    "small_fp": "η*/10 + Fisher penalty",
    "base": "no penalty",
    "fp": "Fisher penalty, tuned α",
    "fp_fixed": "Fisher penalty, fixed α",
}
COLORS = {
    "large": "tab:blue", "small": "tab:red", "small_fp": "tab:green",
    "base": "tab:red", "fp": "tab:green", "fp_fixed": "tab:purple",
}  # fmt: skip


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """Everything that defines the study apart from the seeds (stored in ``results.json``)."""

    preset: str = "full"
    #: (dataset, model) pairs of claims (a) and (b).
    combos: tuple[tuple[str, str], ...] = (
        ("digits", "mlp"),
        ("digits", "cnn"),
        ("mnist1d", "mlp"),
        ("mnist1d", "cnn"),
    )
    #: (dataset, model) pairs of claim (c), trained with label noise.
    noisy_combos: tuple[tuple[str, str], ...] = (("digits", "mlp"), ("mnist1d", "cnn"))
    n_seeds: int = 5
    #: Optimisation steps per run, by data set.
    steps: tuple[tuple[str, int], ...] = (("digits", 1000), ("mnist1d", 1500))
    batch_size: int = 128
    momentum: float = 0.9
    lr_grid: tuple[float, ...] = (0.0316, 0.1, 0.316)
    lr_ratio: float = 10.0
    alpha_grid: tuple[float, ...] = (0.01, 0.03, 0.1)
    fp_every: int = 10
    #: Fraction of the training examples whose label is replaced by a uniform draw (claim c).
    noise_fraction: float = 0.3
    #: Learning rates of the noisy-label runs: "small" (η*/10) and/or "large" (η*).
    noisy_lrs: tuple[str, ...] = ("small", "large")
    #: α grid of the noisy-label runs, tuned on them (best validation accuracy over training, the
    #: paper's early stopping), as the paper tunes its noisy-label α separately.
    noisy_alpha_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    #: A second penalised configuration on noisy labels with this fixed α (None: none), to test the
    #: memorisation claim at a strength where the penalty acts, whatever validation prefers.
    noisy_fixed_alpha: float | None = 0.1
    monitor_inputs: int = 256
    #: Measure (Tr(F), accuracies) every ``eval_every`` steps, and every ``eval_every_early`` steps
    #: before step ``early_until`` (the early phase, where Tr(F) moves fastest).
    eval_every: int = 50
    eval_every_early: int = 10
    early_until: int = 100
    mlp_width: int = 256
    cnn_channels: int = 32
    val_fraction: float = 0.1
    #: Fraction of the digits held out as the test set (MNIST-1D has its own test set).
    test_fraction: float = 0.2
    #: MNIST-1D sequences to generate (None: the package's default recipe, 5000).
    mnist1d_samples: int | None = None
    #: ε of the paper's early-phase value Tr(Fᵢ): Tr(F) when the training loss first falls below ε
    #: (analysis only; ln 10 ≈ 2.3 at initialisation, the paper uses 1.2 on CIFAR-10).
    loss_threshold: float = 1.0

    def steps_for(self, dataset: str) -> int:
        return dict(self.steps)[dataset]

    def is_eval_step(self, step: int) -> bool:
        every = self.eval_every_early if step < self.early_until else self.eval_every
        return step % every == 0

    def noisy_variants(self) -> tuple[str, ...]:
        return NOISY_VARIANTS if self.noisy_fixed_alpha else NOISY_VARIANTS[:2]

    def noisy_settings(self) -> tuple[tuple[str, str, str], ...]:
        """(dataset, model, learning-rate name) of every noisy-label configuration pair."""
        return tuple((d, m, lr) for d, m in self.noisy_combos for lr in self.noisy_lrs)

    def all_combos(self) -> tuple[tuple[str, str], ...]:
        seen: list[tuple[str, str]] = []
        for c in self.combos + self.noisy_combos:
            if c not in seen:
                seen.append(c)
        return tuple(seen)

    def fingerprint(self) -> str:
        """Hash of the settings that change how a run trains, stored in every run file.

        The settings that only decide *which* runs exist (presets, data-set/model lists, grids, seed
        count, the noisy runs' learning rate) are left out: they show in a run's spec, which
        :func:`run` compares too, so changing them reruns only the runs they change.
        """
        d = {k: v for k, v in asdict(self).items() if k not in _PLAN_ONLY}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


_PLAN_ONLY = (
    "preset", "combos", "noisy_combos", "n_seeds", "lr_grid", "lr_ratio", "alpha_grid", "noisy_lrs", "noise_fraction",
    "noisy_alpha_grid", "noisy_fixed_alpha",
    "loss_threshold",
)  # fmt: skip


FULL = Settings()
QUICK = Settings(
    preset="quick",
    combos=(("digits", "mlp"),),
    noisy_combos=(("digits", "mlp"),),
    noisy_lrs=("large",),
    n_seeds=2,
    steps=(("digits", 300), ("mnist1d", 300)),
    lr_grid=(0.03, 0.1, 0.3),
    alpha_grid=(0.03,),
    noisy_alpha_grid=(0.03, 0.1),
    monitor_inputs=128,
    eval_every=20,
    eval_every_early=10,
    early_until=60,
    mlp_width=128,
)
#: The smallest study that runs every code path (for the test suite).
TINY = Settings(
    preset="tiny",
    combos=(("digits", "mlp"),),
    noisy_combos=(("digits", "mlp"),),
    noisy_lrs=("large",),
    n_seeds=2,
    steps=(("digits", 40), ("mnist1d", 40)),
    lr_grid=(0.05, 0.2),
    alpha_grid=(0.03,),
    noisy_alpha_grid=(0.03,),
    monitor_inputs=32,
    eval_every=10,
    eval_every_early=5,
    early_until=20,
    mlp_width=32,
    cnn_channels=4,
)
PRESETS = {"full": FULL, "quick": QUICK, "tiny": TINY}


@dataclass(frozen=True)
class RunSpec:
    """One training run: a configuration and a seed."""

    run_id: str
    phase: str  # "tune_lr", "tune_alpha", "tune_noisy_alpha", "clean", "noisy"
    dataset: str
    model: str
    variant: str
    lr: float
    alpha: float
    noise_fraction: float
    seed: int  # the run's master seed (derive_seeds splits it)
    seed_index: int | None  # index in the study's seed list; None for the tuning seed


def _fmt(x: float) -> str:
    return f"{x:g}"


# --------------------------------------------------------------------------- data and models
_DATA_CACHE: dict[tuple[str, int | None], tuple[torch.Tensor, ...]] = {}


def _raw_data(dataset: str, settings: Settings) -> tuple[torch.Tensor, ...]:
    """``(X, y)`` for digits, ``(x_train, y_train, x_test, y_test)`` for MNIST-1D (cached)."""
    key = (dataset, settings.mnist1d_samples if dataset == "mnist1d" else None)
    if key not in _DATA_CACHE:
        if dataset == "digits":
            from ..datasets import load_digits

            _DATA_CACHE[key] = load_digits(dtype=torch.float32)
        elif dataset == "mnist1d":
            from ..datasets import load_mnist1d

            _DATA_CACHE[key] = tuple(load_mnist1d(num_samples=settings.mnist1d_samples, dtype=torch.float32))
        else:
            raise TorchfimError(f"unknown data set {dataset!r}; choose 'digits' or 'mnist1d'")
    return _DATA_CACHE[key]


@dataclass
class Split:
    x_train: torch.Tensor
    y_train: torch.Tensor  # labels used for training (noisy where corrupted)
    y_train_true: torch.Tensor
    noisy: torch.Tensor  # bool mask: label changed by the noise draw
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    held: torch.Tensor  # indices into the training set of the Tr(F) inputs


def _shape_inputs(x: torch.Tensor, dataset: str, model: str) -> torch.Tensor:
    if model == "mlp":
        return x
    if dataset == "digits":
        return x.reshape(-1, 1, 8, 8)
    return x.reshape(-1, 1, x.shape[-1])


def make_split(dataset: str, model: str, settings: Settings, plan: Any, noise_fraction: float) -> Split:
    """Split the data with the plan's ``data_split`` seed and corrupt labels with its ``label_noise`` seed.

    Digits: a seeded permutation gives the test set (``test_fraction``), then the validation set
    (``val_fraction`` of the rest), then the training set. MNIST-1D: its own test set; validation
    is ``val_fraction`` of its training sequences. The held ``Tr(F)`` inputs are the first
    ``monitor_inputs`` training inputs of a second permutation of the same stream. Label noise:
    ``round(noise_fraction·n_train)`` training examples get a label drawn uniformly from the 10
    classes (it may equal the true one, as in the paper); the *noisy* subset is those whose label
    actually changed.
    """
    g = plan.generator("data_split")
    raw = _raw_data(dataset, settings)
    if dataset == "digits":
        X, y = raw
        n = X.shape[0]
        perm = torch.randperm(n, generator=g)
        n_test = int(round(settings.test_fraction * n))
        test, rest = perm[:n_test], perm[n_test:]
        x_test, y_test = X[test], y[test]
        X, y = X[rest], y[rest]
    else:
        X, y, x_test, y_test = raw
    n = X.shape[0]
    perm = torch.randperm(n, generator=g)
    n_val = int(round(settings.val_fraction * n))
    val, train = perm[:n_val], perm[n_val:]
    x_train, y_true = X[train], y[train]
    held = torch.randperm(x_train.shape[0], generator=g)[: settings.monitor_inputs]

    y_used = y_true.clone()
    if noise_fraction > 0:
        gn = plan.generator("label_noise")
        n_noise = int(round(noise_fraction * x_train.shape[0]))
        idx = torch.randperm(x_train.shape[0], generator=gn)[:n_noise]
        y_used[idx] = torch.randint(0, N_CLASSES, (n_noise,), generator=gn)
    noisy = y_used != y_true

    def s(x: torch.Tensor) -> torch.Tensor:
        return _shape_inputs(x, dataset, model).contiguous()

    return Split(s(x_train), y_used, y_true, noisy, s(X[val]), y[val], s(x_test), y_test, held)


def build_model(dataset: str, model: str, settings: Settings, seed: int) -> nn.Module:
    """The network, initialised (PyTorch defaults) under ``torch.manual_seed(seed)``; no BatchNorm.

    * ``mlp``: ``d → W → W → 10`` with ReLU (``W = mlp_width``; d = 64 digits, 40 MNIST-1D).
    * ``cnn`` on MNIST-1D (the digest's 1-D CNN): Conv1d(1→C, 5) → Conv1d(C→C, 3) → max-pool 2 →
      Conv1d(C→C, 3) → max-pool 2 → Linear(10C → 10), ReLU after each convolution (``C =
      cnn_channels``; 9,610 parameters at C = 32).
    * ``cnn`` on the digits (8×8): Conv2d(1→C/2, 3) → Conv2d(C/2→C, 3) → max-pool 2 → Conv2d(C→C,
      3) → max-pool 2 → Linear(4C → 10), ReLU after each convolution, 'same' padding.
    """
    d_in = {"digits": 64, "mnist1d": 40}[dataset]
    C = settings.cnn_channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model == "mlp":
            W = settings.mlp_width
            net = nn.Sequential(nn.Linear(d_in, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU(), nn.Linear(W, N_CLASSES))
        elif model == "cnn" and dataset == "mnist1d":
            net = nn.Sequential(
                nn.Conv1d(1, C, 5, padding=2), nn.ReLU(),
                nn.Conv1d(C, C, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
                nn.Conv1d(C, C, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
                nn.Flatten(), nn.Linear(C * (d_in // 4), N_CLASSES),
            )  # fmt: skip
        elif model == "cnn" and dataset == "digits":
            h = max(1, C // 2)
            net = nn.Sequential(
                nn.Conv2d(1, h, 3, padding=1), nn.ReLU(),
                nn.Conv2d(h, C, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(C * 4, N_CLASSES),
            )  # fmt: skip
        else:
            raise TorchfimError(f"unknown model {model!r}; choose 'mlp' or 'cnn'")
    return net


# --------------------------------------------------------------------------- one run
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


def _r(x: float) -> float | None:
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
    if not bool(torch.isfinite(logits).all()):
        return math.inf
    return float(F.cross_entropy(logits, y))


def _two_seeds(seed: int) -> tuple[int, int]:
    a, b = np.random.SeedSequence(seed).generate_state(2, dtype=np.uint32)
    return int(a), int(b)


def train_one(spec: RunSpec, settings: Settings) -> dict[str, Any]:
    """Train one run and return its curves and summary numbers (deterministic, no timings).

    Curves are recorded at the steps :meth:`Settings.is_eval_step` picks and at the last step:
    ``trace``/``trace_stderr`` (FisherTraceMonitor on the held training inputs), the training
    loss and accuracy against the labels used for training, accuracy on the clean and on the noisy
    training subsets, validation and test accuracy, and the last computed penalty value.
    """
    from ..train import FisherPenalty, FisherTraceMonitor

    plan = derive_seeds(spec.seed)
    with _deterministic():
        data = make_split(spec.dataset, spec.model, settings, plan, spec.noise_fraction)
        model = build_model(spec.dataset, spec.model, settings, plan.init)
        opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=settings.momentum)
        seed_mon, seed_pen = _two_seeds(plan.sampling)
        mon = FisherTraceMonitor(
            model, data.x_train[data.held], every=settings.eval_every,
            generator=torch.Generator().manual_seed(seed_mon),
        )  # fmt: skip
        pen = None
        if spec.alpha > 0:
            pen = FisherPenalty(
                model, alpha=spec.alpha, every=settings.fp_every, kind="batch_gradient",
                generator=torch.Generator().manual_seed(seed_pen),
            )  # fmt: skip
        g_order = plan.generator("data_order")
        clean = ~data.noisy
        keys = ("step", "trace", "trace_stderr", "train_loss", "train_acc", "clean_acc", "noisy_acc",
                "noisy_true_acc", "val_acc", "test_acc", "penalty")  # fmt: skip
        curves: dict[str, list] = {k: [] for k in keys}

        def record(step: int, measure_trace: bool) -> None:
            model.eval()
            with torch.no_grad():
                o_train, o_val, o_test = model(data.x_train), model(data.x_val), model(data.x_test)
            trace = stderr = math.nan
            if measure_trace:
                rec = mon.measure(step)
                trace, stderr = rec.trace, rec.stderr
            model.train()
            nz = data.noisy
            curves["step"].append(step)
            curves["trace"].append(_r(trace))
            curves["trace_stderr"].append(_r(stderr))
            curves["train_loss"].append(_r(_loss(o_train, data.y_train)))
            curves["train_acc"].append(_r(_accuracy(o_train, data.y_train)))
            curves["clean_acc"].append(_r(_accuracy(o_train[clean], data.y_train[clean])))
            curves["noisy_acc"].append(_r(_accuracy(o_train[nz], data.y_train[nz])))
            curves["noisy_true_acc"].append(_r(_accuracy(o_train[nz], data.y_train_true[nz])))
            curves["val_acc"].append(_r(_accuracy(o_val, data.y_val)))
            curves["test_acc"].append(_r(_accuracy(o_test, data.y_test)))
            curves["penalty"].append(_r(pen.last_value) if pen is not None and pen.last_value is not None else None)

        total = settings.steps_for(spec.dataset)
        n = data.x_train.shape[0]
        B = settings.batch_size
        step = 0
        diverged = False
        model.train()
        while step < total and not diverged:
            perm = torch.randperm(n, generator=g_order)
            for start in range(0, n, B):
                if step >= total:
                    break
                if settings.is_eval_step(step):
                    record(step, True)
                idx = perm[start : start + B]
                xb, yb = data.x_train[idx], data.y_train[idx]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                if pen is not None:
                    loss = loss + pen(xb, step=step)
                if not torch.isfinite(loss):
                    diverged = True
                    break
                loss.backward()
                opt.step()
                step += 1
        finite = all(torch.isfinite(p).all() for p in model.parameters())
        diverged = diverged or not finite
        if not curves["step"] or curves["step"][-1] != step:
            record(step, not diverged and _outputs_finite(model, data.x_train[data.held]))

    traces = [t for t in curves["trace"] if t is not None]
    best = _argmax([v if v is not None else -1.0 for v in curves["val_acc"]])
    return {
        "diverged": diverged,
        "steps": step,
        "n_train": int(n),
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
            "peak_trace": max(traces) if traces else None,
            "step_of_peak_trace": curves["step"][curves["trace"].index(max(traces))] if traces else None,
            "final_trace": curves["trace"][-1],
            "clean_acc_auc": _mean(curves["clean_acc"]),
            "noisy_acc_auc": _mean(curves["noisy_acc"]),
        },
        "curves": curves,
    }


def _outputs_finite(model: nn.Module, x: torch.Tensor) -> bool:
    with torch.no_grad():
        return bool(torch.isfinite(model(x)).all())


def _argmax(values: Sequence[float]) -> int:
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return _r(sum(vals) / len(vals)) if vals else None


# --------------------------------------------------------------------------- planning
def tuning_seed(master_seed: int) -> int:
    """The master seed of the tuning runs, derived from the study's seed apart from :func:`seeds`."""
    ss = np.random.SeedSequence(master_seed, spawn_key=(_TUNE_SPAWN_KEY,))
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def _tune_lr_specs(settings: Settings, master_seed: int) -> list[RunSpec]:
    seed = tuning_seed(master_seed)
    return [
        RunSpec(f"tune_lr-{d}-{m}-lr{_fmt(lr)}", "tune_lr", d, m, f"lr={_fmt(lr)}", lr, 0.0, 0.0, seed, None)
        for d, m in settings.all_combos()
        for lr in settings.lr_grid
    ]


def _tune_alpha_specs(settings: Settings, master_seed: int, lr_star: dict) -> list[RunSpec]:
    seed = tuning_seed(master_seed)
    out = []
    for d, m in settings.combos:
        if (d, m) not in lr_star:
            continue
        small = lr_star[(d, m)] / settings.lr_ratio
        for a in settings.alpha_grid:
            out.append(
                RunSpec(f"tune_alpha-{d}-{m}-a{_fmt(a)}", "tune_alpha", d, m, f"alpha={_fmt(a)}", small, a, 0.0, seed, None)
            )
    return out


def _noisy_lr(settings: Settings, lr_star: float, which: str) -> float:
    if which not in ("small", "large"):
        raise TorchfimError(f"noisy_lrs holds {which!r}; use 'small' (η*/10) or 'large' (η*)")
    return lr_star / settings.lr_ratio if which == "small" else lr_star


def _lr_text(which: str, settings: Settings | dict) -> str:
    ratio = settings.lr_ratio if isinstance(settings, Settings) else settings["lr_ratio"]
    return f"η*/{ratio:g}" if which == "small" else "η*"


def _noisy_label(d: str, m: str, which: str, settings: Settings | dict) -> str:
    return f"{d}/{m} noisy, {_lr_text(which, settings)}"


def _tune_noisy_alpha_specs(settings: Settings, master_seed: int, lr_star: dict) -> list[RunSpec]:
    seed = tuning_seed(master_seed)
    return [
        RunSpec(f"tune_noisy_alpha-{d}-{m}-{w}-a{_fmt(a)}", "tune_noisy_alpha", d, m, f"{w} alpha={_fmt(a)}",
                _noisy_lr(settings, lr_star[(d, m)], w), a, settings.noise_fraction, seed, None)
        for d, m, w in settings.noisy_settings()
        if (d, m) in lr_star
        for a in settings.noisy_alpha_grid
    ]  # fmt: skip


def _tuning_specs(settings: Settings, master_seed: int, lr_star: dict) -> list[RunSpec]:
    """The tuning runs that need η*: α at η*/10 on clean labels, α on noisy labels."""
    return _tune_alpha_specs(settings, master_seed, lr_star) + _tune_noisy_alpha_specs(settings, master_seed, lr_star)


def _main_specs(settings: Settings, master_seed: int, lr_star: dict, alpha: dict, noisy_alpha: dict) -> list[RunSpec]:
    out = []
    for i, seed in enumerate(seeds(settings.n_seeds, master_seed)):
        for d, m in settings.combos:
            large = lr_star[(d, m)]
            small = large / settings.lr_ratio
            for variant, lr, a in (("large", large, 0.0), ("small", small, 0.0), ("small_fp", small, alpha[(d, m)])):
                out.append(RunSpec(f"clean-{d}-{m}-{variant}-s{i}", "clean", d, m, variant, lr, a, 0.0, seed, i))
        for d, m, w in settings.noisy_settings():
            lr = _noisy_lr(settings, lr_star[(d, m)], w)
            alphas = {"base": 0.0, "fp": noisy_alpha[(d, m, w)], "fp_fixed": settings.noisy_fixed_alpha}
            for v in settings.noisy_variants():
                a = alphas[v]
                out.append(
                    RunSpec(f"noisy-{d}-{m}-{w}-{v}-s{i}", "noisy", d, m, f"{w}_{v}", lr, a, settings.noise_fraction, seed, i)
                )
    return out


def _choose(grid: Sequence[float], runs: Sequence[dict], key: str = "val_acc") -> tuple[float, list]:
    """The grid value with the best validation accuracy ``key`` (diverged runs excluded; ties: first)."""
    scores = [None if r["diverged"] else r["final"][key] for r in runs]
    valid = [i for i, s in enumerate(scores) if s is not None]
    if not valid:
        raise TorchfimError("every tuning run diverged; lower the learning-rate grid")
    best = max(valid, key=lambda i: (scores[i], -i))
    return grid[best], scores


def tuned(settings: Settings, master_seed: int, done: dict[str, dict]) -> tuple[dict, dict, dict, dict]:
    """(η*, α, noisy-label α, the tuning table), per combo, from finished tuning runs (missing: absent)."""
    lr_star: dict = {}
    alpha: dict = {}
    noisy_alpha: dict = {}
    table: dict = {}
    lr_specs = _tune_lr_specs(settings, master_seed)
    for d, m in settings.all_combos():
        mine = [sp for sp in lr_specs if (sp.dataset, sp.model) == (d, m)]
        if not all(_is_done(done, sp) for sp in mine):
            continue
        runs = [done[sp.run_id]["result"] for sp in mine]
        lr_star[(d, m)], scores = _choose(settings.lr_grid, runs)
        entry = {
            "lr_grid": list(settings.lr_grid),
            "lr_val_acc": scores,
            "lr_train_acc": [r["final"]["train_acc"] for r in runs],
            "lr_test_acc": [r["final"]["test_acc"] for r in runs],
            "lr_star": lr_star[(d, m)],
            "lr_small": lr_star[(d, m)] / settings.lr_ratio,
        }
        amine = [sp for sp in _tune_alpha_specs(settings, master_seed, lr_star) if (sp.dataset, sp.model) == (d, m)]
        if amine and all(_is_done(done, sp) for sp in amine):
            aruns = [done[sp.run_id]["result"] for sp in amine]
            alpha[(d, m)], ascores = _choose(settings.alpha_grid, aruns)
            entry.update(
                alpha_grid=list(settings.alpha_grid),
                alpha_val_acc=ascores,
                alpha_train_acc=[r["final"]["train_acc"] for r in aruns],
                alpha=alpha[(d, m)],
            )
        for w in settings.noisy_lrs if (d, m) in settings.noisy_combos else ():
            nmine = [
                sp for sp in _tune_noisy_alpha_specs(settings, master_seed, lr_star)
                if (sp.dataset, sp.model) == (d, m) and sp.variant.startswith(f"{w} ")
            ]  # fmt: skip
            if nmine and all(_is_done(done, sp) for sp in nmine):
                nruns = [done[sp.run_id]["result"] for sp in nmine]
                noisy_alpha[(d, m, w)], nscores = _choose(settings.noisy_alpha_grid, nruns, key="best_val_acc")
                entry.setdefault("noisy", {})[w] = {
                    "lr": nmine[0].lr,
                    "alpha_grid": list(settings.noisy_alpha_grid),
                    "alpha_best_val_acc": nscores,
                    "alpha_final_noisy_acc": [r["final"]["noisy_acc"] for r in nruns],
                    "alpha": noisy_alpha[(d, m, w)],
                }
        table[f"{d}/{m}"] = entry
    return lr_star, alpha, noisy_alpha, table


def count_runs(settings: Settings) -> int:
    """Number of runs in the study: tuning runs plus ``n_seeds`` runs of every configuration."""
    n_combo = len(settings.all_combos())
    tuning = n_combo * len(settings.lr_grid) + len(settings.combos) * len(settings.alpha_grid)
    tuning += len(settings.noisy_settings()) * len(settings.noisy_alpha_grid)
    return tuning + settings.n_seeds * (
        len(CLEAN_VARIANTS) * len(settings.combos) + len(settings.noisy_variants()) * len(settings.noisy_settings())
    )


# --------------------------------------------------------------------------- run files
def _run_path(runs_dir: Path, run_id: str) -> Path:
    return runs_dir / f"{run_id}.json"


def _write_json(path: Path, obj: Any, indent: int | None = 1) -> None:
    from .._io import write_json

    write_json(path, obj, indent=indent)


def _execute(spec: RunSpec, settings: Settings, runs_dir: str) -> tuple[str, dict, float]:
    """Train ``spec``, write its run file atomically, return (run id, record, seconds)."""
    start = time.perf_counter()
    result = train_one(spec, settings)
    seconds = time.perf_counter() - start
    record = {
        "run_id": spec.run_id,
        "fingerprint": settings.fingerprint(),
        "spec": asdict(spec),
        "result": result,
        "seconds": round(seconds, 3),
    }
    _write_json(_run_path(Path(runs_dir), spec.run_id), record, indent=None)
    return spec.run_id, record, seconds


def _load_runs(runs_dir: Path, settings: Settings) -> dict[str, dict]:
    done: dict[str, dict] = {}
    if not runs_dir.is_dir():
        return done
    fp = settings.fingerprint()
    for path in sorted(runs_dir.glob("*.json")):
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise TorchfimError(f"cannot read the run file {str(path)!r} ({exc}); delete it and rerun with --resume")
        if record.get("fingerprint") != fp:
            raise TorchfimError(
                f"the run file {str(path)!r} was made with different settings (another preset, or another "
                "version of the study); use a new --out folder or delete its runs/ folder"
            )
        done[record["run_id"]] = record
    return done


# --------------------------------------------------------------------------- the study
class _Executor:
    """Runs specs one at a time in this process (jobs = 1) or in a pool of ``jobs`` processes."""

    def __init__(self, jobs: int):
        self.jobs = jobs
        self.pool = None
        if jobs > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"))

    def map(self, specs: list[RunSpec], settings: Settings, runs_dir: Path) -> Iterator[tuple[str, dict, float]]:
        if self.pool is None:
            for s in specs:
                yield _execute(s, settings, str(runs_dir))
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        pending = {self.pool.submit(_execute, s, settings, str(runs_dir)) for s in specs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(finished, key=lambda f: f.result()[0]):
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool = None


def run(
    out: str | os.PathLike,
    settings: Settings = FULL,
    master_seed: int = 0,
    resume: bool = False,
    jobs: int = 1,
    progress: bool = True,
    max_runs: int | None = None,
    on_run: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Run (or finish, with ``resume``) the study in ``out``; return ``results.json``'s content.

    Returns None when ``max_runs`` new runs were done before the study was complete (the run
    files are kept; call again with ``resume=True`` to finish). ``on_run(run_id)`` is called after
    each run file is written (raising there stops the study; the files written so far are kept).
    """
    from tqdm.auto import tqdm

    out = Path(out)
    runs_dir = out / "runs"
    done = _load_runs(runs_dir, settings)
    if done and not resume:
        raise TorchfimError(
            f"{str(runs_dir)!r} already holds {len(done)} finished runs; pass --resume to finish that "
            "study, or choose another --out folder"
        )
    runs_dir.mkdir(parents=True, exist_ok=True)
    total = count_runs(settings)
    timings: dict[str, float] = {k: v.get("seconds", 0.0) for k, v in done.items()}
    start = time.perf_counter()
    new = 0
    bar = tqdm(total=total, desc="explosion", unit="run", disable=not progress, file=sys.stderr)
    executor = _Executor(jobs)
    stopped = False
    try:

        def phase(specs: list[RunSpec]) -> bool:
            nonlocal new
            wanted = {s.run_id for s in specs if _is_done(done, s)}
            bar.update(sum(1 for k in done if k in wanted and k not in counted))
            counted.update(k for k in done if k in wanted)
            todo = [s for s in specs if not _is_done(done, s)]
            if max_runs is not None:
                todo = todo[: max(0, max_runs - new)]
            if todo:
                bar.set_postfix_str(_postfix(todo[0]), refresh=False)
            for run_id, record, seconds in executor.map(todo, settings, runs_dir):
                done[run_id] = record
                counted.add(run_id)
                timings[run_id] = round(seconds, 3)
                new += 1
                bar.update(1)
                nxt = next((s for s in todo if not _is_done(done, s)), None)
                bar.set_postfix_str(_postfix(nxt) if nxt else "", refresh=True)
                if on_run is not None:
                    on_run(run_id)
            return all(_is_done(done, s) for s in specs)

        counted: set[str] = set()
        ok = phase(_tune_lr_specs(settings, master_seed))
        if ok:
            lr_star, _, _, _ = tuned(settings, master_seed, done)
            ok = phase(_tuning_specs(settings, master_seed, lr_star))
        if ok:
            lr_star, alpha, noisy_alpha, _ = tuned(settings, master_seed, done)
            ok = phase(_main_specs(settings, master_seed, lr_star, alpha, noisy_alpha))
        stopped = not ok
    except BaseException:
        executor.close(cancel=True)
        raise
    finally:
        executor.close()
        bar.close()
    wall = time.perf_counter() - start
    _write_timings(out / FILES["timings"], timings, {"runs": new, "wall_seconds": round(wall, 1), "jobs": jobs,
                                                     "complete": not stopped})  # fmt: skip
    if stopped:
        return None
    results = json.loads(json.dumps(assemble(settings, master_seed, done)))  # as results.json reads back
    _write_outputs(out, results)
    return results


def _write_timings(path: Path, timings: dict[str, float], invocation: dict[str, Any]) -> None:
    """``timings.json``: seconds per run and one entry per invocation (kept across ``--resume``)."""
    history: list = []
    if path.exists():
        try:
            history = list(json.loads(path.read_text(encoding="utf-8")).get("invocations", []))
        except (OSError, ValueError, AttributeError):
            history = []
    history.append(invocation)
    _write_json(path, {
        "note": "wall-clock seconds; they depend on the machine and its load, and are kept out of results.json",
        "run_seconds_total": round(sum(timings.values()), 1),
        "invocations": history,
        "seconds_per_run": dict(sorted(timings.items())),
    })  # fmt: skip


def _is_done(done: dict[str, dict], spec: RunSpec) -> bool:
    """A run file for ``spec`` exists and was made for this very spec (learning rate, α, seed, ...)."""
    record = done.get(spec.run_id)
    return record is not None and record["spec"] == json.loads(json.dumps(asdict(spec)))


def _postfix(spec: RunSpec) -> str:
    s = f"{spec.phase} {spec.dataset}/{spec.model} {spec.variant}"
    return s + (f" seed {spec.seed_index}" if spec.seed_index is not None else "")


# --------------------------------------------------------------------------- aggregation
def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": _r(arr.mean()),
        "std": _r(arr.std(ddof=1)) if arr.size > 1 else None,
        "values": [_r(v) for v in arr],
    }


def _compare(name: str, claim: str, combo: str, a_label: str, b_label: str, metric: str, a, b) -> dict:
    r = prob_outperform(list(a), list(b), generator_or_seed=0)
    return {
        "name": name,
        "claim": claim,
        "combo": combo,
        "a": a_label,
        "b": b_label,
        "metric": metric,
        "p": _r(r.p),
        "ci_low": _r(r.ci_low),
        "ci_high": _r(r.ci_high),
        "n": r.n,
        "conclusion": r.conclusion,
        "significant": r.significant,
        "meaningful": r.meaningful,
        "line": f"P({a_label} > {b_label}) [{metric}]: {r}",
    }


def _mean_curve(runs: list[dict], key: str) -> dict[str, list]:
    steps = runs[0]["result"]["curves"]["step"]
    cols = []
    for r in runs:
        c = r["result"]["curves"]
        if c["step"] != steps:  # diverged run: pad with None
            vals = dict(zip(c["step"], c[key]))
            cols.append([vals.get(s) for s in steps])
        else:
            cols.append(c[key])
    mean, std, lo, hi = [], [], [], []
    for i in range(len(steps)):
        vals = [col[i] for col in cols if col[i] is not None]
        mean.append(_r(np.mean(vals)) if vals else None)
        std.append(_r(np.std(vals, ddof=1)) if len(vals) > 1 else None)
        lo.append(_r(min(vals)) if vals else None)
        hi.append(_r(max(vals)) if vals else None)
    return {"step": steps, "mean": mean, "std": std, "min": lo, "max": hi}


def assemble(settings: Settings, master_seed: int, done: dict[str, dict]) -> dict[str, Any]:
    """``results.json``'s content, from the finished run records (independent of their order)."""
    lr_star, alpha, noisy_alpha, tuning = tuned(settings, master_seed, done)
    study_seeds = seeds(settings.n_seeds, master_seed)
    missing_combos = [c for c in settings.all_combos() if c not in lr_star or (c in settings.combos and c not in alpha)]
    missing_combos += [c for c in settings.noisy_settings() if c not in noisy_alpha]
    if missing_combos:
        raise TorchfimError(f"tuning runs are missing for {missing_combos[0]}; rerun with --resume")
    specs = _main_specs(settings, master_seed, lr_star, alpha, noisy_alpha)
    all_specs = _tune_lr_specs(settings, master_seed) + _tuning_specs(settings, master_seed, lr_star) + specs
    ids = [s.run_id for s in all_specs]
    missing = [s.run_id for s in all_specs if not _is_done(done, s)]
    if missing:
        raise TorchfimError(f"{len(missing)} runs are missing (e.g. {missing[0]}); rerun with --resume")

    def group(phase: str, d: str, m: str, variant: str) -> list[dict]:
        return [done[s.run_id] for s in specs if (s.phase, s.dataset, s.model, s.variant) == (phase, d, m, variant)]

    extra = {s.run_id: _extra(done[s.run_id]["result"], settings, s.dataset) for s in specs}

    def metric(runs: list[dict], key: str) -> list[float]:
        return [r["result"]["final"][key] if key in r["result"]["final"] else extra[r["run_id"]][key] for r in runs]

    aggregates: dict[str, Any] = {}
    curves: dict[str, Any] = {}
    comparisons: list[dict] = []
    pooled: dict[tuple[str, str], tuple] = {}  # (comparison, pooled label) -> (a, b, claim, a label, b label, metric)
    for d, m in settings.combos:
        combo = f"{d}/{m}"
        g = {v: group("clean", d, m, v) for v in CLEAN_VARIANTS}
        agg: dict[str, Any] = {}
        for v, runs in g.items():
            agg[v] = {
                "lr": runs[0]["spec"]["lr"],
                "alpha": runs[0]["spec"]["alpha"],
                "diverged": sum(r["result"]["diverged"] for r in runs),
            }
            for key in ("test_acc", "test_acc_at_best_val", "train_acc", "val_acc", "peak_trace", "step_of_peak_trace",
                        "stderr_at_peak", "trace_at_threshold", "step_at_threshold", "final_trace"):  # fmt: skip
                vals = metric(runs, key)
                agg[v][key] = _stats(vals) if all(x is not None for x in vals) else None
        large, small, fp = (np.mean(metric(g[v], "test_acc")) for v in CLEAN_VARIANTS)
        agg["gap_closed"] = _r((fp - small) / (large - small)) if large != small else None
        aggregates[combo] = agg
        curves[combo] = {v: {k: _mean_curve(g[v], k) for k in ("trace", "train_acc", "test_acc")} for v in CLEAN_VARIANTS}
        peaks = {v: metric(g[v], "peak_trace") for v in CLEAN_VARIANTS}
        early = {v: metric(g[v], "trace_at_threshold") for v in CLEAN_VARIANTS}
        agg["peak_ratio_small_over_large"] = _r(np.mean(peaks["small"]) / np.mean(peaks["large"]))
        tests = {v: metric(g[v], "test_acc") for v in CLEAN_VARIANTS}
        rows = [
            ("a_explosion", "a", "small LR", "large LR", "peak Tr(F)", peaks["small"], peaks["large"]),
            ("a_explosion_early", "a", "small LR", "large LR",
             f"Tr(F_i): Tr(F) when the training loss first falls below {settings.loss_threshold:g}",
             early["small"], early["large"]),
            ("a_fp_lowers_peak", "a", "small LR", "small LR + FP", "peak Tr(F)", peaks["small"], peaks["small_fp"]),
            ("b_large_beats_small", "b", "large LR", "small LR", "final test accuracy", tests["large"], tests["small"]),
            ("b_fp_beats_small", "b", "small LR + FP", "small LR", "final test accuracy", tests["small_fp"], tests["small"]),
            ("b_large_vs_fp", "b", "large LR", "small LR + FP", "final test accuracy", tests["large"], tests["small_fp"]),
        ]
        for name, claim, al, bl, met, a, b in rows:
            if all(x is not None for x in list(a) + list(b)):
                comparisons.append(_compare(name, claim, combo, al, bl, met, a, b))
                pa, pb = pooled.setdefault((name, POOLED), ([], [], claim, al, bl, met))[:2]
                pa.extend(a)
                pb.extend(b)

    for d, m, w in settings.noisy_settings():
        label = _noisy_label(d, m, w, settings)
        variants = settings.noisy_variants()
        g = {v: group("noisy", d, m, f"{w}_{v}") for v in variants}
        agg = aggregates.setdefault(label, {})
        for v, runs in g.items():
            agg[v] = {
                "lr": runs[0]["spec"]["lr"],
                "alpha": runs[0]["spec"]["alpha"],
                "noise_fraction": settings.noise_fraction,
                "n_noisy": [r["result"]["n_noisy"] for r in runs],
                "diverged": sum(r["result"]["diverged"] for r in runs),
            }
            for key in ("clean_acc", "noisy_acc", "clean_acc_auc", "noisy_acc_auc", "test_acc", "test_acc_at_best_val",
                        "peak_trace"):  # fmt: skip
                vals = metric(g[v], key)
                agg[v][key] = _stats(vals) if all(x is not None for x in vals) else None
        curves[label] = {
            v: {k: _mean_curve(g[v], k) for k in ("clean_acc", "noisy_acc", "trace", "test_acc")} for v in variants
        }

        def ratio(fp: str, key: str) -> list[float]:
            return [
                (f["result"]["final"][key] / b["result"]["final"][key]) if b["result"]["final"][key] else 1.0
                for f, b in zip(g[fp], g["base"])
            ]

        rows = []
        for fp in variants[1:]:
            sfx = "" if fp == "fp" else "_fixed"
            pen = f"FP, α={g[fp][0]['spec']['alpha']:g}" if fp == "fp_fixed" else "FP, tuned α"
            rel_noisy, rel_clean = ratio(fp, "noisy_acc_auc"), ratio(fp, "clean_acc_auc")
            agg[f"{fp}_over_base_noisy_auc"] = _stats(rel_noisy)
            agg[f"{fp}_over_base_clean_auc"] = _stats(rel_clean)
            rows += [
                (f"c_fp{sfx}_slows_noisy", "c", "no penalty", pen, "noisy-subset train accuracy, mean over training",
                 metric(g["base"], "noisy_acc_auc"), metric(g[fp], "noisy_acc_auc")),
                (f"c{sfx}_noisy_slowed_more", "c", f"clean ({pen})/(no penalty)", f"noisy ({pen})/(no penalty)",
                 "(penalty / no penalty) train accuracy, mean over training", rel_clean, rel_noisy),
                (f"c_fp{sfx}_final_noisy", "c", "no penalty", pen, "final noisy-subset train accuracy",
                 metric(g["base"], "noisy_acc"), metric(g[fp], "noisy_acc")),
                (f"c_fp{sfx}_test", "c", pen, "no penalty", "test accuracy at best validation step",
                 metric(g[fp], "test_acc_at_best_val"), metric(g["base"], "test_acc_at_best_val")),
            ]  # fmt: skip
        for name, claim, al, bl, met, a, b in rows:
            comparisons.append(_compare(name, claim, label, al, bl, met, a, b))
            pa, pb = pooled.setdefault((name, _noisy_pooled(w, settings)), ([], [], claim, al, bl, met))[:2]
            pa.extend(a)
            pb.extend(b)

    for (name, label), (a, b, claim, al, bl, met) in pooled.items():
        if len(a) > len(study_seeds):  # more than one data set and model
            comparisons.append(_compare(name, claim, label, al, bl, met, a, b))

    runs_out = {i: {"spec": done[i]["spec"], "result": done[i]["result"]} for i in ids}
    return {
        "experiment": "explosion",
        "version": RESULTS_VERSION,
        "paper": "Jastrzębski et al., Catastrophic Fisher Explosion: Early Phase Fisher Matrix Impacts Generalization, ICML 2021",
        "settings": asdict(settings),
        "master_seed": master_seed,
        "seeds": study_seeds,
        "tuning_seed": tuning_seed(master_seed),
        "tuning": tuning,
        "aggregates": aggregates,
        "comparisons": comparisons,
        "verdicts": _verdicts(settings, aggregates, comparisons),
        "curves": curves,
        "runs": runs_out,
    }


def _extra(result: dict, settings: Settings, dataset: str) -> dict[str, float | None]:
    """Numbers derived from a run's curves: the standard error of the peak Tr(F) measurement, and the
    paper's early-phase Tr(Fᵢ), Tr(F) at the first measurement where the training loss is below
    ``loss_threshold`` (None if it never gets there), with the step it happens at."""
    c = result["curves"]
    pairs = [(t, e) for t, e in zip(c["trace"], c["trace_stderr"]) if t is not None]
    err = max(pairs, key=lambda p: p[0])[1] if pairs else None
    at = next(
        (i for i, (t, loss) in enumerate(zip(c["trace"], c["train_loss"]))
         if t is not None and loss is not None and loss <= settings.loss_threshold),
        None,
    )  # fmt: skip
    return {
        "stderr_at_peak": err,
        "trace_at_threshold": None if at is None else c["trace"][at],
        "step_at_threshold": None if at is None else c["step"][at],
    }


def _find(comparisons: list[dict], name: str, combo: str) -> dict | None:
    return next((c for c in comparisons if c["name"] == name and c["combo"] == combo), None)


def _noisy_pooled(which: str, settings: Settings | dict) -> str:
    return f"all noisy, {_lr_text(which, settings)} (pooled)"


POOLED = "all (pooled)"
CLEAN_CLAIMS = ("a_explosion", "a_explosion_early", "a_fp_lowers_peak", "b_large_beats_small", "b_fp_beats_small")
NOISY_CLAIMS = (
    "c_fp_slows_noisy", "c_noisy_slowed_more", "c_fp_test",
    "c_fp_fixed_slows_noisy", "c_fixed_noisy_slowed_more", "c_fp_fixed_test",
)  # fmt: skip


def _verdicts(settings: Settings, aggregates: dict, comparisons: list[dict]) -> dict[str, Any]:
    """Per claim and configuration: 'held', 'not significant' or 'opposite', from prob_outperform's conclusion.

    ``{"clean": {data/model or pooled: {claim: verdict, "b_gap_closed": x}}, "noisy": {label: {claim: verdict}}}``.
    """

    def v(name: str, combo: str) -> str | None:
        c = _find(comparisons, name, combo)
        if c is None:
            return None
        return {"A better": "held", "B better": "opposite"}.get(c["conclusion"], "not significant")

    clean: dict[str, Any] = {}
    combos = [f"{d}/{m}" for d, m in settings.combos]
    for combo in combos + ([POOLED] if len(combos) > 1 else []):
        clean[combo] = {k: v(k, combo) for k in CLEAN_CLAIMS}
        clean[combo]["b_gap_closed"] = aggregates.get(combo, {}).get("gap_closed")
    noisy: dict[str, Any] = {}
    for w in settings.noisy_lrs:
        labels = [_noisy_label(d, m, w, settings) for d, m in settings.noisy_combos]
        for label in labels + ([_noisy_pooled(w, settings)] if len(labels) > 1 else []):
            noisy[label] = {k: v(k, label) for k in NOISY_CLAIMS if _find(comparisons, k, label) is not None}
    return {"clean": clean, "noisy": noisy}


# --------------------------------------------------------------------------- outputs
def _write_outputs(out: Path, results: dict[str, Any]) -> None:
    from .._io import write_text

    _write_json(out / FILES["json"], results, indent=None)
    figures = _plot(out, results)
    write_text(out / FILES["summary"], _summary(results, figures))


def _plot(out: Path, results: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from .._io import save_figure

    written = []
    s = results["settings"]
    for combo in [f"{d}/{m}" for d, m in s["combos"]]:
        cur = results["curves"][combo]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for v in CLEAN_VARIANTS:
            for ax, key in zip(axes, ("trace", "train_acc", "test_acc")):
                _band(ax, cur[v][key], COLORS[v], LABELS[v], minmax=key == "trace")
        axes[0].set_yscale("log")
        axes[0].set_ylabel("Tr(F) on held training inputs")
        axes[1].set_ylabel("train accuracy")
        axes[2].set_ylabel("test accuracy")
        for ax in axes:
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[2].legend(fontsize=8, loc="lower right")
        n = s["n_seeds"]
        fig.suptitle(f"{combo}: mean over {n} seeds; bands: min–max (Tr(F)), ± 1 std (accuracy)", fontsize=10)
        fig.tight_layout()
        name = f"curves_{combo.replace('/', '_')}.png"
        save_figure(fig, out / name, dpi=90)
        plt.close(fig)
        written.append(name)

    ncombos, lrs = s["noisy_combos"], s["noisy_lrs"]
    if ncombos and lrs:
        fig, axes = plt.subplots(len(lrs), len(ncombos), figsize=(4.4 * len(ncombos), 3.5 * len(lrs)), squeeze=False)
        for row, w in zip(axes, lrs):
            for ax, (d, m) in zip(row, ncombos):
                label = _noisy_label(d, m, w, s)
                cur = results["curves"][label]
                for v in [v for v in NOISY_VARIANTS if v in cur]:
                    alpha = results["aggregates"][label][v]["alpha"]
                    name = f"{LABELS[v]} = {alpha:g}" if alpha else LABELS[v]
                    _band(ax, cur[v]["clean_acc"], COLORS[v], f"{name}: clean subset", ls="-")
                    _band(ax, cur[v]["noisy_acc"], COLORS[v], f"{name}: noisy subset", ls="--")
                ax.set_title(f"{d}/{m}, η = {_lr_text(w, s)}, {100 * s['noise_fraction']:g}% labels redrawn", fontsize=9)
                ax.set_xlabel("step")
                ax.set_ylabel("train accuracy (training labels)")
                ax.set_ylim(0, 1.02)
                ax.grid(alpha=0.3)
                ax.legend(fontsize=6.5, loc="center right")
        fig.suptitle(f"Fitting of clean and noisy training labels: mean ± std over {s['n_seeds']} seeds", fontsize=10)
        fig.tight_layout()
        save_figure(fig, out / FILES["memorisation"], dpi=90)
        plt.close(fig)
        written.append(FILES["memorisation"])
    return written


def _band(ax: Any, c: dict, color: str, label: str, ls: str = "-", minmax: bool = False) -> None:
    keep = [i for i, m in enumerate(c["mean"]) if m is not None]
    steps = [c["step"][i] for i in keep]
    mean = np.array([c["mean"][i] for i in keep])
    if minmax:
        low, high = np.array([c["min"][i] for i in keep]), np.array([c["max"][i] for i in keep])
    else:
        std = np.array([c["std"][i] if c["std"][i] is not None else 0.0 for i in keep])
        low, high = mean - std, mean + std
    ax.plot(steps, mean, color=color, ls=ls, lw=1.4, label=label)
    ax.fill_between(steps, low, high, color=color, alpha=0.18, lw=0)


def _pm(stat: dict | None, pct: bool = False, digits: int = 1) -> str:
    if stat is None:
        return "n/a"
    k = 100.0 if pct else 1.0
    sd = stat["std"]
    return f"{k * stat['mean']:.{digits}f} ± {k * sd:.{digits}f}" if sd is not None else f"{k * stat['mean']:.{digits}f}"


def _summary(results: dict[str, Any], figures: list[str]) -> str:
    """``summary.md``: settings, tuning, tables, prob_outperform lines and which claims held."""
    s = results["settings"]
    agg = results["aggregates"]
    comps = results["comparisons"]
    verdicts = results["verdicts"]
    combos = [f"{d}/{m}" for d, m in s["combos"]]
    ncombos = [f"{d}/{m}" for d, m in s["noisy_combos"]]
    datasets = sorted({d for d, _ in s["combos"] + s["noisy_combos"]})
    models = sorted({m for _, m in s["combos"] + s["noisy_combos"]})
    small = f"η*/{s['lr_ratio']:g}"
    data_text = {
        "digits": f"scikit-learn digits (8×8; a test set of {100 * s['test_fraction']:g}% of the 1797 images, drawn per seed)",
        "mnist1d": "MNIST-1D (generated locally with the `mnist1d` package's recipe: "
        + ("4000 train / 1000 test sequences" if s["mnist1d_samples"] is None else f"{s['mnist1d_samples']} sequences, 80/20")
        + ")",
    }
    model_text = {
        "mlp": f"MLP d→{s['mlp_width']}→{s['mlp_width']}→10 (ReLU)",
        "cnn": f"CNN of 3 ReLU convolutions ({s['cnn_channels']} channels; 1-D on MNIST-1D, 2-D on the 8×8 digits), "
        "two max-pools and a linear head",
    }
    digest_alpha = list(s["alpha_grid"]) == [0.01, 0.03, 0.1]
    lines = [
        "# Catastrophic Fisher explosion at CPU scale",
        "",
        f"Reproduction of Jastrzębski et al. (ICML 2021) with `torchfim explosion` (preset `{s['preset']}`, "
        f"master seed {results['master_seed']}, {s['n_seeds']} seeds per configuration). Every number is in "
        "`results.json`; this page is generated from it.",
        "",
        "## Setup",
        "",
        "* Data: " + "; ".join(data_text[d] for d in datasets)
        + f". Validation = {100 * s['val_fraction']:g}% of the training data, drawn per seed.",
        "* Models, no BatchNorm: " + "; ".join(model_text[m] for m in models) + ".",
        f"* SGD, momentum {s['momentum']}, batch {s['batch_size']}, constant learning rate, no weight decay, no augmentation; "
        + ", ".join(f"{st} steps on {d}" for d, st in s["steps"] if d in datasets)
        + ".",
        "* Tr(F): `torchfim.train.FisherTraceMonitor` (unbiased estimate from per-example squared score norms, one label "
        f"sampled from the model per input, with its standard error) on {s['monitor_inputs']} fixed training inputs, "
        f"every {s['eval_every_early']} steps before step {s['early_until']} and every {s['eval_every']} steps after. "
        "The figures show the mean over seeds with a min–max band (Tr(F)) or a ± 1 std band (accuracy); each measurement's own standard error is in `results.json` "
        "(`trace_stderr`), and its value at the peak is in the table below.",
        f"* Fisher penalty: `torchfim.train.FisherPenalty(kind=\"batch_gradient\", every={s['fp_every']})` (the paper's "
        "Eq. 3; its gradient is recomputed every 10 steps and reused in between), from step 0.",
        f"* η* is the learning rate of {list(s['lr_grid'])} with the best final validation accuracy on one tuning seed "
        f"(diverged runs excluded; ties go to the smaller value); the small learning rate is {small}. α is the value of "
        f"{list(s['alpha_grid'])}"
        + (" (the digest's grid for the paper's v = 0.01)" if digest_alpha else "")
        + f" with the best final validation accuracy at {small} with the penalty (ties: the smaller), on the same tuning seed. "
        "The tuning seed is none of the evaluation seeds.",
    ]
    nsets = [(d, m, w) for d, m in s["noisy_combos"] for w in s["noisy_lrs"]]
    if nsets:
        lrs = " and ".join(_lr_text(w, s) for w in s["noisy_lrs"])
        lines.append(
            f"* Label noise (claim c), on {', '.join(ncombos)}: {100 * s['noise_fraction']:g}% of the training labels "
            "redrawn uniformly from the 10 classes (a redraw may equal the true label, as in the paper); the *noisy* "
            "subset is the examples whose label changed, the *clean* subset the rest. Validation and test labels "
            f"are clean. Learning rate {lrs} (the paper does not say which learning rate its noisy-label runs used), "
            f"each with and without the penalty. Its α is tuned on the noisy-label runs at that learning rate, as the "
            f"paper tunes α separately there: the value of {list(s['noisy_alpha_grid'])} with the best validation "
            "accuracy over training (the paper's early stopping; ties: the smaller), on the tuning seed."
            + (
                f" A third configuration uses a fixed α = {s['noisy_fixed_alpha']:g} (the top of the digest's grid), to "
                "test the memorisation claim at a strength where the penalty acts whatever validation prefers."
                if s["noisy_fixed_alpha"] else ""
            )
        )
    lines += [
        "* Seeds: `torchfim.compare.seeds` gives one master seed per seed index, which `derive_seeds` splits into the "
        "seeds of the initialisation, data order, data split (validation/test sets, held Tr(F) inputs), label noise and "
        "label sampling (penalty and monitor). All configurations of one seed index share it, so comparisons are "
        "paired. `prob_outperform` (Bouthillier et al. 2021): 95% percentile-bootstrap interval; 'A better' only when "
        "the interval lies above 0.5 and reaches 0.75.",
        "",
        "## Tuning (one seed)",
        "",
        f"| data/model | final validation accuracy per η (grid order) | η* | final validation accuracy per α at {small} | α |",
        "|---|---|---|---|---|",
    ]
    for combo, t in results["tuning"].items():
        va = ", ".join("diverged" if x is None else f"{100 * x:.1f}%" for x in t["lr_val_acc"])
        aa = ", ".join("diverged" if x is None else f"{100 * x:.1f}%" for x in t.get("alpha_val_acc", []))
        alpha = "—" if "alpha" not in t else format(t["alpha"], "g")
        lines.append(f"| {combo} | {va} | {t['lr_star']:g} | {aa or '—'} | {alpha} |")
    noisy_rows = [(c, w, n) for c, t in results["tuning"].items() for w, n in t.get("noisy", {}).items()]
    if noisy_rows:
        lines += [
            "",
            "| data/model, noisy labels | η | best validation accuracy over training per α (grid order) | "
            "final noisy-subset train acc. per α | α |",
            "|---|---|---|---|---|",
        ]
        for combo, w, n in noisy_rows:
            va = ", ".join("diverged" if x is None else f"{100 * x:.1f}%" for x in n["alpha_best_val_acc"])
            na = ", ".join("n/a" if x is None else f"{100 * x:.1f}%" for x in n["alpha_final_noisy_acc"])
            lines.append(f"| {combo} | {_lr_text(w, s)} = {n['lr']:.4g} | {va} | {na} | {n['alpha']:g} |")

    lines += [
        "",
        "## (a) Tr(F) early in training and (b) final test accuracy",
        "",
        "Mean ± std over seeds. Peak Tr(F) is the largest measurement of the run (the paper's Table 4); Tr(Fᵢ) is the "
        f"paper's early-phase value, Tr(F) at the first measurement where the training loss is below ε = "
        f"{s['loss_threshold']:g} (ln 10 ≈ 2.3 at initialisation), with the step it happens at.",
        "",
        "| data/model | config | η | α | peak Tr(F) | its std. error (mean) | step of peak | Tr(Fᵢ) | step of Tr(Fᵢ) "
        "| final test acc. (%) | test acc. at best val. (%) | final train acc. (%) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for combo in combos:
        for v in CLEAN_VARIANTS:
            a = agg[combo][v]
            err = a["stderr_at_peak"]["mean"] if a["stderr_at_peak"] else None
            lines.append(
                f"| {combo} | {LABELS[v]} | {a['lr']:.4g} | {a['alpha']:g} | {_pm(a['peak_trace'], digits=1)} | "
                f"{'n/a' if err is None else format(err, '.1f')} | {_pm(a['step_of_peak_trace'], digits=0)} | "
                f"{_pm(a['trace_at_threshold'], digits=1)} | {_pm(a['step_at_threshold'], digits=0)} | "
                f"{_pm(a['test_acc'], True)} | {_pm(a['test_acc_at_best_val'], True)} | {_pm(a['train_acc'], True)} |"
            )
    if combos:
        lines += [
            "",
            "Ratio of mean peak Tr(F), small / large learning rate: "
            + ", ".join(f"{c}: {agg[c]['peak_ratio_small_over_large']:.2f}" for c in combos)
            + ". Fraction of the small-vs-large test-accuracy gap closed by the penalty, (FP − small)/(large − small) "
            "on the seed means: "
            + ", ".join(f"{c}: " + ("n/a" if agg[c]["gap_closed"] is None else f"{agg[c]['gap_closed']:.2f}") for c in combos)
            + ".",
        ]

    if nsets:
        lines += [
            "",
            "## (c) Memorisation of noisy labels",
            "",
            "Train accuracy against the labels used for training, on the clean and on the noisy subset (chance on the "
            "noisy subset is below 10%, since its labels differ from the true ones). 'Mean over training' averages all "
            "measurements (an area under the learning curve: lower = slower fitting).",
            "",
            "| data/model, η | config | clean final (%) | noisy final (%) | clean mean over training (%) | noisy mean over "
            "training (%) | test acc. at best val. (%) | final test acc. (%) | peak Tr(F) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for d, m, w in nsets:
            label = _noisy_label(d, m, w, s)
            for v in [v for v in NOISY_VARIANTS if v in agg[label]]:
                a = agg[label][v]
                lines.append(
                    f"| {d}/{m}, {_lr_text(w, s)} | {LABELS[v]} (η={a['lr']:.4g}, α={a['alpha']:g}) | "
                    f"{_pm(a['clean_acc'], True)} | {_pm(a['noisy_acc'], True)} | {_pm(a['clean_acc_auc'], True)} | "
                    f"{_pm(a['noisy_acc_auc'], True)} | {_pm(a['test_acc_at_best_val'], True)} | "
                    f"{_pm(a['test_acc'], True)} | {_pm(a['peak_trace'], digits=1)} |"
                )
        lines += [
            "",
            "Penalty / no-penalty ratio of the mean-over-training accuracy (mean ± std over seeds; below 1 = slower): "
            + "; ".join(
                f"{d}/{m} at {_lr_text(w, s)}, {LABELS[fp]}: "
                f"clean {_pm(agg[_noisy_label(d, m, w, s)][f'{fp}_over_base_clean_auc'], digits=2)}, "
                f"noisy {_pm(agg[_noisy_label(d, m, w, s)][f'{fp}_over_base_noisy_auc'], digits=2)}"
                for d, m, w in nsets
                for fp in ("fp", "fp_fixed")
                if f"{fp}_over_base_clean_auc" in agg[_noisy_label(d, m, w, s)]
            )
            + ".",
        ]

    lines += ["", "## prob_outperform (paired by seed)", "", "```"]
    for c in comps:
        lines.append(f"[{c['combo']}] {c['line']}")
    lines += ["```", "", "## Which claims held", ""]
    lines += _claims_text({**s, "_tuning": results["tuning"]}, verdicts, agg, combos, nsets)
    lines += ["", "## Figures", ""] + [f"* [{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


_CLAIMS = {
    "a_explosion": "(a) peak Tr(F) higher at η*/10 than at η*",
    "a_explosion_early": "(a) ... and Tr(Fᵢ) (at training loss ε) higher",
    "a_fp_lowers_peak": "(a) the penalty lowers the η*/10 peak Tr(F)",
    "b_large_beats_small": "(b) final test accuracy higher at η* than at η*/10",
    "b_fp_beats_small": "(b) the penalty raises η*/10's final test accuracy",
    "c_fp_slows_noisy": "(c) the penalty (tuned α) slows the fitting of the noisy labels",
    "c_noisy_slowed_more": "(c) ... relatively more than of the clean ones",
    "c_fp_test": "(c) the penalty (tuned α) raises test accuracy under label noise",
    "c_fp_fixed_slows_noisy": "(c) the penalty (fixed α) slows the fitting of the noisy labels",
    "c_fixed_noisy_slowed_more": "(c) ... relatively more than of the clean ones",
    "c_fp_fixed_test": "(c) the penalty (fixed α) raises test accuracy under label noise",
}


def _count(table: dict, key: str, labels: list[str], pooled: str | None) -> str:
    got = [table[c].get(key) for c in labels]
    held = [c for c, g in zip(labels, got) if g == "held"]
    opp = [c for c, g in zip(labels, got) if g == "opposite"]
    text = f"held in {len(held)} of {len(labels)}" + (f" ({', '.join(held)})" if held else "")
    if opp:
        text += f", significantly reversed in {', '.join(opp)}"
    if pooled is not None and pooled in table and table[pooled].get(key) is not None:
        text += f"; pooled: {table[pooled][key]}"
    return text


def _verdict_table(table: dict, keys: Sequence[str], extra: list[str] | None = None) -> list[str]:
    lines = ["| claim | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for key in keys:
        if any(key in table[c] for c in table):
            lines.append(f"| {_CLAIMS[key]} | " + " | ".join(str(table[c].get(key) or "—") for c in table) + " |")
    return lines + (extra or [])


def _claims_text(s: dict, verdicts: dict, agg: dict, combos: list[str], nsets: list) -> list[str]:
    clean, noisy = verdicts["clean"], verdicts["noisy"]
    lines = [
        "'held' = `prob_outperform` concluded 'A better' in the claim's direction; 'not significant' = no conclusion "
        f"(with {s['n_seeds']} seeds the interval excludes 0.5 only when (nearly) every seed agrees); 'opposite' = "
        "significant in the other direction. Pooled columns pair the runs of every data set and model.",
        "",
    ]
    if clean:
        gap = "| (b) fraction of the gap closed by the penalty (≥ 0.5 = 'most') | " + " | ".join(
            "—" if clean[c].get("b_gap_closed") is None else f"{clean[c]['b_gap_closed']:.2f}" for c in clean
        ) + " |"
        lines += _verdict_table(clean, CLEAN_CLAIMS, [gap]) + [""]
    if noisy:
        lines += _verdict_table(noisy, NOISY_CLAIMS) + [""]

    gaps = {c: agg[c]["gap_closed"] for c in combos}
    most = [c for c, g in gaps.items() if g is not None and g >= 0.5]
    pooled = POOLED if len(combos) > 1 else None
    lines += ["In words:", ""]
    if combos:
        lines.append(
            f"* **(a) Fisher explosion**, peak Tr(F) higher at the small learning rate: "
            f"{_count(clean, 'a_explosion', combos, pooled)}. Early-phase Tr(Fᵢ) (at the same training loss ε) higher: "
            f"{_count(clean, 'a_explosion_early', combos, pooled)}. The penalty lowering the small rate's peak: "
            f"{_count(clean, 'a_fp_lowers_peak', combos, pooled)}."
        )
        lines.append(
            f"* **(b) the small learning rate generalises worse**: {_count(clean, 'b_large_beats_small', combos, pooled)}. "
            f"**The penalty improves the small rate**: {_count(clean, 'b_fp_beats_small', combos, pooled)}; it closed "
            f"most (≥ half) of the gap in {len(most)} of {len(combos)}" + (f" ({', '.join(most)})" if most else "") + "."
        )
    for w in s["noisy_lrs"]:
        labels = [_noisy_label(d, m, w, s) for d, m in s["noisy_combos"]]
        pl = _noisy_pooled(w, s) if len(labels) > 1 else None
        lines.append(
            f"* **(c) at {_lr_text(w, s)}, the penalty with the tuned α slows memorisation of noisy labels**: "
            f"{_count(noisy, 'c_fp_slows_noisy', labels, pl)}; **relatively more than of clean ones**: "
            f"{_count(noisy, 'c_noisy_slowed_more', labels, pl)}. Test accuracy (at the best validation step) "
            f"improved by it: {_count(noisy, 'c_fp_test', labels, pl)}."
        )
        if s["noisy_fixed_alpha"]:
            lines.append(
                f"* **(c) at {_lr_text(w, s)}, with α = {s['noisy_fixed_alpha']:g}**: slows memorisation of noisy labels: "
                f"{_count(noisy, 'c_fp_fixed_slows_noisy', labels, pl)}; relatively more than of clean ones: "
                f"{_count(noisy, 'c_fixed_noisy_slowed_more', labels, pl)}; test accuracy improved: "
                f"{_count(noisy, 'c_fp_fixed_test', labels, pl)}."
            )
    tuning = s.get("_tuning", {})
    smallest = [c for c in combos if c in tuning and tuning[c].get("alpha") == min(s["alpha_grid"])]
    if smallest and len(s["alpha_grid"]) > 1:
        lines.append(
            f"* On the tuning seed the validation-chosen α was the smallest of {list(s['alpha_grid'])} on "
            f"{', '.join(smallest)}: stronger penalties did not raise validation accuracy there, so the penalised "
            "runs of (b) use a weak penalty."
        )
    under = [c for c in combos if agg[c]["small"]["train_acc"]["mean"] < 0.99]
    if under:
        lines.append(
            f"* Caveat: at the small learning rate the final training accuracy stayed below 99% on {', '.join(under)}, "
            "so there part of the small rate's test-accuracy deficit is under-fitting within the step budget, not only "
            "worse generalisation of a fitted network (the paper trains 300 epochs to ~100%)."
        )
    low = [
        (f"{d}/{m} at {_lr_text(w, s)}", agg[_noisy_label(d, m, w, s)]["base"]["noisy_acc"]["mean"]) for d, m, w in nsets
    ]
    low = [(c, x) for c, x in low if x < 0.9]
    if low:
        lines.append(
            "* Caveat: by the last step the un-penalised runs had fitted only "
            + ", ".join(f"{100 * x:.0f}% ({c})" for c, x in low)
            + " of the noisy labels, so only the first part of the memorisation curve is observed (the paper's "
            "baselines fit 74–100% of them after 300 epochs)."
        )
    for d, m, w in nsets:
        a = agg[_noisy_label(d, m, w, s)]
        base = a["base"]["clean_acc"]["mean"]
        for v in ("fp", "fp_fixed"):
            if v in a and a[v]["clean_acc"]["mean"] < 0.75 * base:
                n_low = sum(x < 0.5 for x in a[v]["clean_acc"]["values"])
                lines.append(
                    f"* Caveat: with α = {a[v]['alpha']:g} on {d}/{m} at {_lr_text(w, s)} the penalty also stopped the "
                    f"clean examples from being fitted (clean-subset train accuracy {100 * a[v]['clean_acc']['mean']:.0f}% "
                    f"against {100 * base:.0f}% without it; training collapsed, below 50%, in {n_low} of "
                    f"{len(a[v]['clean_acc']['values'])} seeds): α is too large there, the failure mode the digest warns "
                    "about, and that configuration's comparisons say more about under-fitting than about memorisation."
                )
    lines.append(
        "* Scale: networks of 10⁴–10⁵ parameters, 1–2 thousand SGD steps at a constant learning rate and one tuning "
        "seed, against the paper's ResNets/VGGs/DenseNets trained 300 epochs with step decays: agreement or "
        "disagreement here is evidence about small networks on small data, not a verdict on the paper's setting."
    )
    return lines


# --------------------------------------------------------------------------- command line




def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchfim explosion``."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (created if needed; default: {DEFAULT_OUT}/)")
    parser.add_argument("--quick", action="store_true",
                        help="one data set and model, fewer steps, 2 seeds (a few minutes at most; for smoke runs)")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the finished runs in DIR/runs/ and run only the missing ones")
    parser.add_argument("--seeds", type=positive_int, default=None, metavar="N",
                        help="seeds per configuration (default: 5, or 2 with --quick; at least 2)")
    parser.add_argument("--master-seed", type=nonnegative_int, default=0, metavar="S",
                        help="the study's master seed, from which every run's seeds derive (default: 0)")
    parser.add_argument("--jobs", type=positive_int, default=1, metavar="J",
                        help="runs in parallel, one thread each (default: 1; results do not depend on it)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-runs", type=positive_int, default=None, help=argparse.SUPPRESS)  # stop after N new runs


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run from parsed ``args`` (the ``torchfim explosion`` options) or from an argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m torchfim.experiments.explosion", description=HELP)
        add_arguments(parser)
        args = parser.parse_args(args)
    for module in ("matplotlib", "sklearn", "mnist1d", "tqdm"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(
                f"torchfim explosion needs the optional package {module!r}: pip install 'torchfim[cli]'"
            ) from exc
    settings = TINY if args.tiny else QUICK if args.quick else FULL
    if args.seeds is not None:
        if args.seeds < 2:
            raise TorchfimError("--seeds must be at least 2 (prob_outperform needs 2 paired runs)")
        settings = replace(settings, n_seeds=args.seeds)
    start = time.perf_counter()
    res = run(args.out, settings, master_seed=args.master_seed, resume=args.resume, jobs=args.jobs,
              progress=not args.no_progress, max_runs=args.max_runs)  # fmt: skip
    if res is None:
        print(f"stopped after {args.max_runs} runs; finish with the same command and --resume", file=sys.stderr)
        return 0
    out = Path(args.out)
    print(f"wrote {out / FILES['summary']}, {out / FILES['json']} and figures in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
