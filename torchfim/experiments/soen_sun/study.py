"""Running the study: the four experiments in turn, with results.json, results.csv and summary.md
rewritten after every measurement and each figure drawn as soon as its experiment is done."""

from __future__ import annotations

import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

import torchfim

from ... import toy
from ..._io import write_text
from . import figures
from .data import build_mlp, load_dataset, measurement_indices
from .measure import (
    activation_records,
    config_record,
    linear_layers,
    loss_acc,
    measure,
    rel_se,
    seed_ranges,
    to_float,
)
from .settings import DEFAULT_OUT, FILES, FULL, QUICK, REL_ERROR, ZERO_VARIANCE_RTOL, Settings
from .summary import summary
from .tables import write_tables, write_timings

__all__ = ["run"]


def run(
    out: str | Path = DEFAULT_OUT,
    quick: bool = False,
    *,
    settings: Settings | None = None,
    progress: bool = True,
    threads: int | None = 1,
    command: str | None = None,
) -> dict[str, Any]:
    """Run the four experiments, writing figures, ``results.json``, ``results.csv`` and ``summary.md`` to ``out``.

    ``quick`` uses :data:`QUICK` (tiny networks and fewer settings; under a minute, for tests),
    otherwise :data:`FULL` unless ``settings`` is given. ``threads`` sets torch's intra-op threads
    for the run and restores them after (``None`` leaves them): the tensors are small, and on a busy
    machine two threads were several times slower than one. Returns the results dictionary.
    """
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be at least 1 (or None), got {threads}")
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _Study(Path(out), quick, settings or (QUICK if quick else FULL), command).run(progress)
    finally:
        torch.set_num_threads(previous)


#: The keys in FILES of the study's figures.
FIGURES = ("fig_a", "fig_b", "fig_c", "fig_d")
#: The figures each part draws once it is finished, in order (seeds redraws fig_b with their ranges as error bars),
#: and the function of :mod:`.figures` that draws each.
PART_FIGURES = {"bound_ratios+activations": ("fig_a", "fig_b"), "seeds": ("fig_b",), "depth_width": ("fig_c",),
                "training": ("fig_d",)}
_PLOTS = {"fig_a": "plot_bound_ratios", "fig_b": "plot_activations", "fig_c": "plot_depth_width",
          "fig_d": "plot_training"}


def _units(s: Settings) -> int:
    return (
        len(s.settings_ab) * len(s.activations) * (1 + len(s.extra_seeds))
        + len(s.depths)
        + len(s.widths)
        + len(s.train_activations) * len(s.checkpoints)
    )


def _meta(out: Path, quick: bool, command: str | None) -> dict[str, Any]:
    return {
        "experiment": "soen-sun",
        "paper": "Soen & Sun, On the Variance of the Fisher Information for Deep Learning, NeurIPS 2021",
        "command": command or f"torchfim reproduce soen-sun --out {out}{' --quick' if quick else ''}",
        "quick": bool(quick),
        "torchfim": torchfim.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "dtype": "float64",
        "n_samples": 1,
        "zero_variance_rtol": ZERO_VARIANCE_RTOL,
        "zero_variance": "an entry's variance counts as zero (no bound ratio) when at most zero_variance_rtol * I_pp**2",
        "init": "PyTorch default nn.Linear init in float32 under torch.manual_seed(seed), then .double()",
        "inputs": "rows measurement_indices = torch.randperm(N, generator=manual_seed(seed))[:n_inputs]",
    }


