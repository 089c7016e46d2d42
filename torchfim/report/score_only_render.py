"""The score-only report's text, terminal summary and figure, from its report.json dict alone
(:mod:`torchfim.report.score_only`)."""

from __future__ import annotations

from .._words import a_or_an, counted
from .figures import figure_width, png_bytes
from .format import family_text, fmt, md_table, pct, warning_lines
from .markdown import analysed, resumed_note
from .settings import ASKED_SCORE_ONLY, SCORE_ONLY_FIGURE
from .wording import option

__all__ = ["markdown_score_only", "summary_score_only", "draw_score_only"]

_C1, _CE = "#1f77b4", "#2ca02c"  # the score estimate, the empirical Fisher (as in the full report)


def _relative(entry: dict) -> float | None:
    se, est = entry["trace_score_stderr"], entry["trace_score_estimate"]
    return se / est if se is not None and est else None


def _unused_note(R: dict) -> str | None:
    """The options of the full report that were set but not used here (report.json's ``unused_options``)."""
    unused = R.get("unused_options") or {}
    if not unused:
        return None
    flags = " and ".join(option(key, value) for key, value in unused.items())
    return (f"options of the full report's Î1-vs-Î2 subset and spectra, not used here: {flags}"
            + (" (left out of the Re-create line)" if R.get("command") else ""))


def markdown_score_only(R: dict) -> str:
    """The text of ``report.md`` for a score-only report.json dict ``R``."""
    T, k = R["trace"], R["n_samples"]
    n, pct_error = R["data"]["n_inputs"], f"{100 * R['rel_error']:.0f}%"
    lines: list[str] = []
    add = lines.append
    add("# torchfim report (score only)")
    add("")
    add(f"**Why score only:** {R['mode_reason']}. This report gives what stays within reach: Tr(F) per layer "
        "by the score estimator Î1, with error bars from its own draws. The exact Fisher, the variances of "
        "Î1 and Î2 in closed form, their bounds and the spectra are left out.")
    add("")
    lines += analysed(R)
    add("")
    add("## Tr(F) per layer, with error bars")
    add("")
    add(f"**Tr(F) ≈ {fmt(T['trace_score_estimate'])} ± {fmt(T['trace_score_stderr'])}** (one standard error, "
        f"{pct(_relative(T))}), the mean over the {counted(n, 'input')} of `‖∇θ log p(y|x)‖²` for {k} labels drawn per "
        f"input (seed {R['seed'] + 1}; `torchfim.score_norms.squared_score_norms`). The standard error is that "
        "of the label draws about Tr(F) of these inputs, `√(v̄/n)` with v̄ the mean over inputs of the variance "
        f"of an input's {k} values divided by {k}; over many inputs of like size, about 95% of such draws fall "
        "within ± 2 of it (fewer, mostly above, where a few inputs' large norms dominate). Taking the "
        f"inputs as a sample of the data, the standard error of E_x Tr(F(x)) is "
        f"{fmt(T['trace_score_stderr_inputs'])} (input spread and label noise). Labels per input for "
        f"{a_or_an(pct_error)} relative standard error (one σ: s.e. ≤ {pct_error} of Tr(F)): "
        f"{fmt(T['samples_needed_score'])}.")
    if unseen := [entry for entry in (T, *R["layers"]) if entry.get("label_spread_unseen")]:
        which = "" if unseen[0] is T else " for " + ", ".join(f"`{entry['name']}`" for entry in unseen)
        add("")
        add(f"{'Each' if n > 1 else 'The'} input's {k} labels gave the same value{which}, so the spread of the labels, and with it the "
            "standard error, was not seen (–): a zero would claim an exact Tr(F). Draw more labels per input "
            f"({option('n_samples', metavar='K')}).")
    add("")
    add(f"![Tr(F) per layer by the score estimator]({SCORE_ONLY_FIGURE})")
    add("")
    add(_layer_table(R))
    add("")
    if T["trace_empirical"] is not None:
        add("The empirical Fisher uses the true labels instead of labels drawn from the model, so it estimates "
            f"a different matrix: its trace is {fmt(T['empirical_ratio'], 3)}× the score estimate over the "
            "whole model.")
        add("")
    tm = R["timings"]
    add("## Notes")
    add("")
    add(f"- Time: {fmt(tm.get('total'), 3)} s in all (score estimate {fmt(tm['trace'], 3)} s, empirical "
        f"{fmt(tm['empirical'], 3)} s, figure {fmt(tm.get('figures'), 3)} s){resumed_note(R)}.")
    add("- All values are means over inputs (not sums).")
    if unused := _unused_note(R):
        add(f"- The {unused}.")
    if R["mode_reason"].startswith(ASKED_SCORE_ONLY):
        add(f"- For the exact Fisher and the closed-form variances of Î1 and Î2, `{option('score_only', False)}` (or "
            "the default, which chooses the full report where it fits in memory).")
    else:
        add("- For the exact Fisher and the closed-form variances of Î1 and Î2, report on fewer output numbers "
            f"(shorter sequences, fewer classes) or with more memory; `{option('score_only', False)}` computes them "
            "whatever they take and refuses what does not fit in memory.")
    add("")
    return "\n".join(lines)


