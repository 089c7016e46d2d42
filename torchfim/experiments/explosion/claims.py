"""The "Which claims held" part of summary.md: the verdict tables and the claims in words, with
the caveats that the numbers call for."""

from __future__ import annotations

from collections.abc import Sequence

from ...compare import fewest_pairs
from .assemble import CLEAN_CLAIMS, NOISY_CLAIMS
from .settings import CLEAN_VARIANTS, LABELS, NOISY_VARIANTS, POOLED, lr_text, noisy_label, noisy_pooled

__all__ = ["claims_text"]

_CLAIMS = {
    "a_explosion": "(a) peak Tr(F) higher at η*/10 than at η*",
    "a_explosion_early": "(a) ... and Tr(Fᵢ) (at training loss ε) higher",
    "a_fp_lowers_peak": "(a) the penalty lowers the η*/10 peak Tr(F)",
    "b_large_beats_small": "(b) test accuracy (at the best validation step) higher at η* than at η*/10",
    "b_fp_beats_small": "(b) the penalty raises η*/10's test accuracy (at the best validation step)",
    "b_large_beats_small_final": "(b) final test accuracy higher at η* than at η*/10",
    "b_fp_beats_small_final": "(b) the penalty raises η*/10's final test accuracy",
    "c_fp_slows_noisy": "(c) the penalty (tuned α) slows the fitting of the noisy labels",
    "c_noisy_slowed_more": "(c) ... relatively more than of the clean ones",
    "c_fp_test": "(c) the penalty (tuned α) raises test accuracy under label noise",
    "c_fp_fixed_slows_noisy": "(c) the penalty (fixed α) slows the fitting of the noisy labels",
    "c_fixed_noisy_slowed_more": "(c) ... relatively more than of the clean ones",
    "c_fp_fixed_test": "(c) the penalty (fixed α) raises test accuracy under label noise",
}


def _count(table: dict, key: str, labels: list[str], pooled: str | None) -> str:
    """In how many of ``labels`` the claim ``key`` held (and where it was reversed; the pooled verdict)."""
    got = [table[c].get(key) for c in labels]
    held = [c for c, g in zip(labels, got) if g and g.startswith("held")]
    opp = [c for c, g in zip(labels, got) if g and g.startswith("opposite")]
    text = f"held in {len(held)} of {len(labels)}" + (f" ({', '.join(held)})" if held else "")
    if not held and not opp and all(got):  # the seeds' directions say more than "0 of 4"
        text += f" alone (seeds its way: {', '.join(g[g.index('(') + 1:-1] for g in got)})"
    if opp:
        text += f", significantly reversed in {', '.join(opp)}"
    if pooled is not None and pooled in table and table[pooled].get(key) is not None:
        text += f"; pooled: {table[pooled][key]}"
    return text


def _verdict_table(table: dict, keys: Sequence[str], extra: list[str] | None = None) -> list[str]:
    """A markdown table of verdicts: one row per claim, one column per configuration."""
    lines = ["| claim | " + " | ".join(table) + " |", "|---|" + "---|" * len(table)]
    for key in keys:
        if any(key in table[c] for c in table):
            lines.append(f"| {_CLAIMS[key]} | " + " | ".join(str(table[c].get(key) or "—") for c in table) + " |")
    return lines + (extra or [])


def claims_text(s: dict, verdicts: dict, agg: dict, combos: list[str], nsets: list) -> list[str]:
    """The section's lines; ``s`` is results.json's settings with its tuning under ``"_tuning"``."""
    lines = _verdict_tables(s, verdicts) + ["In words:", ""]
    lines += _clean_words(verdicts["clean"], agg, combos)
    lines += _noisy_words(s, verdicts["noisy"])
    return lines + _caveats(s, agg, combos, nsets)


