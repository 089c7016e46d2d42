"""The text of ``report.md``: every figure embedded, with its numbers and how they were got.

It reads only the report.json dict, section by section.
"""

from __future__ import annotations

from .._words import a_or_an, counted
from .format import family_text, fmt, md_table, pct, warning_lines
from .rounding import CHECK_INPUTS
from .wording import option

__all__ = ["markdown", "analysed", "positions_text", "resumed_note"]


def markdown(R: dict) -> str:
    """The text of ``report.md`` for the report.json dict ``R``."""
    lines: list[str] = []
    for section in (_head, _section_trace, _section_variance, _section_samples, _section_spectra,
                    _section_empirical, _section_notes):
        lines += section(R)
    return "\n".join(lines)


def _subset_text(D: dict) -> str:
    """The inputs of the variance section: ``all inputs``, or ``a random subset of 1 input (seed 0)``."""
    m, n = D["variance_inputs"], D["n_inputs"]
    return "all inputs" if m == n else f"a random subset of {counted(m, 'input')} (seed {D['variance_subset_seed']})"


def _like_for_like(T: dict, D: dict) -> str:
    """Where Î2's labels come from a subset: Î1's from the same subset (the comparison of like with like), and a
    warning where the subset puts Î1's variance far from its exact value on all inputs (a CLI trial: a subset of 20
    of 64 heavy-tailed inputs put it at 0.18×, and Î2's extrapolated k ranked the estimators the wrong way)."""
    m, n, ratio = D["variance_inputs"], D["n_inputs"], T.get("subset_extrapolation_ratio")
    if m >= n or T["samples_needed"]["hessian"] is None or T.get("samples_needed_score_from_subset") is None:
        return ""
    text = (f" Î2's is extrapolated from the {m}-input subset; Î1's extrapolated the same way is "
            f"k = {fmt(T['samples_needed_score_from_subset'])}, the like-for-like comparison.")
    if ratio is not None and not 0.5 <= ratio <= 2.0:
        text += (f" The subset is not representative here: it puts Î1's variance at {fmt(ratio, 2)}× its exact "
                 f"value on all inputs, so take Î2's k as rough (a larger {option('variance_inputs')} narrows it).")
    return text


def _relative_stderr(T: dict) -> float | None:
    return T["trace_score_stderr"] / T["exact"] if T["trace_score_stderr"] and T["exact"] else None


def _per_layer_winner(R: dict) -> str:
    """Î2's wins over the layers with a Fisher (one zero to precision has nothing to estimate: left out, named)."""
    layers = [l for l in R["layers"] if not l.get("zero_to_precision")]
    h = [l["name"] for l in layers if l["subset"]["better_for_trace"] == "hessian"]
    zero = [l["name"] for l in layers if l["subset"]["var_hessian"] == 0]
    text = f"Per layer, Î2 wins on {len(h)} of {len(layers)}"
    if zero:
        text += f" (with exactly zero variance on {', '.join(f'`{z}`' for z in zero)})"
    left = [l["name"] for l in R["layers"] if l.get("zero_to_precision")]
    if left:
        text += f"; {', '.join(f'`{z}`' for z in left)}, whose Fisher is zero to precision, not counted"
    return text + "."


def positions_text(O: dict) -> str:
    """What outputs with positions mean for every number of the report (the ``outputs`` entry ``O``)."""
    shape = "×".join(map(str, O["positions"]))
    masked = (f"those where `{O['mask']}` is 0 left out, and those a label of -100 leaves out (for a causal "
              f"language model, its last too, whose labels its loss shifts): {O['observed_positions_per_input']:.4g} "
              "observed per input on average" if O["mask"]
              else "all observed, but those a label of -100 leaves out where the data has labels")
    return (f"{shape} per input ({masked}), each an independent observation: the Fisher of one input "
            "is the sum over its observed positions, the means are over inputs, and \"one label per "
            "input\" means one label drawn per position. Tr(F) divided by "
            f"{O['observed_positions_per_input']:.4g} is the mean per observed position."
            + (f" Note: {O['note']}." if O.get("note") else ""))


