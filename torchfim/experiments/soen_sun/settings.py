"""What defines a run of the study: the settings, its presets, the bounds compared and the files."""

from __future__ import annotations

from dataclasses import dataclass

from ...toy import ACTIVATIONS

__all__ = [
    "DEFAULT_OUT",
    "ACTIVATIONS",
    "BOUNDS",
    "ZERO_VARIANCE_RTOL",
    "REL_ERROR",
    "FILES",
    "Settings",
    "FULL",
    "QUICK",
]

DEFAULT_OUT = "torchfim-soen-sun"

#: The bounds compared with the exact variance in experiment (a).
BOUNDS = ("score_spectral", "score_kurtosis", "score_tightest", "hessian_spectral")
#: An entry's variance counts as zero, and its bound ratio is not formed, when it is at most this
#: fraction of the square of its own Fisher entry I_pp. Var(Î1)_pp is a difference of two terms whose
#: sum over inputs is at most Var + I_pp², so below that it cannot be told from round-off; the exact
#: zeros (parameters the inputs never reach, ∂²o/∂θ_p² = 0 for Î2) are at 0. The scale is the entry's own:
#: a small but real variance (a weight on a pixel that is rarely on) keeps its ratio.
ZERO_VARIANCE_RTOL = 1e-10
REL_ERROR = 0.1
FILES = {
    "json": "results.json",
    "csv": "results.csv",
    "summary": "summary.md",
    "timings": "timings.json",
    "fig_a": "fig_a_bound_ratios.png",
    "fig_b": "fig_b_variance_by_activation.png",
    "fig_c": "fig_c_depth_width.png",
    "fig_d": "fig_d_training.png",
}


@dataclass(frozen=True)
class Settings:
    """Everything that defines a run (stored in ``results.json``)."""

    n_inputs: int = 128
    width: int = 16
    depth: int = 2
    activations: tuple[str, ...] = ("relu", "tanh", "sigmoid", "softplus", "gelu", "elu")
    #: (dataset, family) settings of experiments (a) and (b).
    settings_ab: tuple[tuple[str, str], ...] = (
        ("digits", "categorical"),
        ("mnist1d", "categorical"),
        ("digits", "gaussian"),
    )
    sweep_activation: str = "tanh"
    sweep_dataset: str = "digits"
    depths: tuple[int, ...] = (1, 2, 3, 4)
    widths: tuple[int, ...] = (8, 16, 32, 64)
    train_activations: tuple[str, ...] = ("tanh", "softplus")
    train_dataset: str = "digits"
    checkpoints: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100)
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    #: Further initialisation seeds for (b) (same inputs): the spread shown as error bars in figure (b).
    extra_seeds: tuple[int, ...] = (1, 2, 3)
    mnist1d_samples: int | None = None  # None: mnist1d's default recipe (5000 sequences)


FULL = Settings()
QUICK = Settings(
    n_inputs=16,
    width=8,
    activations=("relu", "tanh", "softplus"),
    depths=(1, 2),
    widths=(4, 8),
    checkpoints=(0, 1, 3),
    extra_seeds=(1,),
    mnist1d_samples=500,
)
