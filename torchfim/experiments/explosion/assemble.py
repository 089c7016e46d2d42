"""``results.json`` from the finished runs: per configuration the mean ± std of each measure over
seeds and the mean curves, the ``prob_outperform`` comparisons of each claim (paired by seed, per
data set and model and pooled), and the verdicts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from ..._words import counted
from ...compare import prob_outperform, seeds
from ...errors import TorchfimError
from .gap import gap_closed
from .plan import is_done, main_specs, tune_lr_specs, tuned, tuning_seeds, tuning_specs
from .settings import (
    CLEAN_VARIANTS,
    POOLED,
    RESULTS_VERSION,
    RunSpec,
    Settings,
    noisy_label,
    noisy_pooled,
)
from .train import compact

__all__ = ["assemble", "CLEAN_CLAIMS", "NOISY_CLAIMS"]

CLEAN_CLAIMS = ("a_explosion", "a_explosion_early", "a_fp_lowers_peak", "b_large_beats_small", "b_fp_beats_small",
                "b_large_beats_small_final", "b_fp_beats_small_final")
NOISY_CLAIMS = (
    "c_fp_slows_noisy", "c_noisy_slowed_more", "c_fp_test",
    "c_fp_fixed_slows_noisy", "c_fixed_noisy_slowed_more", "c_fp_fixed_test",
)  # fmt: skip
#: The measures summarised over seeds, per clean-label and per noisy-label configuration.
_CLEAN_MEASURES = ("test_acc_at_best_val", "test_acc", "step_of_best_val", "train_acc", "train_acc_at_four_fifths",
                   "val_acc", "peak_trace", "step_of_peak_trace", "stderr_at_peak", "trace_at_threshold",
                   "step_at_threshold", "final_trace", "epochs")
#: Per evaluation seed, what early stopping picked: the step of the best validation accuracy and the
#: test accuracy there, with the final test accuracy beside it.
_PER_SEED = ("step_of_best_val", "best_val_acc", "test_acc_at_best_val", "test_acc")
_NOISY_MEASURES = ("clean_acc", "noisy_acc", "clean_acc_auc", "noisy_acc_auc", "test_acc", "test_acc_at_best_val",
                   "peak_trace", "train_acc", "train_acc_at_four_fifths", "epochs")


def _stats(values: Sequence[float]) -> dict[str, Any]:
    arr = np.asarray(values, dtype=np.float64)
    return {
        "mean": compact(arr.mean()),
        "std": compact(arr.std(ddof=1)) if arr.size > 1 else None,
        "values": [compact(v) for v in arr],
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
        "p": compact(r.p),
        "ci_low": compact(r.ci_low),
        "ci_high": compact(r.ci_high),
        "sign_test_p": compact(r.sign_test_p),
        "n": r.n,
        "conclusion": r.conclusion,
        "significant": r.significant,
        "meaningful": r.meaningful,
        "line": f"P({a_label} > {b_label}) [{metric}]: {r}",
    }


def _ratio_of_means(top: list, bottom: list) -> float | None:
    """The ratio of the means over the runs that have the figure (a run that diverged within its first epoch has no
    peak after it: None, which stopped the assembly with a TypeError); None where either side has none."""
    a, b = [v for v in top if v is not None], [v for v in bottom if v is not None]
    return compact(np.mean(a) / np.mean(b)) if a and b else None


def _mean_curve(runs: list[dict], key: str) -> dict[str, list]:
    # The steps of the longest run. A run that stopped earlier on a plateau holds its last value after it (its network
    # no longer changes); a diverged one has none there (the first run's steps would cut the others to its length).
    steps = max((r["result"]["curves"]["step"] for r in runs), key=len)
    cols = []
    for r in runs:
        c = r["result"]["curves"]
        if c["step"] != steps:
            vals, last = dict(zip(c["step"], c[key])), c["step"][-1]
            held = None if r["result"]["diverged"] else c[key][-1]
            cols.append([vals.get(s, held if s > last else None) for s in steps])
        else:
            cols.append(c[key])
    mean, std, lo, hi = [], [], [], []
    for i in range(len(steps)):
        vals = [col[i] for col in cols if col[i] is not None]
        mean.append(compact(np.mean(vals)) if vals else None)
        std.append(compact(np.std(vals, ddof=1)) if len(vals) > 1 else None)
        lo.append(compact(min(vals)) if vals else None)
        hi.append(compact(max(vals)) if vals else None)
    return {"step": steps, "mean": mean, "std": std, "min": lo, "max": hi}


def assemble(settings: Settings, master_seed: int, done: dict[str, dict]) -> dict[str, Any]:
    """``results.json``'s content, from the finished run records (independent of their order)."""
    lr_star, alpha, noisy_alpha, tuning = tuned(settings, master_seed, done)
    study_seeds = seeds(settings.n_seeds, master_seed)
    missing_combos = [c for c in settings.all_combos() if c not in lr_star or (c in settings.combos and c not in alpha)]
    missing_combos += [c for c in settings.noisy_settings() if c not in noisy_alpha]
    if missing_combos:
        raise TorchfimError(f"tuning runs are missing for {missing_combos[0]}; rerun with --resume")
    specs = main_specs(settings, master_seed, lr_star, alpha, noisy_alpha)
    all_specs = tune_lr_specs(settings, master_seed) + tuning_specs(settings, master_seed, lr_star) + specs
    missing = [s.run_id for s in all_specs if not is_done(done, s)]
    if missing:
        raise TorchfimError(f"{counted(len(missing), 'run')} {'is' if len(missing) == 1 else 'are'} missing (e.g. "
                            f"{missing[0]}); rerun with --resume")

    agg = _Aggregates(settings, done, specs)
    for d, m in settings.combos:
        agg.clean(d, m)
    for d, m, w in settings.noisy_settings():
        agg.noisy(d, m, w)
    for (name, label), (a, b, claim, al, bl, met) in agg.pooled.items():
        if len(a) > len(study_seeds):  # more than one data set and model
            agg.comparisons.append(_compare(name, claim, label, al, bl, met, a, b))
    if len(settings.combos) > 1:
        agg.aggregates[POOLED] = {key: gap_closed(groups) for key, groups in agg.gap_groups.items()}

    return {
        "experiment": "explosion",
        "version": RESULTS_VERSION,
        "paper": "Jastrzębski et al., Catastrophic Fisher Explosion: Early Phase Fisher Matrix Impacts Generalization, ICML 2021",
        "settings": asdict(settings),
        "master_seed": master_seed,
        "seeds": study_seeds,
        "tuning_seeds": tuning_seeds(master_seed, settings.n_tuning_seeds),
        "tuning": tuning,
        "aggregates": agg.aggregates,
        "comparisons": agg.comparisons,
        "verdicts": _verdicts(settings, agg.aggregates, agg.comparisons),
        "curves": agg.curves,
        "runs": {s.run_id: {"spec": done[s.run_id]["spec"], "result": done[s.run_id]["result"]} for s in all_specs},
    }