def _verdict_tables(s: dict, verdicts: dict) -> list[str]:
    """What the verdicts mean, then the clean-label and the noisy-label verdict tables."""
    clean, noisy = verdicts["clean"], verdicts["noisy"]
    fewest = fewest_pairs(0.95)
    lines = [
        ("'held' = `prob_outperform` concluded 'A better' in the claim's direction; 'opposite' = significant in the "
         "other direction; 'not significant' = no conclusion. In brackets: the seeds whose runs went the claim's way "
         "(ties count one half), of all. A conclusion needs the exact sign test to agree with the bootstrap interval, "
         f"which at 95% takes at least {fewest} pairs, all agreeing." + _pooled_words(s, verdicts, fewest)),
        "",
    ]
    if clean:
        gap = "| (b) fraction of the gap closed by the penalty (≥ 0.5 = 'most'; — = no clear gap) | " + " | ".join(
            "—" if clean[c].get("b_gap_closed") is None else f"{clean[c]['b_gap_closed']:.2f}" for c in clean
        ) + " |"
        lines += _verdict_table(clean, CLEAN_CLAIMS, [gap]) + [""]
    if noisy:
        lines += _verdict_table(noisy, NOISY_CLAIMS) + [""]
    return lines


def _pooled_words(s: dict, verdicts: dict, fewest: int) -> str:
    """What the pooled columns add, if the study has any, and what too few seeds leave the verdicts (a ``--quick``
    study, one data set and model with 2 seeds, was told that its pooled columns decide: it has none)."""
    pooled = any(c.endswith("(pooled)") for table in verdicts.values() for c in table)
    few = s["n_seeds"] < fewest
    if pooled:
        return " Pooled columns pair the runs of every data set and model" + (
            f"; with {s['n_seeds']} seeds a data set and model alone cannot reach a conclusion, so only a pooled "
            f"column, of {fewest} pairs or more, can." if few else ".")
    if few:
        return (f" With {s['n_seeds']} seeds and no pooled column (one data set and model), no comparison can reach a "
                "conclusion: every verdict is 'not significant', and only the seeds in brackets show which way the "
                "runs went.")
    return ""


def _clean_words(clean: dict, agg: dict, combos: list[str]) -> list[str]:
    """Claims (a) and (b) in words."""
    lines: list[str] = []
    gaps = {c: agg[c]["gap_closed"] for c in combos + ([POOLED] if POOLED in agg else [])}
    real = [c for c in combos if gaps[c]["gap_ci_low"] > 0]  # a gap whose interval excludes 0
    most = [c for c in real if gaps[c]["value"] is not None and gaps[c]["value"] >= 0.5]
    sure = [c for c in real if gaps[c]["ci_low"] is not None and gaps[c]["ci_low"] > 0]
    pooled = POOLED if len(combos) > 1 else None
    if combos:
        lines.append(
            f"* **(a) Fisher explosion**, peak Tr(F) higher at the small learning rate: "
            f"{_count(clean, 'a_explosion', combos, pooled)}. Early-phase Tr(Fᵢ) (at the same training loss ε) higher: "
            f"{_count(clean, 'a_explosion_early', combos, pooled)}. The penalty lowering the small rate's peak: "
            f"{_count(clean, 'a_fp_lowers_peak', combos, pooled)}."
        )
        pooled_gap = f" Pooled over the data sets and models it closed {_gap_words(gaps[POOLED])}." if POOLED in gaps else ""
        lines.append(
            f"* **(b) the small learning rate generalises worse** (test accuracy at the best validation step): "
            f"{_count(clean, 'b_large_beats_small', combos, pooled)}. **The penalty improves the small rate**: "
            f"{_count(clean, 'b_fp_beats_small', combos, pooled)}. A gap whose 95% interval excludes 0 was there to "
            f"close in {len(real)} of {len(combos)}" + (f" ({', '.join(real)})" if real else "") + "; of those, the "
            f"fraction the penalty closed was half or more at its point value in {len(most)}"
            + (f" ({'; '.join(f'{c}: {_gap_words(gaps[c])}' for c in most)})" if most else "")
            + f", and had a 95% interval that excludes 0 in {len(sure)}" + (f" ({', '.join(sure)})" if sure else "")
            + "." + pooled_gap
        )
    return lines


