"""The benchmark's settings: sizes, threads, repetitions, tolerance, waiting for a quiet machine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["Config", "QUICK", "ENTRY", "ROOT"]

#: The benchmark's entry point (each sweep point runs it in a fresh process) and the repository root.
ENTRY = Path(__file__).resolve().parents[1] / "run.py"
ROOT = ENTRY.parents[1]


@dataclass(frozen=True)
class Config:
    """Everything a run is made with (stored in the details file)."""
    n_inputs: int | None = None  # None: all 1797 digits
    batch_size: int = 256
    threads: int = 2
    reps: int = 5
    tol: float = 1e-4
    seed: int = 0
    mlp_a: tuple[int, ...] = (64, 256, 256, 10)
    mlp_s: tuple[int, ...] = (64, 32, 32, 10)
    cnn_channels: tuple[int, int] = (16, 32)
    hessian_budget_s: float = 60.0
    penalty_steps: int = 10
    lr: float = 0.01
    alpha: float = 0.1
    quick: bool = False
    # waiting for a quiet machine before each timed call (see contention_probe)
    quiet_threshold: float = 2.0
    quiet_wait_s: float = 60.0
    quiet_budget_s: float = 1800.0
    retries: int = 3
    max_inner: int = 10  # timed calls per round for a contender whose warm-up took under 0.3 s


QUICK = Config(
    n_inputs=64, batch_size=24, reps=2, mlp_a=(64, 24, 24, 10), mlp_s=(64, 8, 8, 10),
    cnn_channels=(4, 8), hessian_budget_s=20.0, quick=True, threads=1, quiet_wait_s=0.0, max_inner=1,
)