def analysed(R: dict) -> list[str]:
    """The bullet points of what was analysed: model, data, family, positions, the command that re-creates it."""
    D, M = R["data"], R["model"]
    shape = D["input_shape"]
    shape = ", ".join(f"{k} {tuple(v)}" for k, v in shape.items()) if isinstance(shape, dict) else tuple(shape)
    lines = [(f"- **Model:** {M.get('source') or M['class']}; {counted(M['n_parameters'], 'trainable parameter')} "
              f"in {counted(M['n_layers'], 'parameter tensor')} (\"layers\" below)"
              + (f" ({counted(M['n_frozen_parameters'], 'frozen parameter')} left out of every number: the Fisher of the "
                 "trainable ones)" if M.get("n_frozen_parameters") else "")
              + f", {M['dtype']}, evaluated in eval mode.")]
    targets = ("with targets." if D["has_targets"] else f"with targets, but {D['targets_note']}."
               if D.get("targets_note") else "without targets (so no empirical Fisher).")
    lines.append(f"- **Data:** {D['source']}: {counted(D['n_inputs'], 'input')} of shape {shape}, " + targets
                 + (f" Note: {D['variance_inputs_note']}." if D.get("variance_inputs_note") else ""))
    lines.append(f"- **Output family:** {family_text(R, code=True)}; labels are drawn from the model (the Fisher under the "
                 "model's own predictive distribution).")
    lines += [f"- **{w.replace(': ', ':** ', 1)}" for w in warning_lines(R)]
    if R.get("outputs", {}).get("positions"):  # a key since report.json's of the same format version 1
        lines.append("- **Outputs with positions:** " + positions_text(R["outputs"]))
    if R.get("command"):
        lines.append(f"- **Re-create:** `{R['command']}` (torchfim {R['torchfim_version']}, "
                     f"torch {R['torch_version']}).")
    return lines


def _head(R: dict) -> list[str]:
    """Title, what was analysed, the summary and the overview figure."""
    T, D = R["trace"], R["data"]
    n, k = D["n_inputs"], R["n_samples"]
    subset_text, sub = _subset_text(D), T["subset"]
    lines: list[str] = []
    add = lines.append
    add("# torchfim report")
    add("")
    lines += analysed(R)
    add("")
    add("## Summary")
    add("")
    add(f"- **Tr(F) = {fmt(T['exact'])}** (exact, mean over all {counted(n, 'input')}). One score-estimator draw "
        f"with {counted(k, 'label')} per input gave {fmt(T['trace_score_estimate'])}, standard error "
        f"{fmt(T['trace_score_stderr'])} ({pct(_relative_stderr(T))} of Tr(F)).")
    if sub["var_hessian"] is None:
        add(f"- **Î1 vs Î2 for the trace**, on {subset_text} with one label each: Var Tr Î1 = "
            f"{fmt(sub['var_score'])}; {D['variance_inputs_note']}.")
    else:
        add(f"- **Î1 vs Î2 for the trace**, on {subset_text} with one label each: Var Tr Î1 = "
            f"{fmt(sub['var_score'])}, Var Tr Î2 = {fmt(sub['var_hessian'])}: the "
            f"**{sub['better_for_trace']}** estimator has the smaller variance for the whole trace. "
            + _per_layer_winner(R))
    target = f"{100 * R['rel_error']:.0f}%"
    add(f"- **Labels per input for {a_or_an(target)} relative standard error** (one σ) of Tr(F) on all "
        f"{counted(n, 'input')}: k = {fmt(T['samples_needed']['score'])} with Î1, "
        f"k = {fmt(T['samples_needed']['hessian'])} with Î2." + _like_for_like(T, R["data"]))
    if R["empirical"] is not None:
        E = R["empirical"]
        add(f"- **Empirical Fisher** (true labels): its trace is {fmt(E['trace_ratio'], 3)}× the true "
            f"Tr(F) ({fmt(E['trace'])} vs {fmt(E['trace_exact'])}); cosine similarity of the "
            f"diagonals {fmt(E['cosine_diag'], 3)}.")
    add("")
    add("![overview: Tr(F) per layer, estimator variances, labels needed, and "
        + ("empirical vs true Fisher" if R["empirical"] is not None else "spectra") + "](overview.png)")
    add("")
    return lines


