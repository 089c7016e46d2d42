"""The study's settings: the presets, a run's specification, and the names of configurations."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

__all__ = [
    "DEFAULT_OUT",
    "RESULTS_VERSION",
    "N_CLASSES",
    "FILES",
    "CLEAN_VARIANTS",
    "NOISY_VARIANTS",
    "LABELS",
    "POOLED",
    "Settings",
    "FULL",
    "QUICK",
    "TINY",
    "PRESETS",
    "RunSpec",
    "settings_from_json",
    "lr_text",
    "noisy_label",
    "noisy_pooled",
]

DEFAULT_OUT = "torchfim-explosion"
RESULTS_VERSION = 3
N_CLASSES = 10

FILES = {
    "json": "results.json",
    "summary": "summary.md",
    "timings": "timings.json",
    "memorisation": "memorisation.png",
}

#: Training configurations on clean labels, in plotting order.
CLEAN_VARIANTS = ("large", "small", "small_fp")
#: Training configurations on noisy labels.
NOISY_VARIANTS = ("base", "fp", "fp_fixed")
#: Display name of each configuration.
LABELS = {
    "large": "η* (large LR)",
    "small": "η*/10 (small LR)",
    "small_fp": "η*/10 + Fisher penalty",
    "base": "no penalty",
    "fp": "Fisher penalty, tuned α",
    "fp_fixed": "Fisher penalty, fixed α",
}
#: The label of comparisons that pool every clean data set and model.
POOLED = "all (pooled)"


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
    #: Evaluation seeds: 6, the fewest with which one data set and model can reach a verdict of its own (the exact
    #: sign test of 6 agreeing pairs gives p = 0.031; of 5, 0.062).
    n_seeds: int = 6
    #: Tuning seeds (none of them an evaluation seed): η* and α maximise the mean over these seeds
    #: of the best validation accuracy over training.
    n_tuning_seeds: int = 2
    #: The least training epochs of a run, by data set (the same for every configuration of a data set): MNIST-1D
    #: the protocol's 100; digits, where the un-penalised small-learning-rate runs reach 100% training
    #: accuracy. A run goes on past them until its training accuracy has plateaued (:meth:`plateaued`), checked
    #: every tenth of them, up to ``max_epochs``.
    epochs: tuple[tuple[str, int], ...] = (("digits", 250), ("mnist1d", 100))
    #: The most training epochs of a run, by data set: a run still moving there stops, and the summary names it.
    max_epochs: tuple[tuple[str, int], ...] = (("digits", 1000), ("mnist1d", 400))
    batch_size: int = 128
    momentum: float = 0.9
    #: η* is chosen inside the grid: 1.0 above 0.316, which digits/MLP chose as the top of the earlier grid.
    lr_grid: tuple[float, ...] = (0.0316, 0.1, 0.316, 1.0)
    lr_ratio: float = 10.0
    alpha_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    fp_every: int = 10
    #: Fraction of the training examples whose label is replaced by a uniform draw (claim c).
    noise_fraction: float = 0.25
    #: Learning rates of the noisy-label runs: "small" (η*/10) and/or "large" (η*).
    noisy_lrs: tuple[str, ...] = ("small", "large")
    #: α grid of the noisy-label runs, tuned on them (best validation accuracy over training, the
    #: paper's early stopping), as the paper tunes its noisy-label α separately.
    noisy_alpha_grid: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)
    #: A second penalised configuration on noisy labels with this fixed α (None: none), to test the
    #: memorisation claim at a strength where the penalty acts, whatever validation prefers.
    noisy_fixed_alpha: float | None = None
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
    #: ε of the paper's early-phase value Tr(Fᵢ): Tr(F) when the training loss first falls to ε or below
    #: (analysis only; ln 10 ≈ 2.3 at initialisation, the paper uses 1.2 on CIFAR-10).
    loss_threshold: float = 1.0
    #: A run, and a configuration on the mean over its seeds, has plateaued when its training accuracy moved by at
    #: most this much over the last fifth of training.
    plateau_tolerance: float = 0.01

    def epochs_for(self, dataset: str) -> int:
        """The least training epochs of a run on ``dataset``."""
        return dict(self.epochs)[dataset]

    def max_epochs_for(self, dataset: str) -> int:
        """The most training epochs of a run on ``dataset`` (never fewer than the least)."""
        return max(dict(self.max_epochs).get(dataset, 0), self.epochs_for(dataset))

    def plateau_every(self, dataset: str) -> int:
        """Epochs between two plateau checks of a run on ``dataset`` past its least epochs: a tenth of them."""
        return max(1, self.epochs_for(dataset) // 10)

    def plateaued(self, at_four_fifths: float, end: float) -> bool:
        """Whether a training accuracy of ``at_four_fifths`` at four fifths of training and ``end`` at its end has
        plateaued: moved by at most ``plateau_tolerance``."""
        return abs(end - at_four_fifths) <= self.plateau_tolerance

    def steps_per_epoch(self, n_train: int) -> int:
        """Mini-batches per epoch: whole ones only (the last ``n_train mod batch_size`` inputs of each epoch's order
        are left out)."""
        return n_train // self.batch_size

    def is_eval_step(self, step: int) -> bool:
        """Whether Tr(F) and the accuracies are measured before ``step``."""
        every = self.eval_every_early if step < self.early_until else self.eval_every
        return step % every == 0

    def noisy_variants(self) -> tuple[str, ...]:
        """The noisy-label configurations (the fixed-α one only with ``noisy_fixed_alpha``)."""
        return NOISY_VARIANTS if self.noisy_fixed_alpha else NOISY_VARIANTS[:2]

    def noisy_settings(self) -> tuple[tuple[str, str, str], ...]:
        """(dataset, model, learning-rate name) of every noisy-label configuration pair."""
        return tuple((d, m, lr) for d, m in self.noisy_combos for lr in self.noisy_lrs)

    def all_combos(self) -> tuple[tuple[str, str], ...]:
        """Every (data set, model) pair of the study, clean and noisy, in order, once each."""
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
    "preset", "combos", "noisy_combos", "n_seeds", "n_tuning_seeds", "lr_grid", "lr_ratio", "alpha_grid", "noisy_lrs", "noise_fraction",
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
    epochs=(("digits", 30), ("mnist1d", 12)),
    max_epochs=(("digits", 60), ("mnist1d", 24)),
    lr_grid=(0.03, 0.1, 0.3),
    alpha_grid=(0.03, 0.1),
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
    epochs=(("digits", 4), ("mnist1d", 2)),
    max_epochs=(("digits", 8), ("mnist1d", 4)),
    lr_grid=(0.05, 0.2),
    alpha_grid=(0.03,),
    noisy_alpha_grid=(0.03,),
    noisy_fixed_alpha=0.1,  # the fixed-α configuration's code path
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
    seed_index: int | None  # index in the study's seed list; None for a tuning run
    tuning_index: int | None = None  # index in the tuning seeds; None for an evaluation run


def _tuples(value: object) -> object:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def settings_from_json(data: dict) -> Settings:
    """The :class:`Settings` stored in a ``results.json`` (its ``"settings"``; JSON lists back to tuples)."""
    return Settings(**{k: _tuples(v) for k, v in data.items()})


def lr_text(which: str, settings: Settings | dict) -> str:
    """``η*/10`` for the small learning rate, ``η*`` for the large one (``settings``: a Settings or
    its dict in results.json)."""
    ratio = settings.lr_ratio if isinstance(settings, Settings) else settings["lr_ratio"]
    return f"η*/{ratio:g}" if which == "small" else "η*"


def noisy_label(d: str, m: str, which: str, settings: Settings | dict) -> str:
    """The label of one noisy-label configuration: data set/model and learning rate."""
    return f"{d}/{m} noisy, {lr_text(which, settings)}"


def noisy_pooled(which: str, settings: Settings | dict) -> str:
    """The label of the comparisons that pool every noisy-label data set and model at one learning rate."""
    return f"all noisy, {lr_text(which, settings)} (pooled)"
