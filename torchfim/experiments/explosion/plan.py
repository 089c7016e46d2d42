"""Which runs the study is made of: the tuning runs, then η* and α chosen from them, then the
runs of every configuration and seed; and which of them are done."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from ...compare import seeds
from ...errors import TorchfimError
from .settings import CLEAN_VARIANTS, RunSpec, Settings

__all__ = [
    "tuning_seed",
    "tune_lr_specs",
    "tuning_specs",
    "main_specs",
    "tuned",
    "count_runs",
    "is_done",
]

# Spawn key of the tuning run's seed ("TUNE" in ASCII): apart from the evaluation seeds.
_TUNE_SPAWN_KEY = 0x54554E45


def _fmt(x: float) -> str:
    return f"{x:g}"


def tuning_seed(master_seed: int) -> int:
    """The master seed of the tuning runs, derived from the study's seed apart from :func:`seeds`."""
    ss = np.random.SeedSequence(master_seed, spawn_key=(_TUNE_SPAWN_KEY,))
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def tune_lr_specs(settings: Settings, master_seed: int) -> list[RunSpec]:
    """The learning-rate tuning runs: every grid value on every (data set, model), one tuning seed."""
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


def _tune_noisy_alpha_specs(settings: Settings, master_seed: int, lr_star: dict) -> list[RunSpec]:
    seed = tuning_seed(master_seed)
    return [
        RunSpec(f"tune_noisy_alpha-{d}-{m}-{w}-a{_fmt(a)}", "tune_noisy_alpha", d, m, f"{w} alpha={_fmt(a)}",
                _noisy_lr(settings, lr_star[(d, m)], w), a, settings.noise_fraction, seed, None)
        for d, m, w in settings.noisy_settings()
        if (d, m) in lr_star
        for a in settings.noisy_alpha_grid
    ]  # fmt: skip


def tuning_specs(settings: Settings, master_seed: int, lr_star: dict) -> list[RunSpec]:
    """The tuning runs that need η*: α at η*/10 on clean labels, α on noisy labels."""
    return _tune_alpha_specs(settings, master_seed, lr_star) + _tune_noisy_alpha_specs(settings, master_seed, lr_star)


def main_specs(settings: Settings, master_seed: int, lr_star: dict, alpha: dict, noisy_alpha: dict) -> list[RunSpec]:
    """The evaluation runs: every configuration on every seed, with the tuned η* and α."""
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
    lr_specs = tune_lr_specs(settings, master_seed)
    for d, m in settings.all_combos():
        mine = [sp for sp in lr_specs if (sp.dataset, sp.model) == (d, m)]
        if not all(is_done(done, sp) for sp in mine):
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
        if amine and all(is_done(done, sp) for sp in amine):
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
            if nmine and all(is_done(done, sp) for sp in nmine):
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


def is_done(done: dict[str, dict], spec: RunSpec) -> bool:
    """A run file for ``spec`` exists and was made for this very spec (learning rate, α, seed, ...)."""
    record = done.get(spec.run_id)
    return record is not None and record["spec"] == json.loads(json.dumps(asdict(spec)))

