"""Soen & Sun (NeurIPS 2021), "On the Variance of the Fisher Information for Deep Learning", at CPU scale.

``torchfim reproduce soen-sun [--out DIR] [--quick]`` runs :func:`run`, which regenerates the
paper's kind of evidence for small MLPs with torchfim's closed-form variances (DESIGN.md §3–4):

(a) ``bound_ratios``: the ratio of each upper bound on the variance to the exact variance, for every
    diagonal entry of the Fisher (summarised per layer as box-plot statistics) and for the trace,
    for the score estimator Î1 (spectral and kurtosis bounds) and the Hessian estimator Î2
    (spectral bound), across activations;
(b) ``activations``: Var(Î1) against Var(Î2), summed over each layer's diagonal and for the trace
    estimator, across ReLU, tanh, sigmoid, softplus, GELU and ELU at initialisation, on the digits
    and MNIST-1D, with the categorical family (classification) and, on the digits, the ``gaussian``
    family (a regression head with the same 10 outputs); repeated without the bounds for further
    initialisation seeds (``seeds``, summarised in ``seed_ranges``: the error bars of figure (b));
(c) ``depth_width``: the same trace and summed-diagonal variances against depth and width (tanh);
(d) ``training``: Tr(F), both trace variances, the relative standard error with one label per input
    and :func:`torchfim.samples_needed` for 10% error, at checkpoints while Adam trains the tanh and
    softplus MLPs on the digits.

Everything is float64, seeded, and conditional on a fixed set of ``n`` inputs (variances are those
of the estimators with one sampled label per input, ``n_samples=1``). The output folder gets PNG
figures, ``results.json`` (every number plotted, plus the settings), ``results.csv`` (the same
numbers in long form) and ``summary.md``. Every file is written atomically, and ``results.json`` /
``results.csv`` / ``summary.md`` are rewritten after every measurement, so an interrupted run keeps
what it had finished. A progress bar (stderr) covers the whole run.

Cost: exact Var(Î2) needs every diagonal output Hessian entry ``∂²o_a(xᵢ)/∂θ_p²``: on torchfim's
general path one forward-over-forward pass per parameter direction, a cost that grows like ``n·P²``
(its per-layer fast path for dense layers needs one per hidden unit). The networks are kept at
P ≲ 2000 parameters (the width sweep goes to P ≈ 9000 once) so that the run takes minutes on 2
CPU cores either way.
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import platform
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import torchfim

from .._io import save_figure, write_json, write_text

__all__ = [
    "ACTIVATIONS",
    "Settings",
    "FULL",
    "QUICK",
    "build_mlp",
    "load_dataset",
    "measurement_indices",
    "run",
    "main",
    "HELP",
    "add_arguments",
    "DEFAULT_OUT",
]

HELP = "the Soen & Sun (2021) variance experiments at CPU scale"
DEFAULT_OUT = "torchfim-soen-sun"

#: Activation name -> module class (PyTorch defaults: Softplus beta=1, GELU exact erf form, ELU alpha=1).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "elu": nn.ELU,
}
#: The bounds compared with the exact variance in experiment (a).
BOUNDS = ("score_spectral", "score_kurtosis", "score_tightest", "hessian_spectral")
#: Bound ratios closer to zero than this fraction of the largest variance in the same configuration
#: are not formed: such entries have zero variance (both bound and variance are 0 up to round-off).
ZERO_VARIANCE_RTOL = 1e-10
REL_ERROR = 0.1
FILES = {
    "json": "results.json",
    "csv": "results.csv",
    "summary": "summary.md",
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


# --------------------------------------------------------------------------- data and models
def load_dataset(name: str, settings: Settings = FULL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` in float64 / int64, built locally (never downloaded).

    ``digits``: scikit-learn's 8×8 digits with pixels scaled to [0, 1] (1797 × 64).
    ``mnist1d``: the training part of MNIST-1D made by the ``mnist1d`` package (default recipe:
    4000 × 40), or fewer sequences when ``settings.mnist1d_samples`` is set.
    """
    if name == "digits":
        try:
            from ..datasets import load_digits
        except ImportError:  # pragma: no cover - helper module missing
            load_digits = None
        if load_digits is not None:
            return load_digits(dtype=torch.float64)
        from sklearn.datasets import load_digits as sk_digits  # pragma: no cover

        bunch = sk_digits()
        return torch.as_tensor(bunch.data / 16.0, dtype=torch.float64), torch.as_tensor(bunch.target)
    if name == "mnist1d":
        try:
            from ..datasets import load_mnist1d
        except ImportError:  # pragma: no cover - helper module missing
            load_mnist1d = None
        if load_mnist1d is not None:
            ds = load_mnist1d(num_samples=settings.mnist1d_samples, dtype=torch.float64)
            return ds.x_train, ds.y_train
        import mnist1d.data  # pragma: no cover

        args = mnist1d.data.get_dataset_args()
        if settings.mnist1d_samples is not None:
            args.num_samples = settings.mnist1d_samples
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            ds = mnist1d.data.make_dataset(args)
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)
        return torch.as_tensor(ds["x"], dtype=torch.float64), torch.as_tensor(ds["y"])
    raise ValueError(f"unknown data set {name!r}; choose 'digits' or 'mnist1d'")


def measurement_indices(num_rows: int, n: int, seed: int) -> torch.Tensor:
    """The ``n`` rows the variances are conditioned on: the first ``n`` of a seeded permutation."""
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return perm[:n]


def build_mlp(n_in: int, width: int, depth: int, activation: str, n_out: int = 10, seed: int = 0) -> nn.Sequential:
    """``Linear(n_in, width), act, …, Linear(width, n_out)`` with ``depth`` hidden layers, in float64.

    PyTorch's default ``nn.Linear`` initialisation in float32 under ``torch.manual_seed(seed)``,
    then cast to float64 (the caller's global random state is left as it was).
    """
    act = ACTIVATIONS[activation]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        w = n_in
        for _ in range(depth):
            layers += [nn.Linear(w, width), act()]
            w = width
        layers.append(nn.Linear(w, n_out))
        model = nn.Sequential(*layers)
    return model.double()


def _layers(model: nn.Module) -> list[dict[str, Any]]:
    """Each Linear layer's label and the flat slice of θ its weight and bias occupy."""
    out, offset = [], 0
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        size = sum(p.numel() for p in lin.parameters() if p.requires_grad)
        kind = "output" if i == len(linears) - 1 else f"hidden {i + 1}"
        out.append(
            {
                "layer": f"L{i + 1}",
                "label": f"L{i + 1} ({lin.in_features}→{lin.out_features}, {kind})",
                "start": offset,
                "stop": offset + size,
                "size": size,
            }
        )
        offset += size
    if offset != sum(p.numel() for p in model.parameters() if p.requires_grad):  # pragma: no cover
        raise RuntimeError("the MLP's parameters are not all in its Linear layers")
    return out


# --------------------------------------------------------------------------- measurements
def _f(t: torch.Tensor | float) -> float:
    return float(t)


