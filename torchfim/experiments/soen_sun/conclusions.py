"""The sentences of summary.md's key numbers and conclusions, computed from results.json records."""

from __future__ import annotations

from typing import Any

import numpy as np

from .settings import BOUNDS, REL_ERROR

__all__ = [
    "fmt",
    "seed_sentence",
    "p_range",
    "bound_validity_sentence",
    "bound_tightness_sentence",
    "activation_sentences",
    "sweep_sentences",
    "training_sentences",
    "training_rows",
]


#: Ratios within this relative distance of a value count as equal to it (float64 round-off in the closed forms
#: is ~1e-14): a bound ratio ≥ 1 − RATIO_RTOL is "at or above" the variance, an equality case "exact".
RATIO_RTOL = 1e-9
#: The number of outputs of the study's MLPs (build_mlp's default): C in the Gaussian head's analytic ratios.
_C = 10


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


def bound_validity_sentence(recs: list[dict[str, Any]]) -> str:
    """Whether every bound is at or above the exact variance: the smallest entry and trace ratio over all bounds,
    and, if some ratio is below 1 − :data:`RATIO_RTOL`, where."""
    ratios = [(lay["ratios"][b]["min"], f"{r['activation']}/{r['dataset']}/{r['family']} {lay['layer']} {b}")
              for r in recs for lay in r["layers"] for b in BOUNDS if lay["ratios"][b]["min"] is not None]
    ratios += [(r["trace_ratio"][b], f"{r['activation']}/{r['dataset']}/{r['family']} trace {b}")
               for r in recs for b in BOUNDS if r["trace_ratio"][b] is not None]
    if not ratios:
        return "No entry or trace has a non-zero variance, so no bound could be compared with it."
    smallest = min(v for v, _ in ratios)
    below = [where for v, where in ratios if v < 1 - RATIO_RTOL]
    if not below:
        return (f"Every bound is at or above the exact variance for every entry and trace measured (smallest "
                f"ratio {smallest:.6g}), as upper bounds must be.")
    return (f"NOT every bound is at or above the exact variance: the ratio is below 1 in {len(below)} places "
            f"(smallest {smallest:.6g}; {', '.join(below[:5])}{', …' if len(below) > 5 else ''}), which an upper "
            "bound must not do.")


def _spread(recs: list[dict[str, Any]], bound: str) -> tuple[float, float] | None:
    """The smallest and largest entry ratio of ``bound`` over ``recs``."""
    lows = [lay["ratios"][bound]["min"] for r in recs for lay in r["layers"] if lay["ratios"][bound]["min"] is not None]
    highs = [lay["ratios"][bound]["max"] for r in recs for lay in r["layers"] if lay["ratios"][bound]["max"] is not None]
    return (min(lows), max(highs)) if lows else None


def _constant(spread: tuple[float, float] | None, value: float) -> bool:
    return spread is not None and all(abs(v - value) <= RATIO_RTOL * value for v in spread)


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
    gauss = [r for r in recs if r["family"] == "gaussian"]
    return text + _gaussian_sentence(gauss, med) if gauss else text


def _gaussian_sentence(gauss: list[dict[str, Any]], med: Any) -> str:
    """The Gaussian head's ratios against the analytic ones (Λ = I, C = 10): said only where they hold."""
    g2, g1, gk = (_spread(gauss, b) for b in ("hessian_spectral", "score_spectral", "score_kurtosis"))
    a1, ak = (_C + 1) / 2, (_C * _C + 2 * _C - 1) / 2
    parts = []
    if g2 is not None:
        parts.append(f"Î2's bound is exact (median ratio {med('hessian_spectral', 'gaussian'):.6g}), the equality case "
                     "of its proof" if _constant(g2, 1.0) else
                     f"Î2's bound is NOT exact: its entry ratios range from {g2[0]:.6g} to {g2[1]:.6g}, where the "
                     "equality case of its proof says 1")
    if g1 is not None and gk is not None:
        parts.append(f"Î1's entry bounds are a constant multiple of the variance ({med('score_spectral', 'gaussian'):.6g} "
                     f"and {med('score_kurtosis', 'gaussian'):.6g}; for u ~ N(0, I_C) with C = 10 the analytic values "
                     "are (C+2−1)/2 = 5.5 and (C²+2C−1)/2 = 59.5, since E(uᵀv)⁴ = 3‖v‖⁴, λ_max(E[u⊗u⊗u⊗u]) = C+2 and "
                     "E‖u‖⁴ = C²+2C)" if _constant(g1, a1) and _constant(gk, ak) else
                     f"Î1's entry ratios are NOT the constants {a1:g} and {ak:g} that u ~ N(0, I_{_C}) gives "
                     f"(spectral {g1[0]:.6g}–{g1[1]:.6g}, kurtosis {gk[0]:.6g}–{gk[1]:.6g})")
    return f" With the Gaussian head (Λ = I) {', and '.join(parts)}." if parts else ""


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
            + f"; the largest trace variance over the ReLU runs is {fmt(max(r['trace']['var_hessian'] for r in relu))}"
            + (" (Tr Î2 is then exact)." if max(r["trace"]["var_hessian"] for r in relu) == 0 else
               " — NOT zero, which would contradict tr ∂²o = 0 for a piecewise-linear network.")
        )
    last_zero = all(r["layers"][-1]["var_hessian_diag_max"] == 0 for r in recs)
    out.append(
        "The output layer's Var(Î2) diagonal is zero for every activation and family (o is linear in the last "
        "layer's weights), so Î2 estimates that layer's diagonal exactly." if last_zero else
        "The output layer's Var(Î2) diagonal is NOT zero everywhere (unexpected: o is linear in the last layer's "
        "weights, so it should be)."
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
                + "." + _choice(cat, hidden_wins, len(hidden), last_zero)
            )
    gauss = [r for r in recs if r["family"] == "gaussian"]
    if gauss:
        g_wins = sum(r["trace"]["better"] == "hessian" for r in gauss)
        out.append(
            f"Gaussian head (digits): Î2 wins the trace in {g_wins} of {len(gauss)} activations; Λ = I there, so "
            "Var(Î2) is ‖∂²o‖² exactly while Î1's variance carries the Gaussian fourth moments."
        )
    return out


def _choice(cat: list[dict[str, Any]], hidden_wins: int, n_hidden: int, last_zero: bool) -> str:
    """The per-layer advice, said only as far as the counts back it."""
    if hidden_wins == n_hidden and last_zero:
        return " So at initialisation Î2 has the smaller summed diagonal variance in every layer here."
    if hidden_wins or not last_zero:
        return (" So at initialisation neither estimator is the better one in every hidden layer of the smooth "
                "networks: the choice depends on the layer and the activation.")
    relu = [r for r in cat if r["activation"] == "relu"]
    relu_all = relu and all(lay["better"] == "hessian" for r in relu for lay in r["layers"])
    return (f" So at initialisation the choice is per layer: Î2 for the output layer"
            f"{' (and for everything in a ReLU network)' if relu_all else ''}, Î1 for the hidden layers of smooth "
            "networks, whose ∂²o/∂θ_p² make Î2 noisy there.")


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