class _Study:
    """The results of one run as they grow, and the experiments that fill them."""

    def __init__(self, out: Path, quick: bool, s: Settings, command: str | None) -> None:
        self.out, self.s = out, s
        self.results: dict[str, Any] = {
            "meta": _meta(out, quick, command),
            "settings": asdict(s),
            "datasets": {},
            "bound_ratios": [],
            "activations": [],
            "depth_width": [],
            "seeds": [],
            "seed_ranges": [],
            "training": [],
        }
        self.done: set[str] = set()
        self.drawn: set[str] = set()
        self.data: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.bar: Any = None

    def save(self) -> None:
        """Rewrite results.json, results.csv and summary.md with what is finished so far, and remove the figures
        an earlier run drew of the parts this one has not finished (check_study_out made sure they are the
        study's)."""
        for key in FIGURES:
            if key not in self.drawn:
                (self.out / FILES[key]).unlink(missing_ok=True)
        write_tables(self.out, self.results)
        write_text(self.out / FILES["summary"], summary(self.results, self.s, self.done, self.drawn))

    def tick(self) -> None:
        """After each measurement: save, and advance the progress bar."""
        self.save()
        self.bar.update()

    def run(self, progress: bool) -> dict[str, Any]:
        """The four experiments in turn; returns the results (also in results.json)."""
        from ..._progress import ProgressBar

        self.out.mkdir(parents=True, exist_ok=True)
        t_start, seconds = time.perf_counter(), {}
        (self.out / FILES["timings"]).unlink(missing_ok=True)  # an earlier run's, until this one has its own
        self.load_data()
        self.bar = ProgressBar(total=_units(self.s), desc="soen-sun", unit="config", disable=not progress, file=sys.stderr)
        try:
            for part, experiment in (("bound_ratios+activations", self.bounds_and_activations),
                                     ("seeds", self.more_seeds), ("depth_width", self.depth_width),
                                     ("training", self.training)):
                t0 = time.perf_counter()
                experiment()
                seconds[part] = time.perf_counter() - t0
                self.draw(part)  # before the summary that lists its figures
                if part != "training":  # the last part's tables are written once the run is marked complete
                    self.save()
        finally:
            self.bar.close()
        self.results["meta"]["complete"] = True
        self.save()
        write_timings(self.out / FILES["timings"], seconds, time.perf_counter() - t_start)
        return self.results

    def draw(self, part: str) -> None:
        """The figures of a finished part, each after a save: should the run stop while one is drawn, summary.md
        names the part finished (its key numbers) and exactly the figures written (before, a stop while drawing
        fig_a, fig_c or fig_d left the part "not yet run" and its figure "unfinished"). A figure redrawn is not the
        part's until then (seeds' fig_b without their ranges), so it is removed, and named not drawn, meanwhile."""
        keys = PART_FIGURES[part]
        self.drawn.difference_update(keys)
        for key in keys:
            self.save()
            getattr(figures, _PLOTS[key])(self.results, self.s, self.out / FILES[key])  # looked up now: tests patch it
            self.drawn.add(key)

    def load_data(self) -> None:
        """Each data set the settings use, with its measured rows."""
        s = self.s
        for name in dict.fromkeys([d for d, _ in s.settings_ab] + [s.sweep_dataset, s.train_dataset]):
            X, y = load_dataset(name, s)
            idx = measurement_indices(X.shape[0], s.n_inputs, s.seed)
            self.data[name] = (X, y, idx)
            self.results["datasets"][name] = {"rows": int(X.shape[0]), "features": int(X.shape[1]),
                                              "indices": idx.tolist()}

    def activation_record(
        self, dataset: str, family: str, act: str, seed: int, bounds: bool
    ) -> tuple[dict, dict | None]:
        """The (b) record and, with ``bounds``, the (a) record of one configuration at init."""
        s = self.s
        X, _, idx = self.data[dataset]
        model = build_mlp(X.shape[1], s.width, s.depth, act, seed=seed)
        base = {**config_record(dataset, family, act, s.depth, s.width, s.n_inputs, model), "seed": seed}
        return activation_records(base, linear_layers(model), measure(model, X[idx], family, bounds=bounds))

    def bounds_and_activations(self) -> None:
        """(a) and (b): every activation on every (data set, family), with the bounds."""
        for dataset, family in self.s.settings_ab:
            for act in self.s.activations:
                self.bar.set_postfix_str(f"(a,b) {dataset}/{family}/{act}")
                rec_b, rec_a = self.activation_record(dataset, family, act, self.s.seed, bounds=True)
                self.results["activations"].append(rec_b)
                self.results["bound_ratios"].append(rec_a)
                self.tick()
        self.done.update({"bound_ratios", "activations"})

    def more_seeds(self) -> None:
        """(b) again without the bounds for the further initialisation seeds, and their ranges."""
        for seed in self.s.extra_seeds:
            for dataset, family in self.s.settings_ab:
                for act in self.s.activations:
                    self.bar.set_postfix_str(f"(b) seed {seed} {dataset}/{family}/{act}")
                    rec, _ = self.activation_record(dataset, family, act, seed, bounds=False)
                    self.results["seeds"].append(rec)
                    self.tick()
        self.results["seed_ranges"] = seed_ranges(self.results)
        self.done.add("seeds")

    def depth_width(self) -> None:
        """(c): the variances against depth (at the width) and width (at the depth)."""
        s = self.s
        X, _, idx = self.data[s.sweep_dataset]
        sweeps = [("depth", d, s.width) for d in s.depths] + [("width", s.depth, w) for w in s.widths]
        for sweep, depth, width in sweeps:
            self.bar.set_postfix_str(f"(c) depth {depth} width {width}")
            model = build_mlp(X.shape[1], width, depth, s.sweep_activation, seed=s.seed)
            m = measure(model, X[idx], "categorical", bounds=False)
            tr_f, v1, v2 = to_float(m["fisher_trace"]), to_float(m["var_score_trace"]), to_float(m["var_hessian_trace"])
            self.results["depth_width"].append({
                **config_record(s.sweep_dataset, "categorical", s.sweep_activation, depth, width, s.n_inputs, model),
                "sweep": sweep,
                "fisher_trace": tr_f,
                "fisher_diag_sum": to_float(m["fisher_diag"].sum()),
                "var_score_trace": v1,
                "var_hessian_trace": v2,
                "var_score_diag_sum": to_float(m["var_score_diag"].sum()),
                "var_hessian_diag_sum": to_float(m["var_hessian_diag"].sum()),
                "rel_se_score": rel_se(v1, tr_f),
                "rel_se_hessian": rel_se(v2, tr_f),
            })  # fmt: skip
            self.tick()
        self.done.add("depth_width")

    def training(self) -> None:
        """(d): Adam on the rows not measured; the trace estimators at each checkpoint."""
        s = self.s
        X, y, idx = self.data[s.train_dataset]
        rest = torch.ones(X.shape[0], dtype=torch.bool)
        rest[idx] = False
        pool = torch.nonzero(rest).squeeze(1)
        n_train = int(0.8 * len(pool))
        train_idx, held_idx = pool[:n_train], pool[n_train:]
        self.results["meta"]["training_split"] = {
            "train_rows": len(train_idx), "heldout_rows": len(held_idx),
            "rule": "rows not measured, in index order: first 80% train, rest held out",
        }  # fmt: skip
        for act in s.train_activations:
            model = build_mlp(X.shape[1], s.width, s.depth, act, seed=s.seed)
            opt = torch.optim.Adam(model.parameters(), lr=s.lr)
            gen = torch.Generator().manual_seed(s.seed + 1)
            epoch = 0
            for target in s.checkpoints:
                self.bar.set_postfix_str(f"(d) {act} epoch {target}")
                model.train()
                for _ in range(target - epoch):
                    toy.train_epoch(model, opt, X[train_idx], y[train_idx], s.batch_size, gen)
                model.eval()
                epoch = target
                self.results["training"].append({
                    **config_record(s.train_dataset, "categorical", act, s.depth, s.width, s.n_inputs, model),
                    "epoch": epoch,
                    **_checkpoint(model, X[idx], (X[train_idx], y[train_idx]), (X[held_idx], y[held_idx])),
                })  # fmt: skip
                self.tick()
        self.done.add("training")


