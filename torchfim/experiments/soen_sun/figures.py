"""The study's four figures, drawn from results.json (matplotlib's object API, no pyplot)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..._io import save_figure
from .settings import REL_ERROR, Settings

__all__ = ["plot_bound_ratios", "plot_activations", "plot_depth_width", "plot_training"]

_EST_COLORS = {"score": "#1f77b4", "hessian": "#ff7f0e"}
_LAYER_COLORS = ("#4c72b0", "#55a868", "#c44e52", "#8172b2", "#ccb974", "#64b5cd")


def _figure(nrows: int, ncols: int, size: tuple[float, float]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def plot_bound_ratios(results: dict[str, Any], settings: Settings, path: Path) -> None:
    """Figure (a): box plots of bound / exact variance per layer, and the trace's ratio."""
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


def plot_activations(results: dict[str, Any], settings: Settings, path: Path) -> None:
    """Figure (b): Var(Î1) and Var(Î2) per activation, per layer and for the trace."""
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


def plot_depth_width(results: dict[str, Any], settings: Settings, path: Path) -> None:
    """Figure (c): the variances and relative errors against depth and width."""
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


def plot_training(results: dict[str, Any], settings: Settings, path: Path) -> None:
    """Figure (d): Tr F, the variances, the relative errors and the labels needed during training."""
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
        (axes[1][1], f"labels per input for {REL_ERROR:.0%} rel. s.e. (samples_needed)",
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