def _gap_words(g: dict) -> str:
    if g["value"] is None or g["gap_ci_low"] <= 0:
        return "nothing measurable (there was no clear gap)"
    return f"{g['value']:.2f} of the gap (95% interval {g['ci_low']:.2f} to {g['ci_high']:.2f})"


def _noisy_words(s: dict, noisy: dict) -> list[str]:
    """Claim (c) in words, per learning rate."""
    lines: list[str] = []
    for w in s["noisy_lrs"]:
        labels = [noisy_label(d, m, w, s) for d, m in s["noisy_combos"]]
        pl = noisy_pooled(w, s) if len(labels) > 1 else None
        lines.append(
            f"* **(c) at {lr_text(w, s)}, the penalty with the tuned α slows memorisation of noisy labels**: "
            f"{_count(noisy, 'c_fp_slows_noisy', labels, pl)}; **relatively more than of clean ones**: "
            f"{_count(noisy, 'c_noisy_slowed_more', labels, pl)}. Test accuracy (at the best validation step) "
            f"improved by it: {_count(noisy, 'c_fp_test', labels, pl)}."
        )
        if s["noisy_fixed_alpha"]:
            lines.append(
                f"* **(c) at {lr_text(w, s)}, with α = {s['noisy_fixed_alpha']:g}**: slows memorisation of noisy labels: "
                f"{_count(noisy, 'c_fp_fixed_slows_noisy', labels, pl)}; relatively more than of clean ones: "
                f"{_count(noisy, 'c_fixed_noisy_slowed_more', labels, pl)}; test accuracy improved: "
                f"{_count(noisy, 'c_fp_fixed_test', labels, pl)}."
            )
    return lines


def _grid_edges(s: dict, tuning: dict, combos: list[str]) -> list[str]:
    """Caveats where the tuning chose a grid's edge that the grid does not bound: the largest or the smallest η (a
    rate beyond it, not tried, might have validated better), the largest α of the clean or the noisy-label runs (a
    stronger penalty might have), and the smallest α of the noisy-label runs (a weaker one might have; the clean runs'
    smallest α has a caveat of its own, a weak penalty)."""
    chosen = []  # (what, grid, setting, value)
    for c in combos:
        if c in tuning:
            chosen += [("η*", s["lr_grid"], c, tuning[c].get("lr_star")), ("α", s["alpha_grid"], c, tuning[c].get("alpha"))]
            chosen += [("α of the noisy-label runs", s.get("noisy_alpha_grid", ()), f"{c} at {'η*/10' if w == 'small' else 'η*'}",
                        entry.get("alpha")) for w, entry in tuning[c].get("noisy", {}).items()]
    lines = []
    for what, grid in dict.fromkeys((w, tuple(g)) for w, g, _, _ in chosen):
        for edge, word in ((max, "largest"), (min, "smallest")):
            if edge is min and what == "α":  # its own caveat: a weak penalty (_caveats)
                continue
            at = [c for w, g, c, v in chosen if (w, tuple(g)) == (what, grid) and len(grid) > 1 and v == edge(grid)]
            if at:
                lines.append(f"* Caveat: the validation-chosen {what} was the {word} of {list(grid)} on {', '.join(at)}: "
                             f"a {'larger' if edge is max else 'smaller'} value, not tried, might have validated better, "
                             "so the grid does not show that it is the best.")
    return lines


