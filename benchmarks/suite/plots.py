"""The sweep's plots: time and peak memory against each axis, one PNG per axis (atomically)."""

from __future__ import annotations

from pathlib import Path

from torchfim._io import save_figure

from .sweep import SWEEP_AXES, live_peak

__all__ = ["plot_sweep"]

#: Axis -> (x-axis label, the key of a sweep point that is its x value).
_AXES = {
    "width": ("number of parameters P (MLP 64-w-w-10, w = 8…1024)", "P"),
    "batch": ("mini-batch size (MLP-A, 1797 inputs)", "batch"),
    "classes": ("number of classes C (MLP 64-256-256-C, 1797 inputs)", "classes"),
    "n": ("data-set size n (MLP-A, random inputs, mini-batches of 256)", "n"),
}


def plot_sweep(points: list[dict], plot_dir: Path) -> dict[str, str]:
    """One PNG per axis (time and peak memory panels); returns axis → file path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for axis in SWEEP_AXES:
        pts = sorted((p for p in points if p.get("axis") == axis and "error" not in p),
                     key=lambda p: p[_AXES[axis][1]])
        if not pts:
            continue
        fig = _figure(plt, axis, pts)
        path = plot_dir / f"sweep-{axis}.png"
        try:
            save_figure(fig, path, dpi=110)
        finally:
            plt.close(fig)
        files[axis] = str(path)
    return files


def _figure(plt, axis: str, pts: list[dict]):
    """Time (left) and peak memory, live and with glibc's defaults (right), against ``axis``."""
    xs = [p[_AXES[axis][1]] for p in pts]
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_t.plot(xs, [p["seconds"] for p in pts], "o-", label="torchfim diag/exact")
    live = [(x, live_peak(p)) for x, p in zip(xs, pts) if live_peak(p) is not None]
    if live:
        ax_m.plot([x for x, _ in live], [m for _, m in live], "o-", color="C1",
                  label="peak above baseline, live memory (malloc: mmap ≥ 64 KiB, trim)")
    ax_m.plot(xs, [p["peak_mib"] for p in pts], "s--", color="C2", alpha=0.7, markersize=4,
              label="peak above baseline, glibc malloc defaults")
    if axis == "width":
        top = live[-1][1] if live else pts[-1]["peak_mib"]
        ref = top / xs[-1]
        ax_m.plot(xs, [ref * x for x in xs], "--", color="gray", label="∝ P (through the largest)")
        ax_m.plot(xs, [4 * x / 2**20 for x in xs], ":", color="gray", label="one float32 P-vector")
    for ax in (ax_t, ax_m):
        ax.set_xscale("log")
        ax.set_xlabel(_AXES[axis][0], fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if axis in ("width", "n", "classes"):
        ax_t.set_yscale("log")
    if axis == "width":
        ax_m.set_yscale("log")
    else:
        ax_m.set_ylim(bottom=0)
    ax_t.set_ylabel("seconds (median)")
    ax_m.set_ylabel("MiB")
    ax_m.legend(fontsize=7)
    fig.suptitle(f"torchfim.fisher(estimator='exact', structure='diag') vs {axis}", fontsize=10)
    fig.tight_layout()
    return fig