def _section_trace(R: dict) -> list[str]:
    """Section 1: Tr(F) per layer with the score estimator's error bars."""
    T, M = R["trace"], R["model"]
    n, m, k = R["data"]["n_inputs"], R["data"]["variance_inputs"], R["n_samples"]
    subset_text, rel = _subset_text(R["data"]), _relative_stderr(T)
    lines: list[str] = []
    add = lines.append
    add("## 1. Tr(F) per layer, with error bars")
    add("")
    add(f"Grey bars: the exact trace of each layer's diagonal block of F, `(1/n) Σᵢ tr(Jᵢᵀ Λᵢ Jᵢ)` "
        f"restricted to that parameter tensor, on all {counted(n, 'input')} (`torchfim.fisher(..., structure=\"diag\")` "
        f"summed per layer; the whole-model value is `torchfim.fisher(..., structure=\"trace\")`). "
        f"Blue points: one draw of the unbiased score estimator Î1 with {counted(k, 'label')} per input "
        f"(seed {R['seed'] + 1}), with ± 2 standard errors. The standard error is exact, not "
        f"bootstrapped: √(Var₁/k), with Var₁ from `torchfim.fisher_variance(..., estimator=\"score\", "
        f"structure=\"trace\")` on all inputs and the model with only that layer trainable. Over many inputs of "
        "like size, about 95% of such draws fall within the bars; where a few inputs' large score norms dominate, "
        "the draw is skewed to the right and the bars miss it more often, mostly above (86% within on a "
        "52-tensor residual MLP of 64 inputs).")
    add("")
    add("![Tr(F) per layer](trace_per_layer.png)")
    add("")
    rows = []
    for layer in R["layers"]:
        se = layer["trace_score_stderr"]
        rows.append([f"`{layer['name']}`", str(tuple(layer["shape"])), str(layer["size"]),
                     fmt(layer["trace_exact"]), pct(layer["share_of_trace"]),
                     fmt(layer["trace_score_estimate"]), fmt(se),
                     pct(se / layer["trace_exact"] if se is not None and layer["trace_exact"] else None),
                     fmt(layer["trace_hessian_stderr"])])
    rows.append(["**whole model**", "", str(M["n_parameters"]), fmt(T["exact"]), "100%",
                 fmt(T["trace_score_estimate"]), fmt(T["trace_score_stderr"]),
                 pct(rel), fmt(T["trace_hessian_stderr"])])
    add(md_table(["layer", "shape", "size", "Tr(F)", "share", f"Î1 draw (k={k})", "s.e. Î1",
                "s.e./Tr", "s.e. Î2*"], rows, "lllrrrrrr"))
    add("")
    zero = [f"`{layer['name']}`" for layer in R["layers"] if layer.get("zero_to_precision")]
    if zero:
        add(f"Zero to the model's {M['dtype']} precision ({_zero_criterion(R)}, as for a parameter the outputs do "
            "not depend on, e.g. an attention key's bias, which softmax ignores): "
            f"{', '.join(zero)}. Their numbers are rounding, not data: drawn as 0, without labels needed or "
            "spectrum.")
        add("")
    add(f"\\* The Î2 standard error on all {counted(n, 'input')} is extrapolated from {subset_text} as "
        f"√((m/n)·Var₁(subset)/k), m = {m}: the variance is a mean of per-input terms over n², so a "
        "random subset's mean per-input term estimates the full one without bias."
        if m < n else "\\* Exact (the subset is the whole data set).")
    add("")
    return lines


def _zero_criterion(R: dict) -> str:
    """How the report told the layers zero to precision: their gradients in two precisions
    (:mod:`torchfim.report.rounding`), or, where that check could not run, their Tr against ε²·Tr(F)."""
    if all(layer.get("rounding_disagreement") is None for layer in R["layers"]):
        return "Tr at most ε²·Tr(F), what scores of rounding size give"
    other = "float32" if R["model"]["dtype"] == "float64" else "float64"
    checked = counted(min(CHECK_INPUTS, R["data"]["n_inputs"]), "input")
    return (f"their score gradients on {checked} computed again in {other} came out as other "
            "numbers, as rounding does and data does not")