def _caveats(s: dict, agg: dict, combos: list[str], nsets: list) -> list[str]:
    """What limits the conclusions: a weak tuned α, under-fitting, memorisation not reached, collapse, scale."""
    lines: list[str] = []
    tuning = s.get("_tuning", {})
    smallest = [c for c in combos if c in tuning and tuning[c].get("alpha") == min(s["alpha_grid"])]
    if smallest and len(s["alpha_grid"]) > 1:
        lines.append(
            f"* On the tuning seeds the validation-chosen α was the smallest of {list(s['alpha_grid'])} on "
            f"{', '.join(smallest)}: stronger penalties did not raise validation accuracy there, so the penalised "
            "runs of (b) use a weak penalty."
        )
    lines += _grid_edges(s, tuning, combos)
    under = [c for c in combos if agg[c]["small"]["train_acc"]["mean"] < 0.99]
    if under:
        lines.append(
            f"* Caveat: at the small learning rate the final training accuracy stayed below 99% on {', '.join(under)}, "
            "so there part of the small rate's test-accuracy deficit is under-fitting within the budget, not only "
            "worse generalisation of a fitted network (the paper trains 300 epochs to ~100%)."
        )
    moving = [f"{c} ({LABELS[v]})" for c in combos for v in CLEAN_VARIANTS if agg[c][v]["plateaued"] is False]
    moving += [f"{d}/{m} with noisy labels at {lr_text(w, s)} ({LABELS[v]})" for d, m, w in nsets
               for v in NOISY_VARIANTS if agg[noisy_label(d, m, w, s)].get(v, {}).get("plateaued") is False]
    if moving:
        lines.append(
            "* Caveat: the mean training accuracy was still moving over the last fifth of training in "
            + ", ".join(moving) + ", so those configurations had not plateaued within the budget (the most epochs of "
            "the setup)."
        )
    lines += _noise_left_unfitted(agg, nsets, s)
    for d, m, w in nsets:
        a = agg[noisy_label(d, m, w, s)]
        base = a["base"]["clean_acc"]["mean"]
        for v in ("fp", "fp_fixed"):
            if v in a and a[v]["clean_acc"]["mean"] < 0.75 * base:
                n_low = sum(x < 0.5 for x in a[v]["clean_acc"]["values"])
                lines.append(
                    f"* Caveat: with α = {a[v]['alpha']:g} on {d}/{m} at {lr_text(w, s)} the penalty also stopped the "
                    f"clean examples from being fitted (clean-subset train accuracy {100 * a[v]['clean_acc']['mean']:.0f}% "
                    f"against {100 * base:.0f}% without it; training collapsed, below 50%, in {n_low} of "
                    f"{len(a[v]['clean_acc']['values'])} seeds): α is too large there, the failure mode the digest warns "
                    "about, and that configuration's comparisons say more about under-fitting than about memorisation."
                )
    lines.append(
        f"* Scale: networks of 10⁴–10⁵ parameters, "
        f"at least {', '.join(f'{e} epochs on {d}' for d, e in s['epochs'] if d in {c.split('/')[0] for c in combos})} at a "
        f"constant learning rate, {s['n_tuning_seeds']} tuning seeds and {s['n_seeds']} evaluation seeds, against the "
        "paper's ResNets/VGGs/DenseNets trained 300 epochs with step decays: agreement or disagreement here is evidence about small networks on small data, not a verdict on the paper's setting."
    )
    return lines


def _noise_left_unfitted(agg: dict, nsets: list[tuple[str, str, str]], s: dict) -> list[str]:
    """The caveats on noisy-label settings whose un-penalised runs fitted under 90% of the noisy labels: where their
    training accuracy had plateaued (the rest is not memorised at that learning rate) and where it had not (only the
    first part of the memorisation curve is observed)."""
    low = [(f"{d}/{m} at {lr_text(w, s)}", agg[noisy_label(d, m, w, s)]["base"]) for d, m, w in nsets]
    low = [(c, a["noisy_acc"]["mean"], a["plateaued"]) for c, a in low if a["noisy_acc"]["mean"] < 0.9]
    fitted = [f"{100 * x:.0f}% ({c})" for c, x, flat in low if flat]
    moving = [f"{100 * x:.0f}% ({c})" for c, x, flat in low if not flat]
    paper = " (the paper's baselines fit 74–100% of them after 300 epochs)."
    lines = []
    if fitted:
        lines.append("* Caveat: the un-penalised runs' training accuracy plateaued with only " + ", ".join(fitted)
                     + " of the noisy labels fitted: at that learning rate they do not memorise the rest, so there is "
                     "less memorisation there for the penalty to slow" + paper)
    if moving:
        lines.append("* Caveat: by the last step the un-penalised runs had fitted only " + ", ".join(moving)
                     + " of the noisy labels, so only the first part of the memorisation curve is observed" + paper)
    return lines
