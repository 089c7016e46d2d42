"""The terminal summary of a report: one row per layer and the whole model, then the headlines."""

from __future__ import annotations

from .._words import a_or_an, counted
from .format import family_text, fmt, warning_lines

__all__ = ["summary_table"]


def summary_table(R: dict) -> str:
    """The terminal summary: one row per layer plus the whole model, then the headline numbers. Each column
    names the inputs it is over (``n=``: all of them; ``m=``: the variance subset), ``*`` marks what is
    extrapolated from the subset, and the footnote says each."""
    D = R["data"]
    n, m = D["n_inputs"], D["variance_inputs"]
    star, k = ("*" if m < n else ""), f"k{100 * R['rel_error']:.0f}%"
    header = ["layer", "size", f"Tr(F) n={n}", f"s.e. Î1 n={n}", f"Var Î1 m={m}", f"Var Î2 m={m}", "lower Var Tr",
              f"{k} Î1 n={n}", f"{k} Î2{star} n={n}", "λ_max"]
    body = []
    for l in R["layers"]:
        s = l["subset"]
        body.append([l["name"], str(l["size"]), fmt(l["trace_exact"]), fmt(l["trace_score_stderr"], 2),
                     fmt(s["var_score"], 3), fmt(s["var_hessian"], 3),
                     "–" if l.get("zero_to_precision") else s["better_for_trace"] or "–",  # no Fisher: no winner
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
    out = [
        (f"Fisher information report: {counted(R['model']['n_parameters'], 'parameter')}, "
         f"{counted(D['n_inputs'], 'input')}, "
         f"family {family_text(R)}"),
        line(header), rule, *[line(r) for r in body[:-1]], rule, line(body[-1]),
        *_footnote(R, n, m),
    ]
    O = R.get("outputs", {})
    if O.get("positions"):
        out.append(f"Outputs with {'×'.join(map(str, O['positions']))} positions per input"
                   + (f" ({O['observed_positions_per_input']:.4g} observed on average, mask {O['mask']})"
                      if O["mask"] else "")
                   + ": sums over positions, one label per position.")
    for note in (D.get("targets_note"), D.get("variance_inputs_note"), O.get("note")):
        if note:
            out.append(f"Note: {note}.")
    out += warning_lines(R)
    if R["empirical"] is not None:
        E = R["empirical"]
        out.append(f"Empirical Fisher (true labels): Tr ratio {fmt(E['trace_ratio'], 3)}, cosine of "
                   f"diagonals {fmt(E['cosine_diag'], 3)}.")
    return "\n".join(out)


def _footnote(R: dict, n: int, m: int) -> list[str]:
    """What each column of the table is, and over which inputs."""
    subset = "all the inputs" if m == n else f"a random subset of m={m} of the n={n} inputs (seed {R['seed']})"
    columns = (f"Tr(F) exact, and s.e. Î1 = standard error of the score estimate with {counted(R['n_samples'], 'label')}"
               f"/input, over all n={counted(n, 'input')}; Var Î1/Î2 = variance of the trace estimators with one label "
               f"per input on {subset} "
               + ("(s.e.² = Var/k with k labels per input)" if m == n else
                  "(≈ n/m times that on all n: s.e.² ≈ Var·m/(n·k))")
               + "; lower Var Tr = the "
               "estimator with the lower variance of the trace (not of the diagonal: see report.md).")
    pct = f"{100 * R['rel_error']:.0f}%"
    labels = (f"k{pct} = labels per input for {a_or_an(pct)} relative standard error (one σ: s.e. ≤ {pct} of the "
              f"value) of the trace on all n={counted(n, 'input')}"
              + ("; *Î2's extrapolated from the subset, (m/n)·Var Î2 (Î1's exact on all inputs)." if m < n else "."))
    return [columns, labels]
