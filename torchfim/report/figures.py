"""The report's PNG figures, drawn from the report.json dict alone.

Figures are drawn with matplotlib's object API (no pyplot, no global backend change) and returned
as PNG bytes by :func:`draw`, so that writing them is the publishing step's job.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

from .._words import counted
from .format import fmt

__all__ = ["draw", "png_bytes", "figure_width"]

_DPI = 100
_C1, _C2, _CE = "#1f77b4", "#d62728", "#2ca02c"  # Î1 (score), Î2 (hessian), empirical


def figure_width(n_columns: int) -> float:
    """Inches across a figure of ``n_columns`` bars or markers (6.5 to 16)."""
    return min(16.0, max(6.5, 2.5 + 0.5 * n_columns))


def _labels(R: dict) -> list[str]:
    return [layer["name"] for layer in R["layers"]]


#: Layers named in a legend; the others are drawn, in colours that run on along the layer order.
LEGEND_LAYERS = 12
#: Up to this many layers drawn, a per-layer legend sits in its panel where it covers least; more make it too tall for
#: any free corner (a review: 40 spectra under it), so it stands right of the panel.
LEGEND_INSIDE = 6
#: Above this many columns, a panel of the overview numbers them (the names would overlap at its width).
NAMED_COLUMNS = 16


def _columns(ax, names: list[str], compact: bool, first: int = 0) -> None:
    """The x ticks of a per-layer panel: the names, or in a crowded panel of the overview the layers' numbers in
    the tables' order, from 1 (``first``: the number of the first column, 0 for the whole model) in every panel
    (a CLI trial: 52 overlapping names, BERT's taking half the panel)."""
    x = list(range(len(names)))
    if compact and len(names) > NAMED_COLUMNS:
        shown = x[::max(1, len(x) // NAMED_COLUMNS)]
        ax.set_xticks(shown, [str(i + first) for i in shown], fontsize=8)
        whole = " (0: the whole model)" if first == 0 else ""
        ax.set_xlabel(f"layer number, in the order of report.md's tables{whole}", fontsize=8)
        return
    ax.set_xticks(x, names, rotation=45 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                  fontsize=8)


def _layer_colours(count: int) -> list:
    """A colour per layer, all distinct: matplotlib's ten-colour cycle repeated itself past ten layers."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](j) for j in range(count)]
    if count <= 20:
        return [colormaps["tab20"](j) for j in range(count)]
    return [colormaps["viridis"](j / (count - 1)) for j in range(count)]


def _legend_of_layers(ax, drawn: int, **options: object) -> None:
    """The legend of the ``drawn`` layers (those left out of the panel not counted), the first
    :data:`LEGEND_LAYERS` named: it says how many more are drawn than it names."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if drawn > LEGEND_LAYERS:  # after the named layers, before the rest (y = x)
        handles.insert(LEGEND_LAYERS, Line2D([], [], ls="none"))
        labels.insert(LEGEND_LAYERS, f"+ {drawn - LEGEND_LAYERS} more layers, colours in layer order")
    if drawn > LEGEND_INSIDE:
        options.update(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, ncol=1)
    ax.legend(handles, labels, **options)


def _positive_floor(values: list[float | None]) -> float:
    pos = [v for v in values if v is not None and v > 0]
    return (min(pos) / 10) if pos else 1e-12


def _ax_trace(ax, R: dict, compact: bool = False) -> None:
    names = _labels(R)
    x = list(range(len(names)))
    zero = [bool(layer.get("zero_to_precision")) for layer in R["layers"]]  # rounding: drawn as 0, not as data
    exact = [0.0 if z else layer["trace_exact"] or 0.0 for z, layer in zip(zero, R["layers"])]
    est = [math.nan if z else layer["trace_score_estimate"] for z, layer in zip(zero, R["layers"])]
    se = [0.0 if z else layer["trace_score_stderr"] or 0.0 for z, layer in zip(zero, R["layers"])]
    ax.bar(x, exact, color="#c7c7c7", edgecolor="#555555", label="Tr(F) of the layer, exact")
    use_log = any(v > 0 for v in exact) and all(v > 0 for v, z in zip(exact, zero) if not z)
    lo = [min(2 * s, e - max(e, 1e-30) * 1e-3) if use_log else 2 * s for e, s in zip(est, se)]
    ax.errorbar(x, est, yerr=[lo, [2 * s for s in se]], fmt="o", color=_C1, ms=4, capsize=3,
                label=f"score estimate Î1 ({counted(R['n_samples'], 'label')}/input) ± 2 s.e.")
    if use_log:
        ax.set_yscale("log")
    _columns(ax, names, compact, first=1)
    ax.set_ylabel("Tr(F) (mean over inputs)")
    ax.set_title(f"Tr(F) per layer on {counted(R['data']['n_inputs'], 'input')}: total {fmt(R['trace']['exact'])}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def _ax_variance(ax, R: dict, compact: bool = False) -> None:
    cols = [("whole model", R["trace"]["subset"])] + [
        (l["name"], {k: None if v is None else 0.0 for k, v in l["subset"].items()} if l.get("zero_to_precision")
         else l["subset"]) for l in R["layers"]]
    x = list(range(len(cols)))
    series = [
        ("var_score", "Var Tr Î1 (score), exact", _C1, "o", True),
        ("bound_score", "upper bound on Var Tr Î1", _C1, "v", False),
        ("var_hessian", "Var Tr Î2 (hessian), exact", _C2, "s", True),
        ("bound_hessian", "upper bound on Var Tr Î2", _C2, "^", False),
    ]
    floor = _positive_floor([sub[key] for _, sub in cols for key, *_ in series])
    for j, (key, label, color, marker, filled) in enumerate(series):
        dx = (-0.21, -0.07, 0.07, 0.21)[j]
        pts = [(xi + dx, sub[key] if sub[key] > 0 else floor) for xi, (_, sub) in zip(x, cols)
               if sub[key] is not None]
        if not pts:
            continue  # skipped (Î2 on a model too large for it)
        xs = [xi + dx for xi in x]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=30, label=label,
                   facecolors=color if filled else "none", edgecolors=color)
        for xi, (_, sub) in zip(xs, cols):
            if sub[key] is not None and sub[key] <= 0:
                ax.annotate("0", (xi, floor), textcoords="offset points", xytext=(0, -11),
                            ha="center", fontsize=7, color=color)
    ax.set_yscale("log")
    ax.axvline(0.5, color="#999999", lw=0.8, ls="--")
    _columns(ax, [c for c, _ in cols], compact)
    ax.set_ylabel("variance, 1 label per input")
    ax.set_title(f"Variance of the trace estimators on {counted(R['data']['variance_inputs'], 'input')} "
                 "(0 drawn at the floor)", fontsize=10)
    ax.legend(fontsize=7, loc="best", ncol=2)
    ax.grid(axis="y", alpha=0.3)


def _ax_samples(ax, R: dict, compact: bool = False) -> None:
    cols = [("whole model", R["trace"])] + [(l["name"], l) for l in R["layers"]]
    x = list(range(len(cols)))
    raw = [entry["samples_needed_unrounded"][key] for _, entry in cols for key in ("score", "hessian")]
    floor = min(0.5, _positive_floor(raw))
    for j, (key, label, color) in enumerate((("score", "Î1 (score)", _C1), ("hessian", "Î2 (hessian)", _C2))):
        ratios = [entry["samples_needed_unrounded"][key] for _, entry in cols]
        ks = [entry["samples_needed"][key] for _, entry in cols]
        xs = [xi + (-0.2 if j == 0 else 0.2) for xi in x]
        heights = [v if v is not None and v > 0 else floor for v in ratios]
        ax.bar(xs, [h - floor for h in heights], bottom=floor, width=0.4, color=color, alpha=0.8,
               label=label)
        if len(cols) <= 14:
            for xi, h, r, kk in zip(xs, heights, ratios, ks):
                text = "n/a" if kk is None else (f"0→{kk}" if not r else f"{kk}")
                ax.annotate(text, (xi, h), textcoords="offset points", xytext=(0, 2), ha="center",
                            fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls=":", label="1 label per input")
    ax.set_yscale("log")
    ax.axvline(0.5, color="#999999", lw=0.8, ls="--")
    _columns(ax, [c for c, _ in cols], compact)
    ax.set_ylabel(f"Var₁ / ({R['rel_error']}·Tr)²;  k = ⌈bar⌉ ≥ 1 printed")
    ax.set_title(f"Labels per input for {100 * R['rel_error']:.0f}% rel. s.e. (one σ) of Tr, "
                 f"on all {counted(R['data']['n_inputs'], 'input')}", fontsize=10)
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * (top / bottom) ** 0.25)  # a band above the bars and their labels for the legend
    ax.legend(fontsize=8, loc="upper center", ncol=3)
    ax.grid(axis="y", alpha=0.3)


def _ax_spectrum(ax, R: dict, compact: bool = False) -> None:
    spectra = R["spectra"]
    if not spectra:
        ax.text(0.5, 0.5, f"no layer has at most {counted(R['max_block'], 'parameter')}", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    top = max(max(eig) for eig in spectra.values() if eig)
    colours = _layer_colours(len(spectra))
    zero = {layer["name"] for layer in R.get("layers", []) if layer.get("zero_to_precision")}  # rounding, no spectrum
    drawn = 0
    for j, (name, eig) in enumerate(spectra.items()):
        size = len(eig)
        kept = [(i + 1, v) for i, v in enumerate(eig) if v > 1e-12 * top]
        if not kept or name in zero:
            continue
        ax.plot([i for i, _ in kept], [v for _, v in kept], lw=1.2, color=colours[j],
                label=f"{name} ({size})" if drawn < LEGEND_LAYERS else None)
        drawn += 1
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Eigenvalues of the per-layer exact Fisher blocks", fontsize=10)
    _legend_of_layers(ax, drawn, fontsize=7, loc="best", ncol=2)
    ax.grid(alpha=0.3)


def _ax_empirical(ax, R: dict, compact: bool = False) -> None:
    emp = R["empirical"]
    lo, hi = math.inf, 0.0
    colours = _layer_colours(len(emp["points"]))
    zero = {layer["name"] for layer in R["layers"] if layer.get("zero_to_precision")}
    drawn = 0
    for j, (name, pts) in enumerate(emp["points"].items()):
        xy = [(a, b) for a, b in zip(pts["exact"], pts["empirical"]) if a > 0 and b > 0 and name not in zero]
        if not xy:
            continue
        lo = min(lo, min(min(p) for p in xy))
        hi = max(hi, max(max(p) for p in xy))
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=4, alpha=0.5, color=colours[j],
                   label=name if drawn < LEGEND_LAYERS else None)
        drawn += 1
    if math.isfinite(lo) and hi > 0:
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("diagonal of F, exact (model's own labels)")
    ax.set_ylabel("diagonal of the empirical Fisher (true labels)")
    ax.set_title(f"Empirical vs true Fisher: Tr ratio {fmt(emp['trace_ratio'], 3)}, "
                 f"cosine {fmt(emp['cosine_diag'], 3)}", fontsize=10)
    _legend_of_layers(ax, drawn, fontsize=7, loc="best", markerscale=3, ncol=2)
    ax.grid(alpha=0.3)


def png_bytes(draw: Callable, width: float, height: float = 4.6) -> bytes:
    """The PNG of a figure of ``width × height`` inches that ``draw(figure)`` fills."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def draw(R: dict) -> dict[str, bytes]:
    """File name -> PNG bytes for every figure of the report (``R``: the report.json dict)."""
    L = len(R["layers"])
    legend = 3.0 if L > LEGEND_INSIDE else 0.0  # inches for a legend right of the panel
    single = {
        "trace_per_layer.png": (_ax_trace, figure_width(L)),
        "variance_per_layer.png": (_ax_variance, figure_width(L + 1)),
        "samples_needed.png": (_ax_samples, figure_width(L + 1)),
        "spectrum.png": (_ax_spectrum, 6.5 + legend),
    }
    if R["empirical"] is not None:
        single["empirical_vs_true.png"] = (_ax_empirical, 6.5 + legend)
    out = {name: png_bytes(lambda fig, f=f: f(fig.add_subplot(1, 1, 1), R), w) for name, (f, w) in single.items()}
    fourth = _ax_empirical if R["empirical"] is not None else _ax_spectrum
    panels = (_ax_trace, _ax_variance, _ax_samples, fourth)

    def overview(fig) -> None:
        for i, f in enumerate(panels):
            f(fig.add_subplot(2, 2, i + 1), R, compact=True)

    out["overview.png"] = png_bytes(overview, 2 * min(8.0, figure_width(L + 1)), 9.2)
    return out