def _layer_table(R: dict) -> str:
    """One row per layer and the whole model: the estimate, its error, share, labels needed, empirical."""
    T, k = R["trace"], R["n_samples"]
    emp = T["trace_empirical"] is not None

    def row(name: str, shape: str, size: int, entry: dict, share: str) -> list[str]:
        cells = [name, shape, str(size), fmt(entry["trace_score_estimate"]), fmt(entry["trace_score_stderr"]),
                 pct(_relative(entry)), share, fmt(entry["samples_needed_score"])]
        return cells + ([fmt(entry["trace_empirical"]), fmt(entry["empirical_ratio"], 3)] if emp else [])

    rows = [row(f"`{layer['name']}`", str(tuple(layer["shape"])), layer["size"], layer, pct(layer["share_of_trace"]))
            for layer in R["layers"]]
    rows.append(row("**whole model**", "", R["model"]["n_parameters"], T, "100%"))
    header = ["layer", "shape", "size", f"Tr(F) Î1 (k={k})", "s.e.", "s.e./Tr", "share",
              f"k for {100 * R['rel_error']:.0f}% rel. s.e."] + (["Tr empirical", "empirical / Î1"] if emp else [])
    return md_table(header, rows, "lll" + "r" * (len(header) - 3))


def summary_score_only(R: dict) -> str:
    """The terminal summary of a score-only report: one row per layer plus the whole model."""
    T, D, k = R["trace"], R["data"], R["n_samples"]
    pct_error = f"{100 * R['rel_error']:.0f}%"
    header = ["layer", "size", "Tr(F) Î1", "s.e.", "share", f"k{pct_error}"]
    body = [[layer["name"], str(layer["size"]), fmt(layer["trace_score_estimate"]),
             fmt(layer["trace_score_stderr"], 2), pct(layer["share_of_trace"]), fmt(layer["samples_needed_score"])]
            for layer in R["layers"]]
    body.append(["whole model", str(R["model"]["n_parameters"]), fmt(T["trace_score_estimate"]),
                 fmt(T["trace_score_stderr"], 2), "100%", fmt(T["samples_needed_score"])])
    widths = [max(len(r[j]) for r in [header] + body) for j in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [(f"Fisher information report (score only): {counted(R['model']['n_parameters'], 'parameter')}, "
            f"{counted(D['n_inputs'], 'input')}, family {family_text(R)}"),
           line(header), rule, *[line(r) for r in body[:-1]], rule, line(body[-1]),
           (f"Tr(F) by the score estimator with {counted(k, 'label')} per input; s.e. from the spread of each input's labels; "
           f"k{pct_error} = labels per input for {a_or_an(pct_error)} relative standard error (one σ) of Tr(F)."),
           f"Score only: {R['mode_reason']}."]
    out += [f"Note: {note}." for note in (D.get("targets_note"), R.get("outputs", {}).get("note"), _unused_note(R))
            if note]
    out += warning_lines(R)
    if T["trace_empirical"] is not None:
        out.append(f"Empirical Fisher (true labels): Tr {fmt(T['trace_empirical'])}, "
                   f"{fmt(T['empirical_ratio'], 3)}× the estimate.")
    return "\n".join(out)


def _ax_trace(ax, R: dict) -> None:
    layers = R["layers"]
    x = list(range(len(layers)))
    est = [layer["trace_score_estimate"] or 0.0 for layer in layers]
    se = [layer["trace_score_stderr"] or 0.0 for layer in layers]
    use_log = all(v > 0 for v in est)
    low = [min(2 * s, e * (1 - 1e-3)) if use_log else 2 * s for e, s in zip(est, se)]
    ax.errorbar(x, est, yerr=[low, [2 * s for s in se]], fmt="o", color=_C1, ms=4, capsize=3,
                label=f"score estimate Î1 ({counted(R['n_samples'], 'label')}/input) ± 2 s.e.")
    if R["trace"]["trace_empirical"] is not None:
        ax.plot([i + 0.15 for i in x], [layer["trace_empirical"] for layer in layers], "x", color=_CE, ms=6,
                label="empirical Fisher (true labels)")
    if use_log:
        ax.set_yscale("log")
    names = [layer["name"] for layer in layers]
    ax.set_xticks(x, names, rotation=45 if len(names) > 3 else 0, ha="right" if len(names) > 3 else "center",
                  fontsize=8)
    ax.set_ylabel("Tr(F) (mean over inputs)")
    ax.set_title(f"Tr(F) per layer on {counted(R['data']['n_inputs'], 'input')} (score only): total "
                 f"{fmt(R['trace']['trace_score_estimate'])} ± {fmt(R['trace']['trace_score_stderr'], 2)}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="y", alpha=0.3)


def draw_score_only(R: dict) -> dict[str, bytes]:
    """File name -> PNG bytes of the score-only report's figure."""
    return {SCORE_ONLY_FIGURE: png_bytes(lambda fig: _ax_trace(fig.add_subplot(1, 1, 1), R),
                                         figure_width(len(R["layers"])))}
