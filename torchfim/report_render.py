"""Rendering a ``torchfim report``: the PNG figures, ``report.md`` and the terminal summary.

Everything here reads the JSON-ready dict of :func:`torchfim.report.compute_report` (plus the keys
:func:`torchfim.report.run_report` adds), so a figure never shows a number that ``report.json``
lacks. Figures are drawn with matplotlib's object API (no pyplot, no global backend change) and
returned as PNG bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

__all__ = ["figures", "markdown", "summary_table", "fmt"]

_DPI = 100
_C1, _C2, _CE = "#1f77b4", "#d62728", "#2ca02c"  # Î1 (score), Î2 (hessian), empirical


def fmt(x: object, digits: int = 4) -> str:
    """A number with ``digits`` significant digits; ``–`` for None."""
    if x is None:
        return "–"
    if isinstance(x, bool):
        return str(x)
    if isinstance(x, int):
        return str(x)
    v = float(x)  # type: ignore[arg-type]
    if v == 0:
        return "0"
    return f"{v:.{digits}g}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


# ------------------------------------------------------------------------------------- figures
def _width(n_columns: int) -> float:
    return min(16.0, max(6.5, 2.5 + 0.5 * n_columns))


def _labels(R: dict) -> list[str]:
    return [layer["name"] for layer in R["layers"]]


def _positive_floor(values: list[float | None]) -> float:
    pos = [v for v in values if v is not None and v > 0]
    return (min(pos) / 10) if pos else 1e-12


def _ax_trace(ax, R: dict) -> None:
    names = _labels(R)
    x = list(range(len(names)))
    exact = [layer["trace_exact"] or 0.0 for layer in R["layers"]]
    est = [layer["trace_score_estimate"] for layer in R["layers"]]
    se = [layer["trace_score_stderr"] or 0.0 for layer in R["layers"]]
    ax.bar(x, exact, color="#c7c7c7", edgecolor="#555555", label="Tr(F) of the layer, exact")
    use_log = all(v > 0 for v in exact)
    lo = [min(2 * s, e - max(e, 1e-30) * 1e-3) if use_log else 2 * s for e, s in zip(est, se)]
    ax.errorbar(x, est, yerr=[lo, [2 * s for s in se]], fmt="o", color=_C1, ms=4, capsize=3,
                label=f"score estimate Î1 ({R['n_samples']} label/input) ± 2 s.e.")
    if use_log:
        ax.set_yscale("log")
    ax.set_xticks(x, names, rotation=45 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                  fontsize=8)
    ax.set_ylabel("Tr(F) (mean over inputs)")
    ax.set_title(f"Tr(F) per layer on {R['data']['n_inputs']} inputs: total {fmt(R['trace']['exact'])}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def _ax_variance(ax, R: dict) -> None:
    cols = [("whole model", R["trace"]["subset"])] + [(l["name"], l["subset"]) for l in R["layers"]]
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
    ax.set_xticks(x, [c for c, _ in cols], rotation=45 if len(cols) > 4 else 0,
                  ha="right" if len(cols) > 4 else "center", fontsize=8)
    ax.set_ylabel("variance, 1 label per input")
    ax.set_title(f"Variance of the trace estimators on {R['data']['variance_inputs']} inputs "
                 "(0 drawn at the floor)", fontsize=10)
    ax.legend(fontsize=7, loc="best", ncol=2)
    ax.grid(axis="y", alpha=0.3)


def _ax_samples(ax, R: dict) -> None:
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
    ax.set_xticks(x, [c for c, _ in cols], rotation=45 if len(cols) > 4 else 0,
                  ha="right" if len(cols) > 4 else "center", fontsize=8)
    ax.set_ylabel(f"Var₁ / ({R['rel_error']}·Tr)²;  k = ⌈bar⌉ ≥ 1 printed")
    ax.set_title(f"Labels per input for {100 * R['rel_error']:.0f}% relative error of Tr, "
                 f"on all {R['data']['n_inputs']} inputs", fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def _ax_spectrum(ax, R: dict) -> None:
    spectra = R["spectra"]
    if not spectra:
        ax.text(0.5, 0.5, f"no layer has at most {R['max_block']} parameters", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    top = max(max(eig) for eig in spectra.values() if eig)
    for j, (name, eig) in enumerate(spectra.items()):
        size = len(eig)
        kept = [(i + 1, v) for i, v in enumerate(eig) if v > 1e-12 * top]
        if not kept:
            continue
        ax.plot([i for i, _ in kept], [v for _, v in kept], lw=1.2,
                label=f"{name} ({size})" if j < 12 else None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("eigenvalue rank")
    ax.set_ylabel("eigenvalue")
    ax.set_title("Eigenvalues of the per-layer exact Fisher blocks", fontsize=10)
    ax.legend(fontsize=7, loc="best", ncol=2)
    ax.grid(alpha=0.3)


def _ax_empirical(ax, R: dict) -> None:
    emp = R["empirical"]
    lo, hi = math.inf, 0.0
    for j, (name, pts) in enumerate(emp["points"].items()):
        xy = [(a, b) for a, b in zip(pts["exact"], pts["empirical"]) if a > 0 and b > 0]
        if not xy:
            continue
        lo = min(lo, min(min(p) for p in xy))
        hi = max(hi, max(max(p) for p in xy))
        ax.scatter([p[0] for p in xy], [p[1] for p in xy], s=4, alpha=0.5,
                   label=name if j < 12 else None)
    if math.isfinite(lo) and hi > 0:
        ax.plot([lo, hi], [lo, hi], color="k", lw=0.8, ls="--", label="y = x")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("diagonal of F, exact (model's own labels)")
    ax.set_ylabel("diagonal of the empirical Fisher (true labels)")
    ax.set_title(f"Empirical vs true Fisher: Tr ratio {fmt(emp['trace_ratio'], 3)}, "
                 f"cosine {fmt(emp['cosine_diag'], 3)}", fontsize=10)
    ax.legend(fontsize=7, loc="best", markerscale=3, ncol=2)
    ax.grid(alpha=0.3)


def _png(draw: Callable, width: float, height: float = 4.6) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI)
    FigureCanvasAgg(fig)
    draw(fig)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def figures(R: dict) -> dict[str, bytes]:
    """File name -> PNG bytes for every figure of the report."""
    L = len(R["layers"])
    single = {
        "trace_per_layer.png": (_ax_trace, _width(L)),
        "variance_per_layer.png": (_ax_variance, _width(L + 1)),
        "samples_needed.png": (_ax_samples, _width(L + 1)),
        "spectrum.png": (_ax_spectrum, 6.5),
    }
    if R["empirical"] is not None:
        single["empirical_vs_true.png"] = (_ax_empirical, 6.5)
    out = {name: _png(lambda fig, f=f: f(fig.add_subplot(1, 1, 1), R), w) for name, (f, w) in single.items()}
    fourth = _ax_empirical if R["empirical"] is not None else _ax_spectrum
    panels = (_ax_trace, _ax_variance, _ax_samples, fourth)

    def overview(fig) -> None:
        for i, f in enumerate(panels):
            f(fig.add_subplot(2, 2, i + 1), R)

    out["overview.png"] = _png(overview, 2 * min(8.0, _width(L + 1)), 9.2)
    return out


# ------------------------------------------------------------------------------------ markdown
def _table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(R: dict, figure_files: dict[str, bytes]) -> str:
    """The text of ``report.md``: every figure embedded, with its numbers and how they were got."""
    T, D, M = R["trace"], R["data"], R["model"]
    n, m, k = D["n_inputs"], D["variance_inputs"], R["n_samples"]
    subset_text = "all" if m == n else f"a random subset of {m} (seed {D['variance_subset_seed']})"
    sub = T["subset"]
    lines: list[str] = []
    add = lines.append
    add("# torchfim report")
    add("")
    add(f"- **Model:** {M.get('source') or M['class']}; {M['n_parameters']} trainable parameters in "
        f"{M['n_layers']} parameter tensors (\"layers\" below), {M['dtype']}, evaluated in eval mode.")
    add(f"- **Data:** {D['source']}: {n} inputs of shape {tuple(D['input_shape'])}, "
        + ("with targets." if D["has_targets"] else "without targets (so no empirical Fisher).")
        + (f" Note: {D['targets_note']}." if D.get("targets_note") else "")
        + (f" Note: {D['variance_inputs_note']}." if D.get("variance_inputs_note") else ""))
    add(f"- **Output family:** `{R['family']}`; labels are drawn from the model (the Fisher under the "
        "model's own predictive distribution).")
    if R.get("command"):
        add(f"- **Re-create:** `{R['command']}` (torchfim {R['torchfim_version']}, torch {R['torch_version']}).")
    add("")
    add("## Summary")
    add("")
    rel = T["trace_score_stderr"] / T["exact"] if T["trace_score_stderr"] and T["exact"] else None
    add(f"- **Tr(F) = {fmt(T['exact'])}** (exact, mean over all {n} inputs). One score-estimator draw "
        f"with {k} label(s) per input gave {fmt(T['trace_score_estimate'])}, standard error "
        f"{fmt(T['trace_score_stderr'])} ({_pct(rel)} of Tr(F)).")
    if sub["var_hessian"] is None:
        add(f"- **Î1 vs Î2 for the trace** (on {subset_text} inputs, one label each): Var Tr Î1 = "
            f"{fmt(sub['var_score'])}; {D['variance_inputs_note']}.")
    else:
        add(f"- **Î1 vs Î2 for the trace** (on {subset_text} inputs, one label each): Var Tr Î1 = "
            f"{fmt(sub['var_score'])}, Var Tr Î2 = {fmt(sub['var_hessian'])}: the "
            f"**{sub['better_for_trace']}** estimator has the smaller variance for the whole trace. "
            + _per_layer_winner(R))
    add(f"- **Labels per input for {100 * R['rel_error']:.0f}% relative error** of Tr(F) on all {n} "
        f"inputs: k = {fmt(T['samples_needed']['score'])} with Î1, k = {fmt(T['samples_needed']['hessian'])} "
        "with Î2.")
    if R["empirical"] is not None:
        E = R["empirical"]
        add(f"- **Empirical Fisher** (true labels): its trace is {fmt(E['trace_ratio'], 3)}× the true "
            f"Tr(F) ({fmt(E['trace'])} vs {fmt(E['trace_exact'])}); cosine similarity of the "
            f"diagonals {fmt(E['cosine_diag'], 3)}.")
    add("")
    add("![overview: Tr(F) per layer, estimator variances, labels needed, and "
        + ("empirical vs true Fisher" if R["empirical"] is not None else "spectra") + "](overview.png)")
    add("")

    # 1. trace per layer
    add("## 1. Tr(F) per layer, with error bars")
    add("")
    add(f"Grey bars: the exact trace of each layer's diagonal block of F, `(1/n) Σᵢ tr(Jᵢᵀ Λᵢ Jᵢ)` "
        f"restricted to that parameter tensor, on all {n} inputs (`torchfim.fisher(..., structure=\"diag\")` "
        f"summed per layer; the whole-model value is `torchfim.fisher(..., structure=\"trace\")`). "
        f"Blue points: one draw of the unbiased score estimator Î1 with {k} label(s) per input "
        f"(seed {R['seed'] + 1}), with ± 2 standard errors. The standard error is exact, not "
        f"bootstrapped: √(Var₁/k), with Var₁ from `torchfim.fisher_variance(..., estimator=\"score\", "
        f"structure=\"trace\")` on all inputs and the model with only that layer trainable. About 95% "
        "of such draws fall within the bars.")
    add("")
    add("![Tr(F) per layer](trace_per_layer.png)")
    add("")
    rows = []
    for layer in R["layers"]:
        se = layer["trace_score_stderr"]
        rows.append([f"`{layer['name']}`", str(tuple(layer["shape"])), str(layer["size"]),
                     fmt(layer["trace_exact"]), _pct(layer["share_of_trace"]),
                     fmt(layer["trace_score_estimate"]), fmt(se),
                     _pct(se / layer["trace_exact"] if se is not None and layer["trace_exact"] else None),
                     fmt(layer["trace_hessian_stderr"])])
    rows.append(["**whole model**", "", str(M["n_parameters"]), fmt(T["exact"]), "100%",
                 fmt(T["trace_score_estimate"]), fmt(T["trace_score_stderr"]),
                 _pct(rel), fmt(T["trace_hessian_stderr"])])
    add(_table(["layer", "shape", "size", "Tr(F)", "share", f"Î1 draw (k={k})", "s.e. Î1",
                "s.e./Tr", "s.e. Î2*"], rows, "lllrrrrrr"))
    add("")
    add(f"\\* The Î2 standard error on all {n} inputs is extrapolated from {subset_text} inputs as "
        f"√((m/n)·Var₁(subset)/k), m = {m}: the variance is a mean of per-input terms over n², so a "
        "random subset's mean per-input term estimates the full one without bias."
        if m < n else "\\* Exact (the subset is the whole data set).")
    add("")

    # 2. variances
    add("## 2. Variance of Î1 vs Î2 per layer, and the bounds")
    add("")
    add(f"The variance, with one label per input (divide by k for k labels), of each layer's trace "
        f"estimator, on {subset_text} inputs, treated as the data set (the Hessian estimator needs one "
        f"forward-over-forward pass per parameter and input, hence the subset). Each number is exact "
        f"(Soen & Sun 2021, DESIGN.md §4): `torchfim.fisher_variance(model, subset, "
        f"estimator=..., structure=\"trace\")` on the model with every other parameter frozen "
        f"(`requires_grad=False`), which is exactly the variance of that layer's trace estimate, "
        f"covariances between its entries included. Hollow markers: the upper bounds of "
        f"`torchfim.variance_bound` (Î1: the smaller of the spectral bound, through λ_max of the "
        f"fourth moment of the output score, and the kurtosis bound, through E‖u‖⁴; Î2: the spectral "
        f"bound through λ_max(Λ)). The whole-model column is the variance of Tr Î itself, which is "
        f"not the sum of the layers' (covariances between layers). Î2 has zero variance wherever "
        f"∇²_θ o vanishes, e.g. the last linear layer's weights and biases: a zero is drawn at the "
        f"bottom of the plot and marked 0.")
    add("")
    if D.get("variance_inputs_note"):
        add("")
        add(f"Note: {D['variance_inputs_note']}.")
    add("")
    add("![variance per layer](variance_per_layer.png)")
    add("")
    rows = []
    for name, s in [("**whole model**", sub)] + [(f"`{l['name']}`", l["subset"]) for l in R["layers"]]:
        rows.append([name, fmt(s["trace_exact"]), fmt(s["var_score"]), fmt(s["bound_score"]),
                     fmt(s["bound_ratio_score"], 3), fmt(s["var_hessian"]), fmt(s["bound_hessian"]),
                     fmt(s["bound_ratio_hessian"], 3), s["better_for_trace"] or "–",
                     fmt(s["diag_var_sum_score"]), fmt(s["diag_var_sum_hessian"]),
                     s["better_for_diagonal"] or "–"])
    add(_table(["layer", "Tr(F) on subset", "Var Tr Î1", "bound", "bound/Var", "Var Tr Î2", "bound",
                "bound/Var", "better (trace)", "Σ Var diag Î1", "Σ Var diag Î2", "better (diagonal)"],
               rows, "lrrrrrrrlrrl"))
    add("")
    add("The last three columns compare the estimators for the diagonal instead of the trace: the sum "
        "over the layer of each diagonal entry's variance (the expected squared error of the diagonal "
        "estimate, as `torchfim.compare_estimators` reports it).")
    add("")

    # 3. samples needed
    add(f"## 3. Labels per input for {100 * R['rel_error']:.0f}% relative error")
    add("")
    add(f"For each layer, the number of labels per input k such that the standard error of the "
        f"layer's trace estimate on all {n} inputs is at most {100 * R['rel_error']:.0f}% of the exact "
        f"value: k = ⌈Var₁ / ({R['rel_error']}·Tr_layer)²⌉ (at least 1), the per-layer version of "
        f"`torchfim.samples_needed`. Var₁ is the one-label variance of the layer's trace estimator on "
        f"all inputs: exact for Î1; for Î2 extrapolated from the subset, (m/n)·Var₁(subset) with "
        f"m = {m}. The whole-model Î1 column equals `torchfim.samples_needed(model, inputs, "
        f"estimator=\"score\")`. The bars show Var₁/({R['rel_error']}·Tr)² before rounding up: "
        f"below the dotted line at 1, one label per input already gives better than "
        f"{100 * R['rel_error']:.0f}%; a bar at 10 means 10 labels per input (or 10× the inputs) are "
        f"needed. Where Î2's variance is 0 (printed 0→1), one label gives the exact value.")
    add("")
    add("![labels per input needed](samples_needed.png)")
    add("")
    rows = []
    for name, e in [("**whole model**", T)] + [(f"`{l['name']}`", l) for l in R["layers"]]:
        rows.append([name, fmt(e.get("trace_exact", T["exact"])), fmt(e["var1_score_all_inputs"]),
                     fmt(e["samples_needed_unrounded"]["score"], 3), fmt(e["samples_needed"]["score"]),
                     fmt(e["var1_hessian_all_inputs_extrapolated"]),
                     fmt(e["samples_needed_unrounded"]["hessian"], 3), fmt(e["samples_needed"]["hessian"])])
    q = f"Var₁/({R['rel_error']}·Tr)²"
    add(_table(["layer", "Tr(F)", "Var₁ Tr Î1", q, "k (Î1)", "Var₁ Tr Î2 (extrap.)", q, "k (Î2)"], rows))
    add("")

    # 4. spectra
    add("## 4. Eigenvalues of the per-layer exact blocks")
    add("")
    skipped = [l["name"] for l in R["layers"] if l["spectrum"] is None]
    add(f"The eigenvalues of each layer's diagonal block of the exact F on all {n} inputs "
        f"(`torchfim.fisher(..., structure=\"full\")` on the model with only that layer trainable, the "
        f"same block as `structure=\"layers\"` gives; `torch.linalg.eigvalsh` in float64), sorted "
        f"from the largest; eigenvalues below 10⁻¹² of the largest are not drawn. Computed for layers "
        f"of at most {R['max_block']} parameters"
        + (f"; skipped (too large): {', '.join(f'`{s}`' for s in skipped)}." if skipped else " (all layers).")
        + f" The blocks are computed in the model's dtype ({M['dtype']}), so eigenvalues far below "
        "λ_max (and the slightly negative ones) are at the level of rounding error. "
        "The numerical rank counts eigenvalues above 10⁻⁶·λ_max; the condition number is "
        "λ_max over the smallest eigenvalue counted in that rank. The full spectra are in report.json "
        "under `spectra`.")
    add("")
    add("![eigenvalue spectra](spectrum.png)")
    add("")
    rows = []
    for layer in R["layers"]:
        s = layer["spectrum"]
        if s is None:
            rows.append([f"`{layer['name']}`", str(layer["size"]), "skipped", "", "", "", "", ""])
            continue
        rows.append([f"`{layer['name']}`", str(layer["size"]), fmt(s["max"]), fmt(s["min"]), fmt(s["sum"]),
                     str(s["rank_1e-6"]), _pct(s["top10_share"]), fmt(s["condition_of_nonzero"], 3)])
    add(_table(["layer", "size", "λ_max", "λ_min", "Σλ = Tr", "rank (>10⁻⁶λ_max)", "top-10 share",
                "condition"], rows))
    add("")

    # 5. empirical
    add("## 5. Empirical vs true Fisher")
    add("")
    if R["empirical"] is None:
        add("Not computed: " + (D.get("targets_note") or "the data has no targets") + ". The empirical "
            "Fisher replaces the labels drawn from the model by the true ones; give data with targets "
            "((inputs, targets) or a Dataset yielding (x, y)) to see how far off it is.")
    else:
        E = R["empirical"]
        add(f"The empirical Fisher `(1/n) Σᵢ ∇log p(yᵢ|xᵢ) ∇log p(yᵢ|xᵢ)ᵀ` uses the true labels yᵢ "
            f"instead of labels drawn from the model, so it is biased (it estimates a different "
            f"matrix). Each point is one parameter's diagonal entry (at most 4000 per layer drawn, all of "
            f"them in report.json under `empirical.points`); on "
            f"the dashed line the two agree. Over the whole model the empirical trace is "
            f"{fmt(E['trace_ratio'], 3)}× the true one and the cosine similarity of the diagonals is "
            f"{fmt(E['cosine_diag'], 3)}. When a model fits its training labels well, the true label "
            "is mostly its most probable one, whose score is small, so the empirical Fisher tends to "
            "underestimate F; the diagonal's direction (cosine) can still agree closely.")
        add("")
        add("![empirical vs true Fisher](empirical_vs_true.png)")
        add("")
        rows = [["**whole model**", fmt(E["trace_exact"]), fmt(E["trace"]), fmt(E["trace_ratio"], 3),
                 fmt(E["cosine_diag"], 3)]]
        rows += [[f"`{l['name']}`", fmt(l["trace_exact"]), fmt(l["trace"]), fmt(l["trace_ratio"], 3),
                  fmt(l["cosine_diag"], 3)] for l in E["layers"]]
        add(_table(["layer", "Tr(F) true", "Tr empirical", "ratio", "cosine (diag)"], rows))
    add("")

    # notes
    add("## Notes")
    add("")
    tm = R["timings"]
    add(f"- Time: {fmt(tm.get('total'), 3)} s in all (loading and training {fmt(tm.get('setup'), 3)} s, "
        f"Tr(F) and Î1 error bars {fmt(tm['trace'], 3)} s, "
        f"Î1/Î2 variances {fmt(tm['variance'], 3)} s, spectra {fmt(tm['spectrum'], 3)} s, empirical "
        f"{fmt(tm['empirical'], 3)} s, figures {fmt(tm.get('figures'), 3)} s).")
    add("- All values are means over inputs (not sums) and conditional on these inputs: the variances "
        "are over the labels drawn from the model, not over resampling the data.")
    add(f"- The variance subset: {subset_text} of the {n} inputs; their indices are in report.json "
        "(`data.variance_subset_indices`).")
    add("- `model.pt` holds the model's state dict, so the numbers can be checked with the library: "
        "`torchfim.fisher(model, inputs, structure=\"trace\")` gives `trace.exact` of report.json.")
    add("")
    return "\n".join(lines)


def _per_layer_winner(R: dict) -> str:
    layers = R["layers"]
    h = [l["name"] for l in layers if l["subset"]["better_for_trace"] == "hessian"]
    zero = [l["name"] for l in layers if l["subset"]["var_hessian"] == 0]
    text = f"Per layer, Î2 wins on {len(h)} of {len(layers)}"
    if zero:
        text += f" (with exactly zero variance on {', '.join(f'`{z}`' for z in zero)})"
    return text + "."


# ------------------------------------------------------------------------------ terminal table
def summary_table(R: dict) -> str:
    """The terminal summary: one row per layer plus the whole model, then the headline numbers."""
    header = ["layer", "size", "Tr(F)", "s.e. Î1", "Var Î1", "Var Î2", "better", "k10% Î1",
              "k10% Î2", "λ_max"]
    body = []
    for l in R["layers"]:
        s = l["subset"]
        body.append([l["name"], str(l["size"]), fmt(l["trace_exact"]), fmt(l["trace_score_stderr"], 2),
                     fmt(s["var_score"], 3), fmt(s["var_hessian"], 3), s["better_for_trace"] or "–",
                     fmt(l["samples_needed"]["score"]), fmt(l["samples_needed"]["hessian"]),
                     fmt(l["spectrum"]["max"], 3) if l["spectrum"] else "–"])
    T = R["trace"]
    body.append(["whole model", str(R["model"]["n_parameters"]), fmt(T["exact"]),
                 fmt(T["trace_score_stderr"], 2), fmt(T["subset"]["var_score"], 3),
                 fmt(T["subset"]["var_hessian"], 3), T["subset"]["better_for_trace"] or "–",
                 fmt(T["samples_needed"]["score"]), fmt(T["samples_needed"]["hessian"]), ""])
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    D = R["data"]
    out = [
        f"Fisher information report: {R['model']['n_parameters']} parameters, {D['n_inputs']} inputs, "
        f"family {R['family']}",
        line(header), rule, *[line(r) for r in body[:-1]], rule, line(body[-1]),
        f"Tr(F) exact on all {D['n_inputs']} inputs; s.e. Î1 = standard error of the score estimate with "
        f"{R['n_samples']} label(s)/input; Var Î1/Î2 = variance of the trace estimators with one label "
        f"on {D['variance_inputs']} inputs; k10% = labels per input for 10% relative error.",
    ]
    for note in (D.get("targets_note"), D.get("variance_inputs_note")):
        if note:
            out.append(f"Note: {note}.")
    if R["empirical"] is not None:
        E = R["empirical"]
        out.append(f"Empirical Fisher (true labels): Tr ratio {fmt(E['trace_ratio'], 3)}, cosine of "
                   f"diagonals {fmt(E['cosine_diag'], 3)}.")
    return "\n".join(out)