def _section_variance(R: dict) -> list[str]:
    """Section 2: the variances of Î1 and Î2 per layer, and their bounds."""
    D, sub = R["data"], R["trace"]["subset"]
    subset_text = _subset_text(D)
    lines: list[str] = []
    add = lines.append
    add("## 2. Variance of Î1 vs Î2 per layer, and the bounds")
    add("")
    add(f"The variance, with one label per input (divide by k for k labels), of each layer's trace "
        f"estimator, on {subset_text}, treated as the data set"
        + (" (the Hessian estimator needs one forward-over-forward pass per parameter and input, hence the subset)"
           if D["variance_inputs"] < D["n_inputs"] else "") + ". Each number is exact "
        "(Soen & Sun 2021, docs/math.md §3): `torchfim.fisher_variance(model, subset, "
        "estimator=..., structure=\"trace\")` on the model with every other parameter frozen "
        "(`requires_grad=False`), which is exactly the variance of that layer's trace estimate, "
        "covariances between its entries included. Hollow markers: the upper bounds of "
        "`torchfim.variance_bound` (Î1: summed over inputs, each input's smaller of the spectral bound, through "
        "λ_max of the fourth moment of the output score, and the kurtosis bound, through E‖u‖⁴; Î2: the spectral "
        "bound through λ_max(Λ)). The whole-model column is the variance of Tr Î itself, which is "
        "not the sum of the layers' (covariances between layers). Î2 has zero variance wherever "
        "∇²_θ o vanishes, e.g. the last linear layer's weights and biases: a zero is drawn at the "
        "bottom of the plot and marked 0.")
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
    add(md_table(["layer", "Tr(F) on subset", "Var Tr Î1", "bound", "bound/Var", "Var Tr Î2", "bound",
                "bound/Var", "better (trace)", "Σ Var diag Î1", "Σ Var diag Î2", "better (diagonal)"],
               rows, "lrrrrrrrlrrl"))
    add("")
    add("The last three columns compare the estimators for the diagonal instead of the trace: the sum "
        "over the layer of each diagonal entry's variance (the expected squared error of the diagonal "
        "estimate, as `torchfim.compare_estimators` reports it).")
    add("")
    return lines


