"""The performance targets, evaluated on one run's timings (paired ratios, :mod:`.pairing`) and sweep."""

from __future__ import annotations

from .pairing import ratio
from .sweep import live_peak, loglog_slope

__all__ = ["evaluate_targets"]


def evaluate_targets(main: dict, details: dict) -> list[dict]:
    """Each target with this run's value, its limit and met / missed / n/a: ``main`` the run's medians,
    ``details`` its sibling (samples and their turns for paired ratios, the sweep)."""
    targets = []
    sweep = details.get("sweep", [])

    def _ratio(w1: str, c1: str, w2: str, c2: str) -> float | None:
        return ratio(main, details, w1, c1, w2, c2)

    def add(text: str, value: float | None, limit: float, strict: bool = False, unit: str = "×", why: str = "",
            passes: float | None = None, by_hand: float | None = None) -> None:
        if value is None:
            status = "n/a"
        else:
            status = "met" if (value < limit if strict else value <= limit) else "missed"
        targets.append({"target": text, "value": value, "limit": limit, "strict": strict, "unit": unit,
                        "status": status, "note": why, "passes": passes, "by_hand": by_hand})

    for which, label in (("mlp", "MLP-A"), ("cnn", "CNN")):
        w = f"diag-score-{which}"
        add(f"diag/score (1 label), {label}: torchfim ≤ 1.5× floor", _ratio(w, "torchfim", w, "floor"), 1.5)
        add(f"diag/score (1 label), {label}: torchfim faster than nngeometry",
            _ratio(w, "torchfim", w, "nngeometry"), 1.0, strict=True)
        add(f"diag/score (1 label), {label}: torchfim faster than BackPACK",
            _ratio(w, "torchfim", w, "backpack"), 1.0, strict=True)
    for which, label in (("mlp", "MLP-A"), ("cnn", "CNN")):
        w = f"diag-exact-{which}"
        add(f"diag/exact, {label}: torchfim ≤ 4× floor", _ratio(w, "torchfim", w, "floor"), 4.0,
            passes=_ratio(w, "arithmetic", w, "floor"))
        add(f"diag/exact, {label}: torchfim ≤ 0.6× BackPACK DiagGGNExact",
            _ratio(w, "torchfim", w, "backpack"), 0.6)
    add("full/exact, MLP-S: torchfim ≤ 0.5× curvlinops dense GGN",
        _ratio("full-exact-mlps", "torchfim", "full-exact-mlps", "curvlinops"), 0.5)
    # Two workloads, timed minutes apart: each time is divided by the floor of its own workload (the
    # same MLP-A), so that a change in the machine's speed between them cancels out.
    var_floor = _ratio("variance-score-diag-mlp", "torchfim", "variance-score-diag-mlp", "floor")
    exact_floor = _ratio("diag-exact-mlp", "torchfim", "diag-exact-mlp", "floor")
    add("fisher_variance diag/score ≤ 2× torchfim's own diag/exact (MLP-A)",
        var_floor / exact_floor if var_floor is not None and exact_floor else None, 2.0,
        why="the two are different workloads, timed minutes apart, so the ratio is taken between their "
            "ratios to the floor (the same MLP-A in both), which cancels changes in the machine's speed")
    add("penalty step, every=1: ≤ 2× plain SGD step",
        _ratio("penalty-step-mlp", "torchfim", "penalty-step-mlp", "plain"), 2.0)
    add("penalty step, every=10: ≤ 1.2× plain SGD step",
        _ratio("penalty-step-mlp", "torchfim-every10", "penalty-step-mlp", "plain"), 1.2)
    for every, limit in ((1, 2.2), (10, 1.2)):
        suffix = "" if every == 1 else f"-every{every}"
        add(f"penalty step with the finite-difference gradient, every={every}: ≤ {limit}× plain SGD step",
            _ratio("penalty-step-mlp", f"torchfim-fd{suffix}", "penalty-step-mlp", "plain"), limit,
            passes=_ratio("penalty-step-mlp", f"arithmetic{suffix}", "penalty-step-mlp", "plain"),
            by_hand=_ratio("penalty-step-mlp", "by-hand", "penalty-step-mlp", "plain") if every == 1 else None)
    add("Tr(F) monitor every 10 steps on a subset of 32 held inputs: < 10 % of training (< 1.1× plain)",
        _ratio("monitor-every10-mlp", "torchfim-subset32", "monitor-every10-mlp", "plain"), 1.1,
        strict=True, by_hand=_ratio("monitor-every10-mlp", "by-hand", "monitor-every10-mlp", "plain"))
    for which, score, exact in (("transformer", 1.6, 7.0), ("resnet", 1.4, 6.0)):
        add(f"diag/score (1 label), {which}: torchfim ≤ {score}× floor",
            _ratio(f"diag-score-{which}", "torchfim", f"diag-score-{which}", "floor"), score)
        w = f"diag-exact-{which}"
        add(f"diag/exact, {which}: torchfim ≤ {exact:g}× floor", _ratio(w, "torchfim", w, "floor"), exact,
            passes=_ratio(w, "arithmetic", w, "floor"))
    add("diag/score (1 label per token), causal LM: torchfim ≤ 2× floor",
        _ratio("diag-score-lm", "torchfim", "diag-score-lm", "floor"), 2.0)
    add("variance_bound(score, diag), 100 classes, 256 inputs: < 10× fisher(diag)",
        _ratio("bound-score-c100", "torchfim", "bound-score-c100", "torchfim-diag"), 10.0, strict=True)

    width = sorted((p for p in sweep if p.get("axis") == "width" and live_peak(p) is not None), key=lambda p: p["P"])
    upper = [p for p in width if p["P"] >= 1e4] or width
    slope = loglog_slope([p["P"] for p in upper], [live_peak(p) for p in upper])
    add("peak memory of diag/exact at most linear in P (log-log slope of live peak vs P, P ≥ 1e4)", slope, 1.1,
        unit="", why="slope ≤ 1.1: no faster than linear; a fixed-size chunk of per-sample products makes "
                     "it sub-linear for small P")
    sizes = sorted((p for p in sweep if p.get("axis") == "n" and live_peak(p) is not None), key=lambda p: p["n"])
    growth = None
    if len(sizes) >= 2:
        growth = live_peak(sizes[-1]) / max(live_peak(sizes[0]), 1e-9)
    add("peak memory of diag/exact not growing with data-set size (live peak at the largest n / at the smallest)",
        growth, 1.25, why="≤ 1.25: flat, over a 64-fold range of n; the data set itself is allocated before the "
                         "baseline; the glibc-default peaks, which creep up by a few MiB through heap "
                         "fragmentation, are in the sweep table")
    return targets
