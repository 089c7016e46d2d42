"""The study's figures, drawn from results.json alone: the learning curves of each clean-label data
set and model, and the fitting of clean and noisy labels (memorisation)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..._io import save_figure
from .settings import CLEAN_VARIANTS, FILES, LABELS, NOISY_VARIANTS, lr_text, noisy_label

__all__ = ["curves_name", "draw"]

COLORS = {
    "large": "tab:blue", "small": "tab:red", "small_fp": "tab:green",
    "base": "tab:red", "fp": "tab:green", "fp_fixed": "tab:purple",
}  # fmt: skip


def curves_name(combo: str) -> str:
    """The file of the learning curves of ``combo`` ("data/model")."""
    return f"curves_{combo.replace('/', '_')}.png"


def draw(out: Path, results: dict[str, Any]) -> list[str]:
    """Write every figure into ``out`` (atomically); return their file names in writing order."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    written = []
    s = results["settings"]
    for combo in [f"{d}/{m}" for d, m in s["combos"]]:
        fig = _curves(plt, results, combo)
        name = curves_name(combo)
        save_figure(fig, out / name, dpi=90)
        plt.close(fig)
        written.append(name)
    if s["noisy_combos"] and s["noisy_lrs"]:
        fig = _memorisation(plt, results)
        save_figure(fig, out / FILES["memorisation"], dpi=90)
        plt.close(fig)
        written.append(FILES["memorisation"])
    return written


def _curves(plt, results: dict[str, Any], combo: str):
    """Tr(F), train and test accuracy against steps for the three clean-label configurations."""
    s = results["settings"]
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
    return fig


def _memorisation(plt, results: dict[str, Any]):
    """Train accuracy on the clean and the noisy subsets, one panel per data set/model and learning rate."""
    s = results["settings"]
    ncombos, lrs = s["noisy_combos"], s["noisy_lrs"]
    fig, axes = plt.subplots(len(lrs), len(ncombos), figsize=(4.4 * len(ncombos), 3.5 * len(lrs)), squeeze=False)
    for row, w in zip(axes, lrs):
        for ax, (d, m) in zip(row, ncombos):
            label = noisy_label(d, m, w, s)
            cur = results["curves"][label]
            for v in [v for v in NOISY_VARIANTS if v in cur]:
                alpha = results["aggregates"][label][v]["alpha"]
                name = f"{LABELS[v]} = {alpha:g}" if alpha else LABELS[v]
                _band(ax, cur[v]["clean_acc"], COLORS[v], f"{name}: clean subset", ls="-")
                _band(ax, cur[v]["noisy_acc"], COLORS[v], f"{name}: noisy subset", ls="--")
            ax.set_title(f"{d}/{m}, η = {lr_text(w, s)}, {100 * s['noise_fraction']:g}% labels redrawn", fontsize=9)
            ax.set_xlabel("step")
            ax.set_ylabel("train accuracy (training labels)")
            ax.set_ylim(0, 1.02)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5, loc="center right")
    fig.suptitle(f"Fitting of clean and noisy training labels: mean ± std over {s['n_seeds']} seeds", fontsize=10)
    fig.tight_layout()
    return fig


def _band(ax: Any, c: dict, color: str, label: str, ls: str = "-", minmax: bool = False) -> None:
    """A mean curve with a band: min–max (``minmax``) or ± 1 std."""
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