def _section_samples(R: dict) -> list[str]:
    """Section 3: labels per input for the target relative standard error (one σ)."""
    T, n, m = R["trace"], R["data"]["n_inputs"], R["data"]["variance_inputs"]
    lines: list[str] = []
    add = lines.append
    pct = f"{100 * R['rel_error']:.0f}%"
    add(f"## 3. Labels per input for {a_or_an(pct)} relative standard error (one σ)")
    add("")
    add(f"For each layer, the number of labels per input k such that the standard error of the "
        f"layer's trace estimate on all {counted(n, 'input')} is at most {pct} of the exact value, {a_or_an(pct)} "
        f"relative standard error: a one-σ target, so about two estimates in three fall within {pct} of the value (for a "
        f"normal estimate), not all of them. k = ⌈Var₁ / ({R['rel_error']}·Tr_layer)²⌉ (at least 1), the "
        f"per-layer version of `torchfim.samples_needed`. Var₁ is the one-label variance of the layer's trace "
        f"estimator on all inputs: exact for Î1; for Î2 extrapolated from the subset, (m/n)·Var₁(subset) with "
        f"m = {m}. The whole-model Î1 column equals `torchfim.samples_needed(model, inputs, "
        f"estimator=\"score\")`. The bars show Var₁/({R['rel_error']}·Tr)² before rounding up: "
        f"below the dotted line at 1, one label per input already gives a relative standard error below "
        f"{pct}; a bar at 10 means 10 labels per input (or 10× the inputs) are "
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
    add(md_table(["layer", "Tr(F)", "Var₁ Tr Î1", q, "k (Î1)", "Var₁ Tr Î2 (extrap.)", q, "k (Î2)"], rows))
    add("")
    return lines


def _section_spectra(R: dict) -> list[str]:
    """Section 4: eigenvalues of the per-layer exact blocks."""
    M, n = R["model"], R["data"]["n_inputs"]
    lines: list[str] = []
    add = lines.append
    add("## 4. Eigenvalues of the per-layer exact blocks")
    add("")
    skipped = [l["name"] for l in R["layers"] if l["spectrum"] is None and not l.get("zero_to_precision")]
    add(f"The eigenvalues of each layer's diagonal block of the exact F on all {counted(n, 'input')} "
        f"(`torchfim.fisher(..., structure=\"full\")` on the model with only that layer trainable, the "
        f"same block as `structure=\"blocks\"` gives; `torch.linalg.eigvalsh` in float64), sorted "
        f"from the largest; eigenvalues below 10⁻¹² of the largest are not drawn. Computed for layers "
        f"of at most {counted(R['max_block'], 'parameter')}"
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
            said = "zero to precision" if layer.get("zero_to_precision") else "skipped"
            rows.append([f"`{layer['name']}`", str(layer["size"]), said, "", "", "", "", ""])
            continue
        rows.append([f"`{layer['name']}`", str(layer["size"]), fmt(s["max"]), fmt(s["min"]), fmt(s["sum"]),
                     str(s["rank_1e-6"]), pct(s["top10_share"]), fmt(s["condition_of_nonzero"], 3)])
    add(md_table(["layer", "size", "λ_max", "λ_min", "Σλ = Tr", "rank (>10⁻⁶λ_max)", "top-10 share",
                "condition"], rows))
    add("")
    return lines


def _section_empirical(R: dict) -> list[str]:
    """Section 5: the empirical Fisher against the true one."""
    D = R["data"]
    lines: list[str] = []
    add = lines.append
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
            f"{fmt(E['cosine_diag'], 3)}. "
            + ("When a classifier fits its training labels well, the true label is mostly its most probable one, "
               "whose score is small, so the empirical Fisher tends to underestimate F; the diagonal's direction "
               "(cosine) can still agree closely." if R.get("family", "categorical") in ("categorical", "bernoulli")
               else "Its ratio to F compares the residuals' spread with the model's own: above 1 where the "
               "targets lie further from the predictions than the model's noise says, below where nearer.")
            + (" With outputs with positions it is the empirical Fisher of inputs, each input's score summed over "
               "its observed positions (`empirical_per=\"input\"`); the per-token one that curvlinops, BackPACK and "
               "laplace-torch compute is `torchfim.fisher(..., estimator=\"empirical\", "
               "empirical_per=\"position\")`." if R.get("outputs", {}).get("positions") else ""))
        add("")
        add("![empirical vs true Fisher](empirical_vs_true.png)")
        add("")
        rows = [["**whole model**", fmt(E["trace_exact"]), fmt(E["trace"]), fmt(E["trace_ratio"], 3),
                 fmt(E["cosine_diag"], 3)]]
        rows += [[f"`{l['name']}`", fmt(l["trace_exact"]), fmt(l["trace"]), fmt(l["trace_ratio"], 3),
                  fmt(l["cosine_diag"], 3)] for l in E["layers"]]
        add(md_table(["layer", "Tr(F) true", "Tr empirical", "ratio", "cosine (diag)"], rows))
    add("")
    return lines


def resumed_note(R: dict) -> str:
    """The time note's addition where steps were read back from an interrupted run (their time not counted)."""
    resumed = R.get("resumed_steps")
    return (f"; not counted: the time of {counted(resumed, 'step')} read back from an interrupted run of this report"
            if resumed else "")


def _section_notes(R: dict) -> list[str]:
    """Timings and how to check the numbers."""
    n, m = R["data"]["n_inputs"], R["data"]["variance_inputs"]
    chosen = (f"all {counted(n, 'input')}" if m == n else
              f"{m} of the {counted(n, 'input')}, drawn at random (seed {R['data']['variance_subset_seed']})")
    lines: list[str] = []
    add = lines.append
    add("## Notes")
    add("")
    tm = R["timings"]
    setup = tm.get("setup")
    setup_text = f"loading and training {fmt(setup, 3)} s, " if setup is not None and setup >= 0.01 else ""
    add(f"- Time: {fmt(tm.get('total'), 3)} s in all ({setup_text}"
        f"Tr(F) and Î1 error bars {fmt(tm['trace'], 3)} s, "
        f"Î1/Î2 variances {fmt(tm['variance'], 3)} s, spectra {fmt(tm['spectrum'], 3)} s, empirical "
        f"{fmt(tm['empirical'], 3)} s, figures {fmt(tm.get('figures'), 3)} s){resumed_note(R)}.")
    add("- All values are means over inputs (not sums) and conditional on these inputs: the variances "
        "are over the labels drawn from the model, not over resampling the data.")
    add(f"- The variance subset: {chosen}; their indices are in report.json "
        "(`data.variance_subset_indices`).")
    add("- `model.pt` holds the model's state dict, so the numbers can be checked with the library: "
        f"`{_trace_call(R)}` gives `trace.exact` of report.json.")
    add("")
    return lines


def _trace_call(R: dict) -> str:
    """The library call that gives the report's ``trace.exact``: with its family (σ included), mask and class dim."""
    O = R.get("outputs", {})
    family = (f"torchfim.families.Gaussian(sigma={R['sigma']!r})" if R.get("sigma") is not None
              else repr(R["family"]) if R["family"] != "categorical" else None)
    given = [("family", family), ("mask", repr(O["mask"]) if O.get("mask") else None),
             ("class_dim", repr(O["class_dim"]) if O.get("class_dim") is not None else None)]
    return "torchfim.fisher(model, inputs, " + "".join(f"{k}={v}, " for k, v in given if v) + 'structure="trace")'