class _Aggregates:
    """The aggregates, mean curves and comparisons of results.json, filled one configuration at a time."""

    def __init__(self, settings: Settings, done: dict[str, dict], specs: list[RunSpec]) -> None:
        self.settings, self.done, self.specs = settings, done, specs
        self.extra = {s.run_id: _extra(done[s.run_id]["result"], settings, s.dataset) for s in specs}
        self.aggregates: dict[str, Any] = {}
        self.curves: dict[str, Any] = {}
        self.comparisons: list[dict] = []
        # gap measure -> one (large, small, fp) triple of per-seed metrics per data set and model
        self.gap_groups: dict[str, list[tuple]] = {"gap_closed": [], "gap_closed_final": []}
        # (comparison, pooled label) -> (a, b, claim, a label, b label, metric)
        self.pooled: dict[tuple[str, str], tuple] = {}

    def group(self, phase: str, d: str, m: str, variant: str) -> list[dict]:
        """The records of one configuration, in seed order."""
        return [self.done[s.run_id] for s in self.specs
                if (s.phase, s.dataset, s.model, s.variant) == (phase, d, m, variant)]

    def metric(self, runs: list[dict], key: str) -> list[float]:
        """One number per run: derived from its curves (:func:`_extra`), or else from its final values."""
        return [self.extra[r["run_id"]][key] if key in self.extra[r["run_id"]] else r["result"]["final"].get(key)
                for r in runs]  # None where a run file of older code lacks the measure

    def summarise(self, runs: list[dict], keys: Sequence[str], entry: dict) -> dict:
        """Add the mean ± std over seeds of each measure in ``keys`` to ``entry`` (None if a run lacks it)."""
        for key in keys:
            vals = self.metric(runs, key)
            entry[key] = _stats(vals) if all(x is not None for x in vals) else None
        return entry

    def compare(self, rows: list[tuple], combo: str, pooled_label: str, skip_missing: bool) -> None:
        """A comparison per row ``(name, claim, a label, b label, metric, a, b)``, pooled by name."""
        for name, claim, al, bl, met, a, b in rows:
            if skip_missing and not all(x is not None for x in list(a) + list(b)):
                continue
            self.comparisons.append(_compare(name, claim, combo, al, bl, met, a, b))
            pa, pb = self.pooled.setdefault((name, pooled_label), ([], [], claim, al, bl, met))[:2]
            pa.extend(a)
            pb.extend(b)

    def per_seed(self, runs: list[dict]) -> list[dict]:
        """Per evaluation seed: its index, the best-validation step, the accuracies there and at the end."""
        return [{"seed_index": r["spec"]["seed_index"], **{k: r["result"]["final"][k] for k in _PER_SEED}} for r in runs]

    def plateaued(self, entry: dict) -> bool | None:
        """Whether a configuration's mean training accuracy (against the labels it trained on, noisy ones included)
        moved by at most ``plateau_tolerance`` over the last fifth of training (None where a run lacks either)."""
        before, end = entry["train_acc_at_four_fifths"], entry["train_acc"]
        if before is None or end is None:
            return None
        return self.settings.plateaued(before["mean"], end["mean"])

    def clean(self, d: str, m: str) -> None:
        """Claims (a) and (b) on one data set and model."""
        combo = f"{d}/{m}"
        g = {v: self.group("clean", d, m, v) for v in CLEAN_VARIANTS}
        agg: dict[str, Any] = {}
        for v, runs in g.items():
            agg[v] = self.summarise(runs, _CLEAN_MEASURES, {
                "lr": runs[0]["spec"]["lr"],
                "alpha": runs[0]["spec"]["alpha"],
                "diverged": sum(r["result"]["diverged"] for r in runs),
                "per_seed": self.per_seed(runs),
            })  # fmt: skip
            agg[v]["plateaued"] = self.plateaued(agg[v])
        for key, metric in (("gap_closed", "test_acc_at_best_val"), ("gap_closed_final", "test_acc")):
            triple = tuple(self.metric(g[v], metric) for v in CLEAN_VARIANTS)
            self.gap_groups[key].append(triple)
            agg[key] = gap_closed([triple])
        self.aggregates[combo] = agg
        self.curves[combo] = {v: {k: _mean_curve(g[v], k) for k in ("trace", "train_acc", "test_acc")}
                              for v in CLEAN_VARIANTS}
        peaks = {v: self.metric(g[v], "peak_trace") for v in CLEAN_VARIANTS}
        early = {v: self.metric(g[v], "trace_at_threshold") for v in CLEAN_VARIANTS}
        agg["peak_ratio_small_over_large"] = _ratio_of_means(peaks["small"], peaks["large"])
        best = {v: self.metric(g[v], "test_acc_at_best_val") for v in CLEAN_VARIANTS}
        final = {v: self.metric(g[v], "test_acc") for v in CLEAN_VARIANTS}
        at_best, at_end = "test accuracy at the best validation step", "final test accuracy"
        self.compare([
            ("a_explosion", "a", "small LR", "large LR", "peak Tr(F)", peaks["small"], peaks["large"]),
            ("a_explosion_early", "a", "small LR", "large LR",
             f"Tr(F_i): Tr(F) when the training loss first falls to {self.settings.loss_threshold:g} or below",
             early["small"], early["large"]),
            ("a_fp_lowers_peak", "a", "small LR", "small LR + FP", "peak Tr(F)", peaks["small"], peaks["small_fp"]),
            ("b_large_beats_small", "b", "large LR", "small LR", at_best, best["large"], best["small"]),
            ("b_fp_beats_small", "b", "small LR + FP", "small LR", at_best, best["small_fp"], best["small"]),
            ("b_large_vs_fp", "b", "large LR", "small LR + FP", at_best, best["large"], best["small_fp"]),
            ("b_large_beats_small_final", "b", "large LR", "small LR", at_end, final["large"], final["small"]),
            ("b_fp_beats_small_final", "b", "small LR + FP", "small LR", at_end, final["small_fp"], final["small"]),
        ], combo, POOLED, skip_missing=True)  # fmt: skip

    def noisy(self, d: str, m: str, w: str) -> None:
        """Claim (c) on one data set and model at one learning rate."""
        label = noisy_label(d, m, w, self.settings)
        variants = self.settings.noisy_variants()
        g = {v: self.group("noisy", d, m, f"{w}_{v}") for v in variants}
        agg = self.aggregates.setdefault(label, {})
        for v, runs in g.items():
            agg[v] = self.summarise(runs, _NOISY_MEASURES, {
                "lr": runs[0]["spec"]["lr"],
                "alpha": runs[0]["spec"]["alpha"],
                "noise_fraction": self.settings.noise_fraction,
                "n_noisy": [r["result"]["n_noisy"] for r in runs],
                "diverged": sum(r["result"]["diverged"] for r in runs),
                "per_seed": self.per_seed(runs),
            })  # fmt: skip
            agg[v]["plateaued"] = self.plateaued(agg[v])
        self.curves[label] = {
            v: {k: _mean_curve(g[v], k) for k in ("clean_acc", "noisy_acc", "trace", "test_acc")} for v in variants
        }
        rows = []
        for fp in variants[1:]:
            rows += self._penalty_rows(g, fp, agg)
        self.compare(rows, label, noisy_pooled(w, self.settings), skip_missing=False)

    def _penalty_rows(self, g: dict[str, list[dict]], fp: str, agg: dict) -> list[tuple]:
        """The comparisons of one penalised configuration ``fp`` against the un-penalised one."""

        def ratio(key: str) -> list[float]:
            return [
                (f["result"]["final"][key] / b["result"]["final"][key]) if b["result"]["final"][key] else 1.0
                for f, b in zip(g[fp], g["base"])
            ]

        sfx = "" if fp == "fp" else "_fixed"
        pen = f"FP, α={g[fp][0]['spec']['alpha']:g}" if fp == "fp_fixed" else "FP, tuned α"
        rel_noisy, rel_clean = ratio("noisy_acc_auc"), ratio("clean_acc_auc")
        agg[f"{fp}_over_base_noisy_auc"] = _stats(rel_noisy)
        agg[f"{fp}_over_base_clean_auc"] = _stats(rel_clean)
        metric = self.metric
        return [
            (f"c_fp{sfx}_slows_noisy", "c", "no penalty", pen, "noisy-subset train accuracy, mean over training",
             metric(g["base"], "noisy_acc_auc"), metric(g[fp], "noisy_acc_auc")),
            (f"c{sfx}_noisy_slowed_more", "c", f"clean ({pen})/(no penalty)", f"noisy ({pen})/(no penalty)",
             "(penalty / no penalty) train accuracy, mean over training", rel_clean, rel_noisy),
            (f"c_fp{sfx}_final_noisy", "c", "no penalty", pen, "final noisy-subset train accuracy",
             metric(g["base"], "noisy_acc"), metric(g[fp], "noisy_acc")),
            (f"c_fp{sfx}_test", "c", pen, "no penalty", "test accuracy at best validation step",
             metric(g[fp], "test_acc_at_best_val"), metric(g["base"], "test_acc_at_best_val")),
        ]  # fmt: skip