def _measure(model: nn.Module, x: torch.Tensor, family: str, *, bounds: bool) -> dict[str, torch.Tensor]:
    """Exact Fisher, exact variances of Î1 and Î2 (one label per input), and the bounds: diag and trace."""
    r: dict[str, torch.Tensor] = {}
    for st in ("diag", "trace"):
        r[f"fisher_{st}"] = torchfim.fisher(model, x, family=family, estimator="exact", structure=st)
        r[f"var_score_{st}"] = torchfim.fisher_variance(model, x, family=family, estimator="score", structure=st)
        r[f"var_hessian_{st}"] = torchfim.fisher_variance(model, x, family=family, estimator="hessian", structure=st)
        if bounds:
            spec = torchfim.score_variance_bound_spectral(model, x, family=family, structure=st)
            kurt = torchfim.score_variance_bound_kurtosis(model, x, family=family, structure=st)
            r[f"score_spectral_{st}"] = spec
            r[f"score_kurtosis_{st}"] = kurt
            r[f"score_tightest_{st}"] = torch.minimum(spec, kurt)  # = torchfim.variance_bound(estimator="score")
            r[f"hessian_spectral_{st}"] = torchfim.hessian_variance_bound_spectral(model, x, family=family, structure=st)
    return r


def _ratio_stats(bound: np.ndarray, var: np.ndarray, floor: float) -> dict[str, Any]:
    """Box-plot statistics of ``bound / var`` over the entries whose variance exceeds ``floor``."""
    keep = var > floor
    stats: dict[str, Any] = {"count": int(keep.sum()), "zero_variance": int((~keep).sum())}
    names = ("min", "q05", "q25", "median", "q75", "q95", "max")
    if not keep.any():
        stats.update({k: None for k in names})
        return stats
    ratio = bound[keep] / var[keep]
    values = np.quantile(ratio, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    stats.update({k: float(v) for k, v in zip(names, values)})
    return stats


def _rel_se(var: float, value: float) -> float | None:
    return math.sqrt(max(var, 0.0)) / value if value > 0 else None


def _config_record(
    dataset: str, family: str, activation: str, depth: int, width: int, n: int, model: nn.Module
) -> dict[str, Any]:
    return {
        "dataset": dataset,
        "family": family,
        "activation": activation,
        "depth": depth,
        "width": width,
        "n_inputs": n,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def _activation_records(
    base: dict[str, Any], layers: list[dict[str, Any]], m: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The (b) record and, when bounds were measured, the (a) record of one configuration."""
    diag = {k: v.numpy() for k, v in m.items() if k.endswith("_diag")}
    rows = []
    for lay in layers:
        part = slice(lay["start"], lay["stop"])
        v1, v2 = float(diag["var_score_diag"][part].sum()), float(diag["var_hessian_diag"][part].sum())
        rows.append(
            {
                "layer": lay["layer"],
                "label": lay["label"],
                "size": lay["size"],
                "fisher_diag_sum": float(diag["fisher_diag"][part].sum()),
                "var_score_diag_sum": v1,
                "var_hessian_diag_sum": v2,
                "var_hessian_diag_max": float(np.abs(diag["var_hessian_diag"][part]).max()),
                "better": "hessian" if v2 <= v1 else "score",
            }
        )
    tr_f, tr1, tr2 = _f(m["fisher_trace"]), _f(m["var_score_trace"]), _f(m["var_hessian_trace"])
    rec_b = {
        **base,
        "layers": rows,
        "trace": {
            "fisher": tr_f,
            "var_score": tr1,
            "var_hessian": tr2,
            "rel_se_score": _rel_se(tr1, tr_f),
            "rel_se_hessian": _rel_se(tr2, tr_f),
            "better": "hessian" if tr2 <= tr1 else "score",
        },
    }
    if "score_spectral_diag" not in m:
        return rec_b, None
    floors = {
        est: ZERO_VARIANCE_RTOL * max(float(diag[f"var_{est}_diag"].max()), 0.0) for est in ("score", "hessian")
    }
    a_layers = []
    for lay in layers:
        part = slice(lay["start"], lay["stop"])
        ratios = {}
        for bound in BOUNDS:
            est = bound.split("_")[0]
            ratios[bound] = _ratio_stats(diag[f"{bound}_diag"][part], diag[f"var_{est}_diag"][part], floors[est])
        a_layers.append({"layer": lay["layer"], "label": lay["label"], "size": lay["size"], "ratios": ratios})
    trace_ratios = {}
    for bound in BOUNDS:
        var = _f(m[f"var_{bound.split('_')[0]}_trace"])
        trace_ratios[bound] = _f(m[f"{bound}_trace"]) / var if var > 0 else None
    trace_bounds = {bound: _f(m[f"{bound}_trace"]) for bound in BOUNDS}
    rec_a = {**base, "layers": a_layers, "trace_ratio": trace_ratios, "trace_bound": trace_bounds}
    return rec_b, rec_a


def _train_epochs(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    batch_size: int,
    gen: torch.Generator,
) -> None:
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(X.shape[0], generator=gen)
        for start in range(0, X.shape[0], batch_size):
            idx = perm[start : start + batch_size]
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
    model.eval()


@torch.no_grad()
def _loss_acc(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    out = model(X)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def _seed_ranges(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (data set, family, activation): min and max over all seeds of each layer's Σ diag variance and of
    the trace variances (the error bars of figure (b)), and how often Î2 has the smaller trace variance."""
    out = []
    for rec in results["activations"]:
        key = (rec["dataset"], rec["family"], rec["activation"])
        recs = [rec] + [r for r in results["seeds"] if (r["dataset"], r["family"], r["activation"]) == key]
        entry: dict[str, Any] = {
            "dataset": key[0], "family": key[1], "activation": key[2], "seeds": [r["seed"] for r in recs],
            "layers": [], "trace": {},
        }
        for li, lay in enumerate(rec["layers"]):
            row = {"layer": lay["layer"]}
            for est in ("score", "hessian"):
                vals = [r["layers"][li][f"var_{est}_diag_sum"] for r in recs]
                row[f"var_{est}_diag_sum_min"], row[f"var_{est}_diag_sum_max"] = min(vals), max(vals)
            row["hessian_better_count"] = sum(r["layers"][li]["better"] == "hessian" for r in recs)
            entry["layers"].append(row)
        for est in ("score", "hessian"):
            vals = [r["trace"][f"var_{est}"] for r in recs]
            entry["trace"][f"var_{est}_min"], entry["trace"][f"var_{est}_max"] = min(vals), max(vals)
        entry["trace"]["hessian_better_count"] = sum(r["trace"]["better"] == "hessian" for r in recs)
        out.append(entry)
    return out


# --------------------------------------------------------------------------- output files
def _csv_rows(results: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []

    def add(section, cfg, layer, quantity, value, epoch=""):
        rows.append(
            [
                section,
                cfg.get("dataset", ""),
                cfg.get("family", ""),
                cfg.get("activation", ""),
                cfg.get("depth", ""),
                cfg.get("width", ""),
                cfg.get("num_params", ""),
                epoch,
                layer,
                quantity,
                "" if value is None else repr(float(value)),
            ]
        )

    for rec in results.get("activations", []):
        for lay in rec["layers"]:
            for q in ("fisher_diag_sum", "var_score_diag_sum", "var_hessian_diag_sum"):
                add("activations", rec, lay["layer"], q, lay[q])
        for q in ("fisher", "var_score", "var_hessian", "rel_se_score", "rel_se_hessian"):
            add("activations", rec, "trace", q, rec["trace"][q])
    for rec in results.get("seeds", []):
        for lay in rec["layers"]:
            for q in ("fisher_diag_sum", "var_score_diag_sum", "var_hessian_diag_sum"):
                add(f"seeds:{rec['seed']}", rec, lay["layer"], q, lay[q])
        for q in ("fisher", "var_score", "var_hessian", "rel_se_score", "rel_se_hessian"):
            add(f"seeds:{rec['seed']}", rec, "trace", q, rec["trace"][q])
    for rec in results.get("bound_ratios", []):
        for lay in rec["layers"]:
            for bound, st in lay["ratios"].items():
                for k in ("count", "zero_variance", "min", "q05", "q25", "median", "q75", "q95", "max"):
                    add("bound_ratios", rec, lay["layer"], f"{bound}_ratio_{k}", st[k])
        for bound, v in rec["trace_ratio"].items():
            add("bound_ratios", rec, "trace", f"{bound}_ratio", v)
    for rec in results.get("depth_width", []):
        for q in ("fisher_trace", "var_score_trace", "var_hessian_trace", "var_score_diag_sum", "var_hessian_diag_sum",
                  "fisher_diag_sum", "rel_se_score", "rel_se_hessian"):
            add(f"depth_width:{rec['sweep']}", rec, "all", q, rec[q])
    for rec in results.get("training", []):
        for q in ("train_loss", "train_accuracy", "heldout_accuracy", "fisher_trace", "var_score_trace",
                  "var_hessian_trace", "rel_se_score", "rel_se_hessian", "samples_needed_score",
                  "samples_needed_hessian"):
            add("training", rec, "trace" if "trace" in q or "se" in q or "samples" in q else "all", q, rec[q],
                epoch=rec["epoch"])
    return rows


def _write_tables(out: Path, results: dict[str, Any]) -> None:
    write_json(out / FILES["json"], results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "dataset", "family", "activation", "depth", "width", "num_params", "epoch", "layer",
                "quantity", "value"])
    w.writerows(_csv_rows(results))
    write_text(out / FILES["csv"], buf.getvalue())


# --------------------------------------------------------------------------- figures
_EST_COLORS = {"score": "#1f77b4", "hessian": "#ff7f0e"}
_LAYER_COLORS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd")


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _plot_bound_ratios(results: dict[str, Any], settings: Settings, path: Path) -> None:
    recs = results["bound_ratios"]
    groups = list(dict.fromkeys((r["dataset"], r["family"]) for r in recs))
    plotted = ("score_spectral", "score_kurtosis", "hessian_spectral")
    titles = {
        "score_spectral": "Î1 (score), spectral bound",
        "score_kurtosis": "Î1 (score), kurtosis bound",
        "hessian_spectral": "Î2 (Hessian), spectral bound",
    }
    fig, axes = _figure(len(plotted), len(groups), (5.2 * len(groups), 3.3 * len(plotted)))
    for col, (dataset, family) in enumerate(groups):
        rows = [r for r in recs if (r["dataset"], r["family"]) == (dataset, family)]
        n_layers = len(rows[0]["layers"])
        for row, bound in enumerate(plotted):
            ax = axes[row][col]
            ticks, ticklabels, shown = [], [], [1.0]
            for g, rec in enumerate(rows):
                x0 = g * (n_layers + 2)
                stats, positions, colors = [], [], []
                for li, lay in enumerate(rec["layers"]):
                    st = lay["ratios"][bound]
                    if st["count"] == 0:
                        continue
                    stats.append(
                        {
                            "med": st["median"], "q1": st["q25"], "q3": st["q75"],
                            "whislo": st["q05"], "whishi": st["q95"], "fliers": [st["min"], st["max"]],
                        }
                    )
                    positions.append(x0 + li)
                    shown += [st["min"], st["max"]]
                    colors.append(_LAYER_COLORS[li % len(_LAYER_COLORS)])
                if stats:
                    parts = ax.bxp(stats, positions=positions, widths=0.7, patch_artist=True, showfliers=True,
                                   flierprops={"marker": ".", "markersize": 3})
                    for box, c in zip(parts["boxes"], colors):
                        box.set_facecolor(c)
                        box.set_alpha(0.75)
                else:
                    ax.text(x0 + (n_layers - 1) / 2, 1.0, "Var = 0\n(no ratio)", ha="center", va="bottom",
                            fontsize=7)
                tr = rec["trace_ratio"][bound]
                if tr is not None:
                    shown.append(tr)
                    ax.plot([x0 + n_layers], [tr], marker="D", color="black", markersize=5, linestyle="none")
                ticks.append(x0 + n_layers / 2)
                ticklabels.append(rec["activation"])
            ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
            ax.set_yscale("log")
            # at least [0.8, 2]: where every ratio is 1 up to round-off, autoscaling would zoom into it
            ax.set_ylim(min(0.8, min(shown) / 1.3), max(2.0, max(shown) * 1.3))
            ax.set_xticks(ticks, ticklabels, fontsize=8)
            ax.set_title(f"{titles[bound]} — {dataset}, {family}", fontsize=9)
            if col == 0:
                ax.set_ylabel("bound / exact variance")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    n_layers = len(recs[0]["layers"])
    handles = [Patch(facecolor=_LAYER_COLORS[i], alpha=0.75, label=recs[0]["layers"][i]["label"].split(" (")[0]
                     + (" (output)" if i == n_layers - 1 else "")) for i in range(n_layers)]
    handles.append(Line2D([], [], marker="D", color="black", linestyle="none", label="trace estimator"))
    axes[0][0].legend(handles=handles, fontsize=7, loc="upper left")
    fig.suptitle(
        "(a) Upper bound / exact variance per diagonal entry (boxes 25–75%, whiskers 5–95%, dots min/max) and for "
        f"the trace (◆); MLPs {settings.depth}×{settings.width}, n={settings.n_inputs}, at init. No box: Var = 0 "
        "(Î2 on the output layer, and everywhere for ReLU)",
        fontsize=10,
    )
    save_figure(fig, path, dpi=100)


def _log_bars(ax, labels: list[str], v1: list[float], v2: list[float],
              ranges: tuple[list[tuple[float, float]], list[tuple[float, float]]] | None = None) -> None:
    """Paired bars of Var(Î1) and Var(Î2) on a log axis; exact zeros drawn as an '0' marker at the bottom.

    ``ranges``: per bar (min, max) over initialisation seeds, drawn as error bars.
    """
    x = np.arange(len(labels))
    positive = [v for v in v1 + v2 if v > 0]
    if ranges is not None:
        positive += [v for rs in ranges for r in rs for v in r if v > 0]
    floor = min(positive) / 30 if positive else 1e-12
    for i, (off, vals, est, name) in enumerate(
        ((-0.2, v1, "score", "Var(Î1) score"), (0.2, v2, "hessian", "Var(Î2) Hessian"))
    ):
        heights = [v if v > 0 else np.nan for v in vals]
        ax.bar(x + off, heights, width=0.4, color=_EST_COLORS[est], label=name)
        if ranges is not None:
            for xi, (lo, hi) in zip(x, ranges[i]):
                if hi > 0:
                    ax.plot([xi + off, xi + off], [max(lo, floor), hi], color="black", linewidth=1.0)
                    ax.plot([xi + off], [hi], marker="_", color="black", markersize=6)
                    ax.plot([xi + off], [max(lo, floor)], marker="_", color="black", markersize=6)
        for xi, v in zip(x, vals):
            if v <= 0:
                ax.text(xi + off, floor, "0", ha="center", va="bottom", fontsize=8, color=_EST_COLORS[est],
                        fontweight="bold")
    ax.set_yscale("log")
    ax.set_ylim(bottom=floor)
    ax.set_xticks(x, labels, fontsize=8, rotation=30)


def _plot_activations(results: dict[str, Any], settings: Settings, path: Path) -> None:
    recs = results["activations"]
    groups = list(dict.fromkeys((r["dataset"], r["family"]) for r in recs))
    n_layers = len(recs[0]["layers"])
    fig, axes = _figure(len(groups), n_layers + 1, (3.4 * (n_layers + 1), 2.9 * len(groups)))
    for row, (dataset, family) in enumerate(groups):
        rows = [r for r in recs if (r["dataset"], r["family"]) == (dataset, family)]
        labels = [r["activation"] for r in rows]
        spread = {sr["activation"]: sr for sr in results.get("seed_ranges", [])
                  if (sr["dataset"], sr["family"]) == (dataset, family)}
        for li in range(n_layers + 1):
            ax = axes[row][li]
            if li < n_layers:
                v1 = [r["layers"][li]["var_score_diag_sum"] for r in rows]
                v2 = [r["layers"][li]["var_hessian_diag_sum"] for r in rows]
                what = f"Σ diag Var, {rows[0]['layers'][li]['label']}"
                src = [spread[a]["layers"][li] if a in spread else None for a in labels]
                keys = [(f"var_{e}_diag_sum_min", f"var_{e}_diag_sum_max") for e in ("score", "hessian")]
            else:
                v1 = [r["trace"]["var_score"] for r in rows]
                v2 = [r["trace"]["var_hessian"] for r in rows]
                what = "Var of the trace estimator"
                src = [spread[a]["trace"] if a in spread else None for a in labels]
                keys = [(f"var_{e}_min", f"var_{e}_max") for e in ("score", "hessian")]
            ranges = None
            if spread and all(r is not None for r in src):
                ranges = tuple([(r[lo], r[hi]) for r in src] for lo, hi in keys)
            _log_bars(ax, labels, v1, v2, ranges)
            ax.set_title(f"{dataset}, {family}: {what}", fontsize=8)
            if li == 0:
                ax.set_ylabel("variance (k = 1 label/input)")
    handles, names = axes[0][0].get_legend_handles_labels()
    if results.get("seed_ranges"):
        from matplotlib.lines import Line2D

        seeds = results["seed_ranges"][0]["seeds"]
        handles.append(Line2D([], [], color="black", marker="_", markersize=6))
        names.append(f"range over init seeds {', '.join(map(str, seeds))}")
    fig.legend(handles, names, loc="outside lower center", ncol=len(handles), fontsize=8)
    fig.suptitle(
        f"(b) Var(Î1) vs Var(Î2) across activations at init (MLP {settings.depth}×{settings.width}, "
        f"n={settings.n_inputs} inputs, one label per input; bars: seed {settings.seed}; '0' = exactly zero)",
        fontsize=10,
    )
    save_figure(fig, path, dpi=100)


def _plot_depth_width(results: dict[str, Any], settings: Settings, path: Path) -> None:
    recs = results["depth_width"]
    fig, axes = _figure(2, 2, (10, 7))
    for col, sweep in enumerate(("depth", "width")):
        rows = [r for r in recs if r["sweep"] == sweep]
        xs = [r[sweep] for r in rows]
        ax = axes[0][col]
        for est in ("score", "hessian"):
            name = "Î1" if est == "score" else "Î2"
            ax.plot(xs, [r[f"var_{est}_trace"] for r in rows], marker="o", color=_EST_COLORS[est],
                    label=f"Var Tr {name}")
            ax.plot(xs, [r[f"var_{est}_diag_sum"] for r in rows], marker="s", linestyle="--",
                    color=_EST_COLORS[est], label=f"Σ_p Var({name})_pp")
        ax.set_yscale("log")
        ax.set_ylabel("variance (k = 1)")
        ax2 = axes[1][col]
        for est in ("score", "hessian"):
            name = "Î1" if est == "score" else "Î2"
            ax2.plot(xs, [r[f"rel_se_{est}"] for r in rows], marker="o", color=_EST_COLORS[est],
                     label=f"√Var Tr {name} / Tr F")
        ax2.set_yscale("log")
        ax2.set_ylabel("relative standard error of Tr F (k = 1)")
        for a in (ax, ax2):
            a.set_xticks(xs, [f"{x}\n(P={r['num_params']})" for x, r in zip(xs, rows)], fontsize=8)
            a.set_xlabel("hidden layers" if sweep == "depth" else "hidden width")
            a.legend(fontsize=7)
            a.grid(True, which="major", alpha=0.3)
        if sweep == "width":
            for a in (ax, ax2):
                a.set_xscale("log", base=2)
                a.set_xticks(xs, [f"{x}\n(P={r['num_params']})" for x, r in zip(xs, rows)], fontsize=8)
        fixed = f"width {settings.width}" if sweep == "depth" else f"{settings.depth} hidden layers"
        ax.set_title(f"variance vs {sweep} ({fixed})", fontsize=9)
        ax2.set_title(f"relative error of the trace estimators vs {sweep}", fontsize=9)
    fig.suptitle(
        f"(c) {settings.sweep_activation} MLPs on {settings.sweep_dataset}, categorical, at init, "
        f"n={settings.n_inputs}",
        fontsize=10,
    )
    save_figure(fig, path, dpi=100)


def _plot_training(results: dict[str, Any], settings: Settings, path: Path) -> None:
    recs = results["training"]
    acts = list(dict.fromkeys(r["activation"] for r in recs))
    fig, axes = _figure(2, 2, (10, 7))
    styles = {a: s for a, s in zip(acts, ("-", ":", "-.", "--"))}
    panels = (
        (axes[0][0], "Tr F (exact)", [("fisher_trace", None)]),
        (axes[0][1], "variance of the trace estimator (k = 1)", [("var_score_trace", "score"),
                                                                  ("var_hessian_trace", "hessian")]),
        (axes[1][0], "relative standard error √Var / Tr F (k = 1)", [("rel_se_score", "score"),
                                                                      ("rel_se_hessian", "hessian")]),
        (axes[1][1], f"labels per input for {REL_ERROR:.0%} error (samples_needed)",
         [("samples_needed_score", "score"), ("samples_needed_hessian", "hessian")]),
    )
    for ax, title, series in panels:
        for act in acts:
            rows = [r for r in recs if r["activation"] == act]
            xs = [r["epoch"] for r in rows]
            for key, est in series:
                color = "black" if est is None else _EST_COLORS[est]
                name = act if est is None else f"{act}, {'Î1' if est == 'score' else 'Î2'}"
                ys = [r[key] if r[key] is not None else np.nan for r in rows]
                ax.plot(xs, ys, marker="o", markersize=4, linestyle=styles[act], color=color, label=name)
        ax.set_xscale("symlog", linthresh=1)
        ax.set_yscale("log")
        ax.set_xticks(list(settings.checkpoints), [str(c) for c in settings.checkpoints])
        if series[0][0].startswith("samples_needed"):  # small integers: plain tick labels
            from matplotlib.ticker import FuncFormatter, LogLocator

            ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
        ax.set_xlabel("epochs of Adam")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(
        f"(d) During training on {settings.train_dataset} (MLP {settings.depth}×{settings.width}, Adam lr "
        f"{settings.lr:g}); Fisher on n={settings.n_inputs} held-out inputs",
        fontsize=10,
    )
    save_figure(fig, path, dpi=100)


# --------------------------------------------------------------------------- summary
def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "—"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}"


def _summary(results: dict[str, Any], settings: Settings, done: set[str]) -> str:
    s = settings
    meta = results["meta"]
    lines = [
        "# Soen & Sun (2021) at CPU scale: the variance of the Fisher estimators Î1 and Î2",
        "",
        f"Generated by `{meta['command']}` (torchfim {meta['torchfim']}, torch {meta['torch']}, "
        f"{meta['threads']} torch thread{'s' if meta['threads'] != 1 else ''}){' — QUICK settings, for tests only' if meta['quick'] else ''}. "
        + (f"Wall time {meta['seconds_total']:.0f} s." if "seconds_total" in meta else "**Run incomplete.**"),
        "",
        "## What was run",
        f"MLPs with {s.depth} hidden layers of width {s.width} (PyTorch default init, seed {s.seed}, float64) "
        f"and 10 outputs, on n = {s.n_inputs} fixed inputs from scikit-learn's digits (64 features, pixels/16) "
        "and MNIST-1D (40 features, generated locally). Labels are drawn from the model; all variances are the "
        "exact closed forms of torchfim (DESIGN.md §4) for one label per input (k = 1), conditional on the "
        "inputs: nothing here is Monte-Carlo. Var(Î2) uses the exact diagonal output Hessians "
        "(forward-over-forward).",
        "",
        f"**Scale-down.** The paper works with MNIST-scale networks; here the networks have P ≈ "
        f"{_p_range(results)} parameters (the width sweep goes further) and the variances are conditioned on "
        f"n = {s.n_inputs} inputs, because the exact variance of Î2 needs ∂²o_a(xᵢ)/∂θ_p² for every parameter p "
        "and input i (forward-over-forward differentiation; on torchfim's general path one pass per parameter, "
        "a cost that grows like n·P²), Î1's needs the C²×C² fourth-moment matrix of every input, and the whole "
        "run must finish in minutes on 2 CPU cores. Variances scale like 1/n for a fixed network, so absolute "
        "values depend on n; comparisons between the estimators and ratios of bounds to variances do not. "
        "The bounds are torchfim's (`score_variance_bound_spectral`, "
        "`score_variance_bound_kurtosis`, `hessian_variance_bound_spectral`); their docstrings state and prove "
        "them and relate them to the paper's bounds (cf. the paper's Figure A.3, the ratio of its Theorem 7 "
        "bound to the variance) — they are not a transcription of the paper's theorem statements.",
        "",
        "## Figures",
        f"- `{FILES['fig_a']}` (a): bound / exact variance per diagonal entry, per layer (box plots) and for the "
        "trace estimator (◆), for Î1's spectral and kurtosis bounds and Î2's spectral bound, across activations.",
        f"- `{FILES['fig_b']}` (b): Σ over each layer's diagonal of Var(Î1) and Var(Î2), and the variance of the "
        "two trace estimators, across activations; rows: digits and MNIST-1D (categorical), digits with a "
        "Gaussian (σ = 1) regression head on the same 10 outputs.",
        f"- `{FILES['fig_c']}` (c): the same variances and the relative error of Tr F against depth "
        f"({', '.join(map(str, s.depths))} hidden layers, width {s.width}) and width "
        f"({', '.join(map(str, s.widths))}, {s.depth} hidden layers), {s.sweep_activation}, digits.",
        f"- `{FILES['fig_d']}` (d): Tr F, the trace variances, the relative standard error at k = 1 and "
        f"`samples_needed(rel_error={REL_ERROR})` at epochs {', '.join(map(str, s.checkpoints))} of Adam "
        f"(lr {s.lr:g}, batch {s.batch_size}) for {' and '.join(s.train_activations)} on the digits; the Fisher "
        "is measured on held-out inputs.",
        f"- `{FILES['json']}` holds every plotted number (box statistics, not raw per-entry ratios) and the "
        f"settings; `{FILES['csv']}` the same numbers in long form.",
        "",
        "## Key numbers",
    ]
    concl: list[str] = []
    if "bound_ratios" in done and results.get("bound_ratios"):
        recs = results["bound_ratios"]
        lines.append("**(a) Bound / variance** (over all entries with non-zero variance, all activations and data sets):")
        lines.append("")
        lines.append("| setting | bound | min entry ratio | median of layer medians | trace ratio range |")
        lines.append("| --- | --- | --- | --- | --- |")
        overall_min = math.inf
        for dataset, family in dict.fromkeys((r["dataset"], r["family"]) for r in recs):
            rows = [r for r in recs if (r["dataset"], r["family"]) == (dataset, family)]
            for bound in ("score_spectral", "score_kurtosis", "hessian_spectral"):  # tightest: in results.json
                mins = [lay["ratios"][bound]["min"] for r in rows for lay in r["layers"]
                        if lay["ratios"][bound]["min"] is not None]
                meds = [lay["ratios"][bound]["median"] for r in rows for lay in r["layers"]
                        if lay["ratios"][bound]["median"] is not None]
                trs = [r["trace_ratio"][bound] for r in rows if r["trace_ratio"][bound] is not None]
                if mins:
                    overall_min = min(overall_min, min(mins))
                lines.append(
                    f"| {dataset}, {family} | {bound} | {_fmt(min(mins) if mins else None, 4)} | "
                    f"{_fmt(float(np.median(meds)) if meds else None)} | "
                    f"{_fmt(min(trs) if trs else None)} – {_fmt(max(trs) if trs else None)} |"
                )
        lines.append("")
        concl.append(
            f"Every bound is at or above the exact variance for every entry and trace measured (smallest "
            f"ratio {overall_min:.6g}), as upper bounds must be. "
            + _bound_tightness_sentence(recs)
        )
    if "activations" in done and results.get("activations"):
        recs = results["activations"]
        lines.append("**(b) Trace estimators at init** (variance with k = 1; rel. SE = √Var / Tr F):")
        lines.append("")
        lines.append("| data, family | activation | Tr F | Var Tr Î1 | Var Tr Î2 | rel. SE Î1 | rel. SE Î2 | "
                     "layers where Î2 has the smaller Σ diag variance |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in recs:
            t = r["trace"]
            wins = [lay["layer"] for lay in r["layers"] if lay["better"] == "hessian"]
            lines.append(
                f"| {r['dataset']}, {r['family']} | {r['activation']} | {_fmt(t['fisher'])} | {_fmt(t['var_score'])} | "
                f"{_fmt(t['var_hessian'])} | {_fmt(t['rel_se_score'])} | {_fmt(t['rel_se_hessian'])} | "
                f"{', '.join(wins) or 'none'} of {len(r['layers'])} |"
            )
        lines.append("")
        concl.extend(_activation_sentences(recs))
    if "seeds" in done and results.get("seed_ranges"):
        lines.append(_seed_sentence(results))
        lines.append("")
    if "depth_width" in done and results.get("depth_width"):
        recs = results["depth_width"]
        lines.append("**(c) Depth and width** (tanh, digits):")
        lines.append("")
        lines.append("| sweep | value | P | Tr F | Var Tr Î1 | Var Tr Î2 | Σ diag Var Î1 | Σ diag Var Î2 |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for r in recs:
            lines.append(
                f"| {r['sweep']} | {r[r['sweep']]} | {r['num_params']} | {_fmt(r['fisher_trace'])} | "
                f"{_fmt(r['var_score_trace'])} | {_fmt(r['var_hessian_trace'])} | {_fmt(r['var_score_diag_sum'])} | "
                f"{_fmt(r['var_hessian_diag_sum'])} |"
            )
        lines.append("")
        concl.extend(_sweep_sentences(recs))
    if "training" in done and results.get("training"):
        recs = results["training"]
        lines.append(f"**(d) Training** (digits; Fisher on {s.n_inputs} held-out inputs; first, middle and last "
                     "checkpoints — all are in results.json):")
        lines.append("")
        lines.append("| activation | epoch | train loss | held-out acc. | Tr F | rel. SE Î1 | rel. SE Î2 | "
                     f"k for {REL_ERROR:.0%}: Î1 | k: Î2 |")
        lines.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        shown = _training_rows(recs)
        for r in shown:
            lines.append(
                f"| {r['activation']} | {r['epoch']} | {r['train_loss']:.3f} | {r['heldout_accuracy']:.3f} | "
                f"{_fmt(r['fisher_trace'])} | {_fmt(r['rel_se_score'])} | {_fmt(r['rel_se_hessian'])} | "
                f"{r['samples_needed_score']} | {r['samples_needed_hessian']} |"
            )
        lines.append("")
        concl.extend(_training_sentences(recs))
    pending = [k for k in ("bound_ratios", "activations", "seeds", "depth_width", "training") if k not in done]
    if pending:
        lines.append(f"*Not yet run (interrupted or in progress): {', '.join(pending)}.*")
        lines.append("")
    lines.append("## Conclusions")
    lines.extend(f"- {c}" for c in concl)
    lines.append(
        f"- Caveats: (a), (c) and (d) use one initialisation seed, (b) {1 + len(s.extra_seeds)}; one fixed set of "
        f"{s.n_inputs} inputs per data set; CPU-sized networks at PyTorch's default initialisation. Variances are "
        "conditional on the inputs (the part of the error due to which inputs were drawn is not included). "
        "The bounds are torchfim's statements, checked here to be valid (≥ the variance) and for their "
        "looseness, not against the paper's exact theorem statements."
    )
    lines.append("")
    return "\n".join(lines)


def _seed_sentence(results: dict[str, Any]) -> str:
    """How stable the winner (Î1 or Î2) is over initialisation seeds, per layer and for the trace."""
    ranges = results["seed_ranges"]
    seeds = ranges[0]["seeds"]
    n = len(seeds)
    layer_cells = [(sr, lay) for sr in ranges for lay in sr["layers"]]
    stable_layers = sum(lay["hessian_better_count"] in (0, n) for _, lay in layer_cells)
    unstable = [f"{sr['activation']}/{sr['dataset']}/{sr['family']} {lay['layer']} ({lay['hessian_better_count']}/{n})"
                for sr, lay in layer_cells if lay["hessian_better_count"] not in (0, n)]
    stable_trace = sum(sr["trace"]["hessian_better_count"] in (0, n) for sr in ranges)
    unstable_tr = [f"{sr['activation']}/{sr['dataset']}/{sr['family']} ({sr['trace']['hessian_better_count']}/{n})"
                   for sr in ranges if sr["trace"]["hessian_better_count"] not in (0, n)]
    text = (f"**(b) Over {n} initialisation seeds** ({', '.join(map(str, seeds))}; same inputs; the error bars of "
            f"figure (b)): the estimator with the smaller Σ diag variance is the same for every seed in "
            f"{stable_layers} of {len(layer_cells)} (configuration, layer) pairs")
    text += f" (not in: {', '.join(unstable)}; x/{n} = seeds where Î2 wins)" if unstable else ""
    text += f", and for the trace in {stable_trace} of {len(ranges)} configurations"
    text += f" (not in: {', '.join(unstable_tr)})." if unstable_tr else "."
    return text


def _p_range(results: dict[str, Any]) -> str:
    ps = sorted({r["num_params"] for r in results.get("activations", [])})
    return f"{ps[0]}–{ps[-1]}" if ps else "?"


def _bound_tightness_sentence(recs: list[dict[str, Any]]) -> str:
    def med(bound: str, family: str | None = None) -> float | None:
        vals = [lay["ratios"][bound]["median"] for r in recs for lay in r["layers"]
                if lay["ratios"][bound]["median"] is not None and (family is None or r["family"] == family)]
        return float(np.median(vals)) if vals else None

    parts = []
    cat = {b: med(b, "categorical") for b in BOUNDS}
    if cat["score_spectral"] is not None and cat["score_kurtosis"] is not None:
        parts.append(
            f"For classification the typical (median) entry's bound is {cat['score_spectral']:.3g}× its variance "
            f"for Î1's spectral bound and {cat['score_kurtosis']:.3g}× for the kurtosis bound"
        )
    if cat["hessian_spectral"] is not None:
        parts.append(f"{cat['hessian_spectral']:.3g}× for Î2's spectral bound")
    text = ", ".join(parts) + "." if parts else ""
    gauss = med("hessian_spectral", "gaussian")
    if gauss is not None:
        text += (f" With the Gaussian head (Λ = I) Î2's bound is exact (median ratio {gauss:.6g}), the equality "
                 "case of its proof")
        g1, gk = med("score_spectral", "gaussian"), med("score_kurtosis", "gaussian")
        if g1 is not None and gk is not None:
            text += (f", and Î1's entry bounds are a constant multiple of the variance ({g1:.6g} and {gk:.6g}; for "
                     "u ~ N(0, I_C) with C = 10 the analytic values are (C+2−1)/2 = 5.5 and (C²+2C−1)/2 = 59.5, since "
                     "E(uᵀv)⁴ = 3‖v‖⁴, λ_max(E[u⊗u⊗u⊗u]) = C+2 and E‖u‖⁴ = C²+2C)")
        text += "."
    return text


def _activation_sentences(recs: list[dict[str, Any]]) -> list[str]:
    out = []
    cat = [r for r in recs if r["family"] == "categorical"]
    relu = [r for r in recs if r["activation"] == "relu"]
    if relu:
        zero = all(lay["var_hessian_diag_max"] == 0 for r in relu for lay in r["layers"])
        out.append(
            "ReLU: Var(Î2) is exactly zero on every diagonal entry " + ("(as the maths says: ∂²o/∂θ_p² = 0 for a "
            "piecewise-linear network)" if zero else "— NOT observed, which would contradict the maths")
            + f"; its trace variance is {_fmt(max(r['trace']['var_hessian'] for r in relu))} at most "
            "(Tr Î2 is then exact)."
        )
    last_zero = all(r["layers"][-1]["var_hessian_diag_max"] == 0 for r in recs)
    out.append(
        "The output layer's Var(Î2) diagonal is zero for every activation and family"
        + ("" if last_zero else " — NOT observed everywhere (unexpected)")
        + " (o is linear in the last layer's weights), so Î2 estimates that layer's diagonal exactly."
    )
    if cat:
        smooth = [r for r in cat if r["activation"] != "relu"]
        hidden = [(r, lay) for r in smooth for lay in r["layers"][:-1]]
        hidden_wins = sum(lay["better"] == "hessian" for _, lay in hidden)
        tr_wins = [f"{r['activation']}/{r['dataset']}" for r in smooth if r["trace"]["better"] == "hessian"]
        if hidden:
            ratios = [lay["var_hessian_diag_sum"] / lay["var_score_diag_sum"] for _, lay in hidden
                      if lay["var_score_diag_sum"] > 0]
            out.append(
                "Classification at init, smooth activations: inside the hidden layers Î2 has the smaller summed "
                f"diagonal variance in {hidden_wins} of {len(hidden)} (configuration, layer) pairs "
                f"(Var(Î2)/Var(Î1) from {_fmt(min(ratios))} to {_fmt(max(ratios))}); for the trace estimator Î2 is "
                f"better in {len(tr_wins)} of {len(smooth)} configurations"
                + (f" ({', '.join(tr_wins)})" if tr_wins else "")
                + ". So at initialisation the choice is per layer: Î2 for the output layer (and for everything in a "
                "ReLU network), Î1 for the hidden layers of smooth networks, whose ∂²o/∂θ_p² make Î2 noisy there."
            )
    gauss = [r for r in recs if r["family"] == "gaussian"]
    if gauss:
        g_wins = sum(r["trace"]["better"] == "hessian" for r in gauss)
        out.append(
            f"Gaussian head (digits): Î2 wins the trace in {g_wins} of {len(gauss)} activations; Λ = I there, so "
            "Var(Î2) is ‖∂²o‖² exactly while Î1's variance carries the Gaussian fourth moments."
        )
    return out


def _sweep_sentences(recs: list[dict[str, Any]]) -> list[str]:
    out = []
    for sweep in ("depth", "width"):
        rows = [r for r in recs if r["sweep"] == sweep]
        if len(rows) < 2:
            continue
        a, b = rows[0], rows[-1]
        out.append(
            f"{sweep.capitalize()} {a[sweep]} → {b[sweep]} (tanh): relative SE of Tr Î1 "
            f"{_fmt(a['rel_se_score'])} → {_fmt(b['rel_se_score'])}, of Tr Î2 {_fmt(a['rel_se_hessian'])} → "
            f"{_fmt(b['rel_se_hessian'])}; Var Tr Î2 / Var Tr Î1 {_fmt(_ratio(a))} → {_fmt(_ratio(b))}."
        )
    return out


def _ratio(r: dict[str, Any]) -> float | None:
    return r["var_hessian_trace"] / r["var_score_trace"] if r["var_score_trace"] > 0 else None


def _training_sentences(recs: list[dict[str, Any]]) -> list[str]:
    out = []
    for act in dict.fromkeys(r["activation"] for r in recs):
        rows = [r for r in recs if r["activation"] == act]
        a, b = rows[0], rows[-1]
        out.append(
            f"Training ({act}, epoch {a['epoch']} → {b['epoch']}, held-out accuracy {a['heldout_accuracy']:.2f} → "
            f"{b['heldout_accuracy']:.2f}): Tr F {_fmt(a['fisher_trace'])} → {_fmt(b['fisher_trace'])}; relative SE "
            f"Î1 {_fmt(a['rel_se_score'])} → {_fmt(b['rel_se_score'])}, Î2 {_fmt(a['rel_se_hessian'])} → "
            f"{_fmt(b['rel_se_hessian'])}; labels per input for {REL_ERROR:.0%} error: Î1 {a['samples_needed_score']} → "
            f"{b['samples_needed_score']}, Î2 {a['samples_needed_hessian']} → {b['samples_needed_hessian']}."
            + _crossing(rows)
        )
    return out


def _training_rows(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """First, middle and last checkpoint of each activation (all of them are in results.json)."""
    out = []
    for act in dict.fromkeys(r["activation"] for r in recs):
        rows = [r for r in recs if r["activation"] == act]
        picks = sorted({0, len(rows) // 2, len(rows) - 1})
        out.extend(rows[i] for i in picks)
    return out


def _crossing(rows: list[dict[str, Any]]) -> str:
    """Where the better trace estimator changes during training, if it does."""
    better = ["hessian" if r["var_hessian_trace"] <= r["var_score_trace"] else "score" for r in rows]
    changes = [rows[i]["epoch"] for i in range(1, len(rows)) if better[i] != better[i - 1]]
    if not changes:
        return f" The better trace estimator is {'Î2' if better[0] == 'hessian' else 'Î1'} throughout."
    name = {"hessian": "Î2", "score": "Î1"}
    text = (f" The better trace estimator goes from {name[better[0]]} to {name[better[-1]]} "
            f"(changes at epoch{'s' if len(changes) > 1 else ''} {', '.join(map(str, changes))})")
    first, last = rows[0], rows[-1]
    if last["rel_se_score"] > first["rel_se_score"] and last["rel_se_hessian"] <= first["rel_se_hessian"]:
        text += ": as training sharpens the predictions, Î1's relative error grows while Î2's does not"
    return text + "."


# --------------------------------------------------------------------------- the run
def _units(s: Settings) -> int:
    return (
        len(s.settings_ab) * len(s.activations) * (1 + len(s.extra_seeds))
        + len(s.depths)
        + len(s.widths)
        + len(s.train_activations) * len(s.checkpoints)
    )


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
        return _run(Path(out), quick, settings or (QUICK if quick else FULL), progress, command)
    finally:
        torch.set_num_threads(previous)


def _run(out: Path, quick: bool, s: Settings, progress: bool, command: str | None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "meta": {
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
            "init": "PyTorch default nn.Linear init in float32 under torch.manual_seed(seed), then .double()",
            "inputs": "rows measurement_indices = torch.randperm(N, generator=manual_seed(seed))[:n_inputs]",
            "seconds": {},
        },
        "settings": asdict(s),
        "datasets": {},
        "bound_ratios": [],
        "activations": [],
        "depth_width": [],
        "seeds": [],
        "seed_ranges": [],
        "training": [],
    }
    done: set[str] = set()

    def save_tables() -> None:
        _write_tables(out, results)
        write_text(out / FILES["summary"], _summary(results, s, done))

    data: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    needed = dict.fromkeys([d for d, _ in s.settings_ab] + [s.sweep_dataset, s.train_dataset])
    for name in needed:
        X, y = load_dataset(name, s)
        idx = measurement_indices(X.shape[0], s.n_inputs, s.seed)
        data[name] = (X, y, idx)
        results["datasets"][name] = {"rows": int(X.shape[0]), "features": int(X.shape[1]), "indices": idx.tolist()}

    bar = tqdm(total=_units(s), desc="soen-sun", unit="config", disable=not progress, file=sys.stderr)
    try:
        # (a) and (b): activations, bounds ---------------------------------------------------------
        t0 = time.perf_counter()
        for dataset, family in s.settings_ab:
            X, _, idx = data[dataset]
            x = X[idx]
            for act in s.activations:
                bar.set_postfix_str(f"(a,b) {dataset}/{family}/{act}")
                model = build_mlp(X.shape[1], s.width, s.depth, act, seed=s.seed)
                base = {**_config_record(dataset, family, act, s.depth, s.width, s.n_inputs, model), "seed": s.seed}
                m = _measure(model, x, family, bounds=True)
                rec_b, rec_a = _activation_records(base, _layers(model), m)
                results["activations"].append(rec_b)
                results["bound_ratios"].append(rec_a)
                save_tables()
                bar.update()
        done.update({"bound_ratios", "activations"})
        results["meta"]["seconds"]["bound_ratios+activations"] = time.perf_counter() - t0
        save_tables()
        _plot_bound_ratios(results, s, out / FILES["fig_a"])
        _plot_activations(results, s, out / FILES["fig_b"])

        # (b') the same without bounds for more initialisation seeds ---------------------------------
        t0 = time.perf_counter()
        for seed in s.extra_seeds:
            for dataset, family in s.settings_ab:
                X, _, idx = data[dataset]
                x = X[idx]
                for act in s.activations:
                    bar.set_postfix_str(f"(b) seed {seed} {dataset}/{family}/{act}")
                    model = build_mlp(X.shape[1], s.width, s.depth, act, seed=seed)
                    base = {**_config_record(dataset, family, act, s.depth, s.width, s.n_inputs, model), "seed": seed}
                    rec, _ = _activation_records(base, _layers(model), _measure(model, x, family, bounds=False))
                    results["seeds"].append(rec)
                    save_tables()
                    bar.update()
        results["seed_ranges"] = _seed_ranges(results)
        done.add("seeds")
        results["meta"]["seconds"]["seeds"] = time.perf_counter() - t0
        save_tables()
        _plot_activations(results, s, out / FILES["fig_b"])

        # (c) depth and width ------------------------------------------------------------------------
        t0 = time.perf_counter()
        X, _, idx = data[s.sweep_dataset]
        x = X[idx]
        sweeps = [("depth", d, s.width) for d in s.depths] + [("width", s.depth, w) for w in s.widths]
        for sweep, depth, width in sweeps:
            bar.set_postfix_str(f"(c) depth {depth} width {width}")
            model = build_mlp(X.shape[1], width, depth, s.sweep_activation, seed=s.seed)
            m = _measure(model, x, "categorical", bounds=False)
            tr_f, v1, v2 = _f(m["fisher_trace"]), _f(m["var_score_trace"]), _f(m["var_hessian_trace"])
            results["depth_width"].append(
                {
                    **_config_record(s.sweep_dataset, "categorical", s.sweep_activation, depth, width, s.n_inputs,
                                     model),
                    "sweep": sweep,
                    "fisher_trace": tr_f,
                    "fisher_diag_sum": _f(m["fisher_diag"].sum()),
                    "var_score_trace": v1,
                    "var_hessian_trace": v2,
                    "var_score_diag_sum": _f(m["var_score_diag"].sum()),
                    "var_hessian_diag_sum": _f(m["var_hessian_diag"].sum()),
                    "rel_se_score": _rel_se(v1, tr_f),
                    "rel_se_hessian": _rel_se(v2, tr_f),
                }
            )
            save_tables()
            bar.update()
        done.add("depth_width")
        results["meta"]["seconds"]["depth_width"] = time.perf_counter() - t0
        save_tables()
        _plot_depth_width(results, s, out / FILES["fig_c"])

        # (d) training ---------------------------------------------------------------------------------
        t0 = time.perf_counter()
        X, y, idx = data[s.train_dataset]
        x = X[idx]
        rest = torch.ones(X.shape[0], dtype=torch.bool)
        rest[idx] = False
        pool = torch.nonzero(rest).squeeze(1)
        n_train = int(0.8 * len(pool))
        train_idx, held_idx = pool[:n_train], pool[n_train:]
        results["meta"]["training_split"] = {"train_rows": len(train_idx), "heldout_rows": len(held_idx),
                                             "rule": "rows not measured, in index order: first 80% train, rest held out"}
        for act in s.train_activations:
            model = build_mlp(X.shape[1], s.width, s.depth, act, seed=s.seed)
            opt = torch.optim.Adam(model.parameters(), lr=s.lr)
            gen = torch.Generator().manual_seed(s.seed + 1)
            epoch = 0
            for target in s.checkpoints:
                bar.set_postfix_str(f"(d) {act} epoch {target}")
                _train_epochs(model, opt, X[train_idx], y[train_idx], target - epoch, s.batch_size, gen)
                epoch = target
                model.eval()
                tr_f = _f(torchfim.fisher(model, x, family="categorical", estimator="exact", structure="trace"))
                v1 = _f(torchfim.fisher_variance(model, x, family="categorical", estimator="score", structure="trace"))
                v2 = _f(torchfim.fisher_variance(model, x, family="categorical", estimator="hessian",
                                                 structure="trace"))
                k1 = torchfim.samples_needed(model, x, family="categorical", estimator="score", structure="trace",
                                             rel_error=REL_ERROR)
                k2 = torchfim.samples_needed(model, x, family="categorical", estimator="hessian", structure="trace",
                                             rel_error=REL_ERROR)
                loss, acc = _loss_acc(model, X[train_idx], y[train_idx])
                _, held_acc = _loss_acc(model, X[held_idx], y[held_idx])
                results["training"].append(
                    {
                        **_config_record(s.train_dataset, "categorical", act, s.depth, s.width, s.n_inputs, model),
                        "epoch": epoch,
                        "train_loss": loss,
                        "train_accuracy": acc,
                        "heldout_accuracy": held_acc,
                        "fisher_trace": tr_f,
                        "var_score_trace": v1,
                        "var_hessian_trace": v2,
                        "rel_se_score": _rel_se(v1, tr_f),
                        "rel_se_hessian": _rel_se(v2, tr_f),
                        "samples_needed_score": k1,
                        "samples_needed_hessian": k2,
                    }
                )
                save_tables()
                bar.update()
        done.add("training")
        results["meta"]["seconds"]["training"] = time.perf_counter() - t0
        _plot_training(results, s, out / FILES["fig_d"])
    finally:
        bar.close()
    results["meta"]["seconds_total"] = time.perf_counter() - t_start
    save_tables()
    return results


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchfim reproduce soen-sun``."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (created if needed; default: {DEFAULT_OUT}/)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks and fewer settings (under a minute; for tests and smoke runs)")
    parser.add_argument("--threads", type=int, default=1, metavar="N",
                        help="torch intra-op threads (default: 1; more only helps on an idle machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run from parsed ``args`` (the ``torchfim reproduce soen-sun`` options) or from an argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m torchfim.experiments.soen_sun", description=HELP)
        add_arguments(parser)
        args = parser.parse_args(args)
    for module in ("matplotlib", "sklearn", "mnist1d"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(
                f"torchfim reproduce soen-sun needs the optional package {module!r}: pip install 'torchfim[cli]'"
            ) from exc
    cmd = f"torchfim reproduce soen-sun --out {args.out}" + (" --quick" if args.quick else "")
    if args.threads < 1:
        raise ValueError(f"--threads must be at least 1, got {args.threads}")
    res = run(args.out, quick=args.quick, progress=not args.no_progress, threads=args.threads, command=cmd)
    print(f"wrote {Path(args.out) / FILES['summary']} and {len(FILES) - 1} more files "
          f"in {res['meta']['seconds_total']:.0f} s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