def _checkpoint(model: torch.nn.Module, x: torch.Tensor, train: tuple, held: tuple) -> dict[str, Any]:
    """Loss and accuracies, Tr F, the trace estimators' variances and labels needed, at one checkpoint."""
    tr_f = to_float(torchfim.fisher(model, x, family="categorical", estimator="exact", structure="trace"))
    v1 = to_float(torchfim.fisher_variance(model, x, family="categorical", estimator="score", structure="trace"))
    v2 = to_float(torchfim.fisher_variance(model, x, family="categorical", estimator="hessian", structure="trace"))
    k1 = torchfim.samples_needed(model, x, family="categorical", estimator="score", structure="trace",
                                 rel_error=REL_ERROR)
    k2 = torchfim.samples_needed(model, x, family="categorical", estimator="hessian", structure="trace",
                                 rel_error=REL_ERROR)
    loss, acc = loss_acc(model, *train)
    _, held_acc = loss_acc(model, *held)
    return {
        "train_loss": loss,
        "train_accuracy": acc,
        "heldout_accuracy": held_acc,
        "fisher_trace": tr_f,
        "var_score_trace": v1,
        "var_hessian_trace": v2,
        "rel_se_score": rel_se(v1, tr_f),
        "rel_se_hessian": rel_se(v2, tr_f),
        "samples_needed_score": k1,
        "samples_needed_hessian": k2,
    }