def _extra(result: dict, settings: Settings, dataset: str) -> dict[str, float | None]:
    """Numbers derived from a run's curves: the peak Tr(F) as the paper's Table 4 takes it, the largest measurement
    after the first epoch (its ``steps_per_epoch``: the large rates' Tr(F) can peak within it, before the small
    rates' explosion has begun), with its step and standard error (None where the run has no measurement there); and
    the paper's early-phase Tr(Fᵢ), Tr(F) at the first measurement where the training loss is at or below
    ``loss_threshold`` (None if it never gets there), with the step it happens at."""
    c = result["curves"]
    # A run trained before whole mini-batches only kept the epoch's last, smaller one: ⌈n_train/batch⌉ steps.
    epoch = result.get("steps_per_epoch", -(-result["n_train"] // settings.batch_size))
    after = [(t, e, s) for t, e, s in zip(c["trace"], c["trace_stderr"], c["step"]) if t is not None and s >= epoch]
    peak, err, step = max(after, key=lambda p: p[0]) if after else (None, None, None)
    at = next(
        (i for i, (t, loss) in enumerate(zip(c["trace"], c["train_loss"]))
         if t is not None and loss is not None and loss <= settings.loss_threshold),
        None,
    )  # fmt: skip
    return {
        "peak_trace": peak,
        "step_of_peak_trace": step,
        "stderr_at_peak": err,
        "trace_at_threshold": None if at is None else c["trace"][at],
        "step_at_threshold": None if at is None else c["step"][at],
    }


def _find(comparisons: list[dict], name: str, combo: str) -> dict | None:
    return next((c for c in comparisons if c["name"] == name and c["combo"] == combo), None)


def _verdicts(settings: Settings, aggregates: dict, comparisons: list[dict]) -> dict[str, Any]:
    """Per claim and configuration: 'held', 'not significant' or 'opposite', from prob_outperform's conclusion,
    with the pairs in the claim's direction (ties one half) out of all, e.g. ``"held (20/20)"``.

    ``{"clean": {data/model or pooled: {claim: verdict, "b_gap_closed": x}}, "noisy": {label: {claim: verdict}}}``.
    """

    def v(name: str, combo: str) -> str | None:
        c = _find(comparisons, name, combo)
        if c is None:
            return None
        verdict = {"A better": "held", "B better": "opposite"}.get(c["conclusion"], "not significant")
        # the seeds in the claim's direction, ties one half (p is stored to 6 digits: back to a multiple of 1/2)
        return f"{verdict} ({round(2 * c['p'] * c['n']) / 2:g}/{c['n']})"

    clean: dict[str, Any] = {}
    combos = [f"{d}/{m}" for d, m in settings.combos]
    for combo in combos + ([POOLED] if len(combos) > 1 else []):
        clean[combo] = {k: v(k, combo) for k in CLEAN_CLAIMS}
        gap = aggregates.get(combo, {}).get("gap_closed")
        clean[combo]["b_gap_closed"] = None if not gap or gap["gap_ci_low"] <= 0 else gap["value"]
    noisy: dict[str, Any] = {}
    for w in settings.noisy_lrs:
        labels = [noisy_label(d, m, w, settings) for d, m in settings.noisy_combos]
        for label in labels + ([noisy_pooled(w, settings)] if len(labels) > 1 else []):
            noisy[label] = {k: v(k, label) for k in NOISY_CLAIMS if _find(comparisons, k, label) is not None}
    return {"clean": clean, "noisy": noisy}

