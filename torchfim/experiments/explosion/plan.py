"""Which runs the study is made of: the tuning runs (every grid value on every tuning seed), then η*
and α chosen from them by the mean best validation accuracy over training, then the runs of every
configuration and evaluation seed; and which of them are done."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict

import numpy as np

from ...compare import seeds
from ...errors import TorchfimError
from .settings import CLEAN_VARIANTS, RunSpec, Settings
from .train import compact

__all__ = [
    "tuning_seeds",
    "tune_lr_specs",
    "tuning_specs",
    "main_specs",
    "tuned",
    "count_runs",
    "is_done",
    "is_complete",
]

# Spawn key of the tuning runs' seeds ("TUNE" in ASCII): apart from the evaluation seeds.
_TUNE_SPAWN_KEY = 0x54554E45


def _fmt(x: float) -> str:
    return f"{x:g}"


def tuning_seeds(master_seed: int, n: int) -> list[int]:
    """The ``n`` master seeds of the tuning runs, derived from the study's seed apart from :func:`seeds`."""
    ss = np.random.SeedSequence(master_seed, spawn_key=(_TUNE_SPAWN_KEY,))
    return [int(x) for x in ss.generate_state(n, dtype=np.uint32)]


def _tuning_runs(settings: Settings, master_seed: int, run_id: str, phase: str, d: str, m: str, variant: str,
                 lr: float, alpha: float, noise: float) -> list[RunSpec]:
    """One configuration's tuning runs, one per tuning seed (run ids end in ``-t<k>``)."""
    return [RunSpec(f"{run_id}-t{k}", phase, d, m, variant, lr, alpha, noise, seed, None, k)
            for k, seed in enumerate(tuning_seeds(master_seed, settings.n_tuning_seeds))]


def tune_lr_specs(settings: Settings, master_seed: int) -> list[RunSpec]:
    """The learning-rate tuning runs: every grid value on every (data set, model) and tuning seed."""
    return [
        sp
        for d, m in settings.all_combos()
        for lr in settings.lr_grid
        for sp in _tuning_runs(settings, master_seed, f"tune_lr-{d}-{m}-lr{_fmt(lr)}", "tune_lr", d, m,
                               f"lr={_fmt(lr)}", lr, 0.0, 0.0)
    ]


def _tune_alpha_specs(settings: Settings, master_seed: int, lr_star: dict) -> list[RunSpec]:
    out = []
    for d, m in settings.combos:
        if (d, m) not in lr_star:
            continue
        small = lr_star[(d, m)] / settings.lr_ratio
        for a in settings.alpha_grid:
            out += _tuning_runs(settings, master_seed, f"tune_alpha-{d}-{m}-a{_fmt(a)}", "tune_alpha", d, m,
                                f"alpha={_fmt(a)}", small, a, 0.0)
    return out


def _noisy_lr(settings: Settings, lr_star: float, which: str) -> float:
    if which not in ("small", "large"):
        raise TorchfimError(f"noisy_lrs holds {which!r}; use 'small' (η*/10) or 'large' (η*)")
    return lr_star / settings.lr_ratio if which == "small" else lr_star


def _tune_noisy_alpha_specs(settings: Settings, master_seed: int, lr_star: dict) -> list[RunSpec]:
    return [
        sp
        for d, m, w in settings.noisy_settings()
        if (d, m) in lr_star
        for a in settings.noisy_alpha_grid
        for sp in _tuning_runs(settings, master_seed, f"tune_noisy_alpha-{d}-{m}-{w}-a{_fmt(a)}", "tune_noisy_alpha",
                               d, m, f"{w} alpha={_fmt(a)}", _noisy_lr(settings, lr_star[(d, m)], w), a,
                               settings.noise_fraction)
    ]


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


def _grid_runs(specs: list[RunSpec], done: dict[str, dict], n_values: int) -> list[list[dict]] | None:
    """The finished results of tuning specs listed value by value, as one list per grid value (None
    until every one of them is done)."""
    if not specs or not all(is_done(done, sp) for sp in specs):
        return None
    results = [done[sp.run_id]["result"] for sp in specs]
    per = len(results) // n_values
    return [results[i * per : (i + 1) * per] for i in range(n_values)]


def _mean_final(runs: list[dict], key: str) -> float | None:
    vals = [r["final"][key] for r in runs]
    return None if any(v is None for v in vals) else compact(float(np.mean(vals)))


