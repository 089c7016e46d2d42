"""The sentences of summary.md's key numbers and conclusions, computed from results.json records."""

from __future__ import annotations

from typing import Any

import numpy as np

from .settings import BOUNDS, REL_ERROR

__all__ = [
    "fmt",
    "seed_sentence",
    "p_range",
    "bound_tightness_sentence",
    "activation_sentences",
    "sweep_sentences",
    "training_sentences",
    "training_rows",
]


def fmt(v: float | None, digits: int = 3) -> str:
    """``digits`` significant digits; ``—`` for None, ``0`` for zero."""
    if v is None:
        return "—"
    if v == 0:
        return "0"
    return f"{v:.{digits}g}"


def seed_sentence(results: dict[str, Any]) -> str:
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


def p_range(results: dict[str, Any]) -> str:
    """``min–max`` of the parameter counts of experiment (b)."""
    ps = sorted({r["num_params"] for r in results.get("activations", [])})
    return f"{ps[0]}–{ps[-1]}" if ps else "?"


def bound_tightness_sentence(recs: list[dict[str, Any]]) -> str:
    """How loose each bound typically is (median entry ratio), per family."""
    def med(bound: str, family: str | None = None) -> float | None:
        vals = [lay["ratios"][bound]["median"] for r in recs for lay in r["layers"]
                if lay["ratios"][bound]["median"] is not None and (family is None or r["family"] == family)]
        return float(np.median(vals)) if vals else None

    parts = []
    cat = {b: med(b, "categorical") for b in BOUNDS}
    if cat["score_spectral"] is not None and cat["score_kurtosis"] is not None:
        parts.append(
            f"For classification (each layer's median entry, then the median over layers and data sets) the bound "
            f"is {cat['score_spectral']:.3g}× the variance "
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


def activation_sentences(recs: list[dict[str, Any]]) -> list[str]:
    """What (b) shows: zeros of Var(Î2), and which estimator wins where."""
    out = []
    cat = [r for r in recs if r["family"] == "categorical"]
    relu = [r for r in recs if r["activation"] == "relu"]
    if relu:
        zero = all(lay["var_hessian_diag_max"] == 0 for r in relu for lay in r["layers"])
        out.append(
            "ReLU: Var(Î2) is exactly zero on every diagonal entry " + ("(as the maths says: ∂²o/∂θ_p² = 0 for a "
            "piecewise-linear network)" if zero else "— NOT observed, which would contradict the maths")
            + f"; the largest trace variance over the ReLU runs is {fmt(max(r['trace']['var_hessian'] for r in relu))} "
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
                f"(Var(Î2)/Var(Î1) from {fmt(min(ratios))} to {fmt(max(ratios))}); for the trace estimator Î2 is "
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


def sweep_sentences(recs: list[dict[str, Any]]) -> list[str]:
    """What (c) shows: the relative errors from the smallest to the largest network."""
    out = []
    for sweep in ("depth", "width"):
        rows = [r for r in recs if r["sweep"] == sweep]
        if len(rows) < 2:
            continue
        a, b = rows[0], rows[-1]
        out.append(
            f"{sweep.capitalize()} {a[sweep]} → {b[sweep]} (tanh): relative SE of Tr Î1 "
            f"{fmt(a['rel_se_score'])} → {fmt(b['rel_se_score'])}, of Tr Î2 {fmt(a['rel_se_hessian'])} → "
            f"{fmt(b['rel_se_hessian'])}; Var Tr Î2 / Var Tr Î1 {fmt(_ratio(a))} → {fmt(_ratio(b))}."
        )
    return out


def _ratio(r: dict[str, Any]) -> float | None:
    return r["var_hessian_trace"] / r["var_score_trace"] if r["var_score_trace"] > 0 else None


def training_sentences(recs: list[dict[str, Any]]) -> list[str]:
    """What (d) shows, per activation: first against last checkpoint."""
    out = []
    for act in dict.fromkeys(r["activation"] for r in recs):
        rows = [r for r in recs if r["activation"] == act]
        a, b = rows[0], rows[-1]
        out.append(
            f"Training ({act}, epoch {a['epoch']} → {b['epoch']}, held-out accuracy {a['heldout_accuracy']:.2f} → "
            f"{b['heldout_accuracy']:.2f}): Tr F {fmt(a['fisher_trace'])} → {fmt(b['fisher_trace'])}; relative SE "
            f"Î1 {fmt(a['rel_se_score'])} → {fmt(b['rel_se_score'])}, Î2 {fmt(a['rel_se_hessian'])} → "
            f"{fmt(b['rel_se_hessian'])}; labels per input for a {REL_ERROR:.0%} relative standard error: Î1 {a['samples_needed_score']} → "
            f"{b['samples_needed_score']}, Î2 {a['samples_needed_hessian']} → {b['samples_needed_hessian']}."
            + _crossing(rows)
        )
    return out


def training_rows(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
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