def _choose(grid: Sequence[float], groups: list[list[dict]]) -> tuple[float, dict[str, list]]:
    """The grid value whose runs have the best mean (over tuning seeds) of the best validation accuracy
    over training; a value with a diverged run is excluded; ties go to the first (smaller) value."""
    scores = [None if any(r["diverged"] for r in g) else _mean_final(g, "best_val_acc") for g in groups]
    valid = [i for i, x in enumerate(scores) if x is not None]
    if not valid:
        raise TorchfimError("every tuning run diverged; lower the learning-rate grid")
    best = max(valid, key=lambda i: (scores[i], -i))
    table = {
        "best_val_acc": scores,
        "best_val_acc_per_seed": [[None if r["diverged"] else r["final"]["best_val_acc"] for r in g] for g in groups],
        "final_train_acc": [_mean_final(g, "train_acc") for g in groups],
    }
    return grid[best], table


def _prefixed(prefix: str, table: dict[str, list]) -> dict[str, list]:
    return {f"{prefix}_{k}": v for k, v in table.items()}


def tuned(settings: Settings, master_seed: int, done: dict[str, dict]) -> tuple[dict, dict, dict, dict]:
    """(η*, α, noisy-label α, the tuning table), per combo, from finished tuning runs (missing: absent)."""
    lr_star: dict = {}
    alpha: dict = {}
    noisy_alpha: dict = {}
    table: dict = {}
    lr_specs = tune_lr_specs(settings, master_seed)
    for d, m in settings.all_combos():
        groups = _grid_runs([sp for sp in lr_specs if (sp.dataset, sp.model) == (d, m)], done, len(settings.lr_grid))
        if groups is None:
            continue
        lr_star[(d, m)], scores = _choose(settings.lr_grid, groups)
        entry = {"tuning_seeds": tuning_seeds(master_seed, settings.n_tuning_seeds), "lr_grid": list(settings.lr_grid),
                 **_prefixed("lr", scores), "lr_star": lr_star[(d, m)],
                 "lr_small": lr_star[(d, m)] / settings.lr_ratio}  # fmt: skip
        amine = [sp for sp in _tune_alpha_specs(settings, master_seed, lr_star) if (sp.dataset, sp.model) == (d, m)]
        groups = _grid_runs(amine, done, len(settings.alpha_grid))
        if groups is not None:
            alpha[(d, m)], scores = _choose(settings.alpha_grid, groups)
            entry.update(alpha_grid=list(settings.alpha_grid), **_prefixed("alpha", scores), alpha=alpha[(d, m)])
        for w in settings.noisy_lrs if (d, m) in settings.noisy_combos else ():
            nmine = [
                sp for sp in _tune_noisy_alpha_specs(settings, master_seed, lr_star)
                if (sp.dataset, sp.model) == (d, m) and sp.variant.startswith(f"{w} ")
            ]  # fmt: skip
            groups = _grid_runs(nmine, done, len(settings.noisy_alpha_grid))
            if groups is not None:
                noisy_alpha[(d, m, w)], scores = _choose(settings.noisy_alpha_grid, groups)
                entry.setdefault("noisy", {})[w] = {
                    "lr": nmine[0].lr, "alpha_grid": list(settings.noisy_alpha_grid), **_prefixed("alpha", scores),
                    "alpha_final_noisy_acc": [_mean_final(g, "noisy_acc") for g in groups],
                    "alpha": noisy_alpha[(d, m, w)],
                }  # fmt: skip
        table[f"{d}/{m}"] = entry
    return lr_star, alpha, noisy_alpha, table


def count_runs(settings: Settings) -> int:
    """Number of runs in the study: tuning runs plus ``n_seeds`` runs of every configuration."""
    n_combo = len(settings.all_combos())
    tuning = n_combo * len(settings.lr_grid) + len(settings.combos) * len(settings.alpha_grid)
    tuning += len(settings.noisy_settings()) * len(settings.noisy_alpha_grid)
    return tuning * settings.n_tuning_seeds + settings.n_seeds * (
        len(CLEAN_VARIANTS) * len(settings.combos) + len(settings.noisy_variants()) * len(settings.noisy_settings())
    )


def is_done(done: dict[str, dict], spec: RunSpec) -> bool:
    """A run file for ``spec`` exists and was made for this very spec (learning rate, α, seed, ...)."""
    record = done.get(spec.run_id)
    return record is not None and record["spec"] == json.loads(json.dumps(asdict(spec)))



def is_complete(settings: Settings, master_seed: int, done: dict[str, dict]) -> bool:
    """Whether ``done`` holds every run of the study, each made for its spec: the tuning runs, then those of the η*
    and α chosen from them, as :func:`~torchfim.experiments.explosion.study.run` goes through them."""
    if not all(is_done(done, sp) for sp in tune_lr_specs(settings, master_seed)):
        return False
    lr_star = tuned(settings, master_seed, done)[0]
    if not all(is_done(done, sp) for sp in tuning_specs(settings, master_seed, lr_star)):
        return False
    lr_star, alpha, noisy_alpha, _ = tuned(settings, master_seed, done)
    return all(is_done(done, sp) for sp in main_specs(settings, master_seed, lr_star, alpha, noisy_alpha))
