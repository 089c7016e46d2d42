"""``summary.md``, generated from results.json alone: the setup, the tuning, the tables of each
claim, the ``prob_outperform`` lines, which claims held (:mod:`.claims`) and the figures."""

from __future__ import annotations

from typing import Any

from .claims import claims_text
from .settings import CLEAN_VARIANTS, LABELS, NOISY_VARIANTS, POOLED, lr_text, noisy_label

__all__ = ["summary", "pm"]


def summary(results: dict[str, Any], figures: list[str]) -> str:
    """``summary.md``: settings, tuning, tables, prob_outperform lines and which claims held."""
    s = results["settings"]
    lines = _setup(results) + _noise_setup(s) + _seeds_and_tuning(results) + _clean_table(results)
    lines += _noisy_table(results)
    lines += ["", "## prob_outperform (paired by seed)", "", "```"]
    for c in results["comparisons"]:
        lines.append(f"[{c['combo']}] {c['line']}")
    lines += ["```", "", "## Which claims held", ""]
    combos = [f"{d}/{m}" for d, m in s["combos"]]
    lines += claims_text({**s, "_tuning": results["tuning"]}, results["verdicts"], results["aggregates"], combos,
                         _noisy_settings(s))
    lines += ["", "## Figures", ""] + [f"* [{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _noisy_settings(s: dict) -> list[tuple[str, str, str]]:
    """(data set, model, learning-rate name) of every noisy-label configuration."""
    return [(d, m, w) for d, m in s["noisy_combos"] for w in s["noisy_lrs"]]


def pm(stat: dict | None, pct: bool = False, digits: int = 1) -> str:
    """``mean ± std`` of a :func:`~torchfim.experiments.explosion.assemble` statistic (``pct``: in %)."""
    if stat is None:
        return "n/a"
    k = 100.0 if pct else 1.0
    sd = stat["std"]
    return f"{k * stat['mean']:.{digits}f} ± {k * sd:.{digits}f}" if sd is not None else f"{k * stat['mean']:.{digits}f}"


def _setup(results: dict[str, Any]) -> list[str]:
    """Title and the study's setup: data, models, optimiser, Tr(F), penalty, tuning."""
    s = results["settings"]
    datasets = sorted({d for d, _ in s["combos"] + s["noisy_combos"]})
    models = sorted({m for _, m in s["combos"] + s["noisy_combos"]})
    small = f"η*/{s['lr_ratio']:g}"
    data_text = {
        "digits": f"scikit-learn digits (8×8; a test set of {100 * s['test_fraction']:g}% of the 1797 images, drawn per seed)",
        "mnist1d": "MNIST-1D (generated locally with the `mnist1d` package's recipe: "
        + ("4000 train / 1000 test sequences" if s["mnist1d_samples"] is None else f"{s['mnist1d_samples']} sequences, 80/20")
        + ")",
    }
    model_text = {
        "mlp": f"MLP d→{s['mlp_width']}→{s['mlp_width']}→10 (ReLU)",
        "cnn": f"CNN of 3 ReLU convolutions ({s['cnn_channels']} channels; 1-D on MNIST-1D, 2-D on the 8×8 digits), "
        "two max-pools and a linear head",
    }
    return [
        "# Catastrophic Fisher explosion at CPU scale",
        "",
        (f"Reproduction of Jastrzębski et al. (ICML 2021) with `torchfim explosion` (preset `{s['preset']}`, "
         f"master seed {results['master_seed']}, {s['n_seeds']} seeds per configuration). Every number is in "
         "`results.json`; this page is generated from it."),
        "",
        "## Setup",
        "",
        "* Data: " + "; ".join(data_text[d] for d in datasets)
        + f". Validation = {100 * s['val_fraction']:g}% of the training data, drawn per seed.",
        "* Models, no BatchNorm: " + "; ".join(model_text[m] for m in models) + ".",
        f"* SGD, momentum {s['momentum']}, batch {s['batch_size']}, constant learning rate, no weight decay, no augmentation; "
        + _budget(s, datasets)
        + ". Test accuracy is read at the step of the best validation accuracy (early stopping, the paper's "
        "headline), with the final test accuracy beside it.",
        ("* Tr(F): `torchfim.train.FisherTraceMonitor` (unbiased estimate from per-example squared score norms, one label "
         f"sampled from the model per input, with its standard error) on {s['monitor_inputs']} fixed training inputs, "
         f"every {s['eval_every_early']} steps before step {s['early_until']} and every {s['eval_every']} steps after. "
         "The figures show the mean over seeds with a min–max band (Tr(F)) or a ± 1 std band (accuracy); each measurement's own standard error is in `results.json` "
         "(`trace_stderr`), and its value at the peak is in the table below."),
        (f"* Fisher penalty: `torchfim.train.FisherPenalty(kind=\"batch_gradient\", every={s['fp_every']})` (the paper's "
         "Eq. 3; its gradient is recomputed every 10 steps and reused in between), from step 0."),
        (f"* η* is the learning rate of {list(s['lr_grid'])} with the best validation accuracy over training (the "
         f"maximum over its measurements), averaged over {s['n_tuning_seeds']} tuning seeds (a rate that diverged on "
         f"any of them is excluded; ties go to the smaller value); the small learning rate is {small}. α is the value "
         f"of {list(s['alpha_grid'])} with the best mean of the same criterion at {small} with the penalty (ties: the "
         "smaller), on the same tuning seeds. No tuning seed is an evaluation seed."),
    ]


def _noise_setup(s: dict) -> list[str]:
    """The label-noise bullet of the setup (claim c)."""
    if not _noisy_settings(s):
        return []
    ncombos = [f"{d}/{m}" for d, m in s["noisy_combos"]]
    lrs = " and ".join(lr_text(w, s) for w in s["noisy_lrs"])
    return [
        f"* Label noise (claim c), on {', '.join(ncombos)}: {100 * s['noise_fraction']:g}% of the training labels "
        "redrawn uniformly from the 10 classes (a redraw may equal the true label, as in the paper); the *noisy* "
        "subset is the examples whose label changed, the *clean* subset the rest. Validation and test labels "
        f"are clean. Learning rate {lrs} (the paper does not say which learning rate its noisy-label runs used), "
        f"each with and without the penalty. Its α is tuned on the noisy-label runs at that learning rate, as the "
        f"paper tunes α separately there: the value of {list(s['noisy_alpha_grid'])} with the best mean (over the "
        "tuning seeds) of the best validation accuracy over training (ties: the smaller)."
        + (
            f" A third configuration uses a fixed α = {s['noisy_fixed_alpha']:g} (the top of the digest's grid), to "
            "test the memorisation claim at a strength where the penalty acts whatever validation prefers."
            if s["noisy_fixed_alpha"] else ""
        )
    ]


def _seeds_and_tuning(results: dict[str, Any]) -> list[str]:
    """How seeds are used, and the tuning tables."""
    s = results["settings"]
    small = f"η*/{s['lr_ratio']:g}"
    lines = [
        ("* Seeds: `torchfim.compare.seeds` gives one master seed per seed index, which `derive_seeds` splits into the "
         "seeds of the initialisation, data order, data split (validation/test sets, held Tr(F) inputs), label noise and "
         "label sampling (penalty and monitor). All configurations of one seed index share it, so comparisons are "
         "paired. `prob_outperform` (Bouthillier et al. 2021): 95% percentile-bootstrap interval; 'A better' only when "
         "the interval lies above 0.5 and reaches 0.75, and the exact two-sided sign test agrees at 5%."),
        "",
        f"## Tuning ({s['n_tuning_seeds']} seeds)",
        "",
        "Best validation accuracy over training, mean over the tuning seeds, per grid value (grid order).",
        "",
        f"| data/model | per η | η* | per α at {small} with the penalty | α |",
        "|---|---|---|---|---|",
    ]
    for combo, t in results["tuning"].items():
        va = _percents(t["lr_best_val_acc"], "diverged")
        aa = _percents(t.get("alpha_best_val_acc", []), "diverged")
        alpha = "—" if "alpha" not in t else format(t["alpha"], "g")
        lines.append(f"| {combo} | {va} | {t['lr_star']:g} | {aa or '—'} | {alpha} |")
    noisy_rows = [(c, w, n) for c, t in results["tuning"].items() for w, n in t.get("noisy", {}).items()]
    if noisy_rows:
        lines += [
            "",
            "| data/model, noisy labels | η | per α | final noisy-subset train acc. per α (mean) | α |",
            "|---|---|---|---|---|",
        ]
        for combo, w, n in noisy_rows:
            va = _percents(n["alpha_best_val_acc"], "diverged")
            na = _percents(n["alpha_final_noisy_acc"], "n/a")
            lines.append(f"| {combo} | {lr_text(w, s)} = {n['lr']:.4g} | {va} | {na} | {n['alpha']:g} |")
    return lines


def _percents(values: list, missing: str) -> str:
    return ", ".join(missing if x is None else f"{100 * x:.1f}%" for x in values)


def _clean_table(results: dict[str, Any]) -> list[str]:
    """Claims (a) and (b): per configuration, the accuracies and Tr(F) over seeds, and the gap closed."""
    s, agg = results["settings"], results["aggregates"]
    combos = [f"{d}/{m}" for d, m in s["combos"]]
    lines = [
        "",
        "## (b) Test accuracy: the small learning rate and the penalty",
        "",
        ("Mean ± std over the evaluation seeds. The headline is the test accuracy at the step of the best validation "
         "accuracy; 'epochs' = the least and the most epochs its runs trained; 'plateaued' = the mean training "
         f"accuracy moved by at most {_points(s)} over the last fifth of "
         "training."),
        "",
        ("| data/model | config | η | α | test acc. at best val. (%) | step of best val. | final test acc. (%) "
         f"| final train acc. (%) | train acc. at 4/5 of training (%) | epochs | plateaued | {_DIVERGED_HEADER} |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for combo in combos:
        for v in CLEAN_VARIANTS:
            a = agg[combo][v]
            lines.append(
                f"| {combo} | {LABELS[v]} | {a['lr']:.4g} | {a['alpha']:g} | {pm(a['test_acc_at_best_val'], True)} | "
                f"{pm(a['step_of_best_val'], digits=0)} | {pm(a['test_acc'], True)} | {pm(a['train_acc'], True)} | "
                f"{pm(a['train_acc_at_four_fifths'], True)} | {_epochs(a.get('epochs'))} | {_yes_no(a['plateaued'])} | "
                f"{_diverged(a)} |"
            )
    if combos:
        lines += ["", ("Fraction of the small-vs-large gap closed by the penalty, (FP − small)/(large − small) on the seed "
                  "means, with a 95% bootstrap interval over the paired seeds (1 = as good as η*, 0 = no effect):"), ""]
        for c in combos + ([POOLED] if POOLED in agg else []):
            pooled = c == POOLED
            lines.append(f"* {c}: at the best validation step {_gap(agg[c]['gap_closed'], pooled)}; final "
                         f"{_gap(agg[c]['gap_closed_final'], pooled)}")
    return _trace_table(results, combos) + lines


#: The column of the runs that diverged, shown at 0 too: a reader sees that divergence was checked.
_DIVERGED_HEADER = "diverged (loss or outputs non-finite)"


def _diverged(a: dict) -> str:
    """``1/6``: the runs of a configuration that diverged, of all its seeds."""
    return f"{a['diverged']}/{len(a['per_seed'])}"


def _budget(s: dict, datasets: list[str]) -> str:
    """The training budget of the setup: the least epochs, the plateau rule and the most epochs, per data set."""
    most = dict(s.get("max_epochs", ()))
    return (
        "each run trains at least " + ", ".join(f"{ep} epochs on {d}" for d, ep in s["epochs"] if d in datasets)
        + f", then on until its training accuracy has plateaued (moved by at most {_points(s)} over the last fifth "
        "of its steps, checked every tenth of the least epochs), up to "
        + ", ".join(f"{max(most.get(d, 0), ep)} on {d}" for d, ep in s["epochs"] if d in datasets)
        + " (the tables give the epochs each configuration trained, and whether its mean over seeds had plateaued)"
    )


def _points(s: dict) -> str:
    """The plateau tolerance of the settings ``s`` in words: ``1 percentage point``, ``0.5 percentage points``."""
    points = 100 * s["plateau_tolerance"]
    return f"{points:g} percentage point{'' if points == 1 else 's'}"


def _epochs(stat: dict | None) -> str:
    """``100`` or ``100–160``: the least and the most epochs of a configuration's runs (``n/a`` where unrecorded)."""
    if stat is None:
        return "n/a"
    low, high = min(stat["values"]), max(stat["values"])
    return f"{low:.0f}" if low == high else f"{low:.0f}–{high:.0f}"


def _yes_no(flag: bool | None) -> str:
    return "n/a" if flag is None else "yes" if flag else "no"


def _mean_change(before: dict | None, after: dict | None) -> str:
    """``90.1 → 92.9``: two seed means in percent (``n/a`` where a run lacks either)."""
    if before is None or after is None:
        return "n/a"
    return f"{100 * before['mean']:.1f} → {100 * after['mean']:.1f}"


def _gap(g: dict, pooled: bool = False) -> str:
    """``0.42 [0.10, 0.95]`` (the point value and its bootstrap interval), or why there is none; ``pooled``: the
    gap is the sum of the settings' gaps (the fraction's denominator), and says so."""
    gap = (f"{'Σ over the settings of ' if pooled else ''}η* − η*/10 = {100 * g['gap']:+.1f} points "
           f"[{100 * g['gap_ci_low']:+.1f}, {100 * g['gap_ci_high']:+.1f}]")
    if g["value"] is None or g["gap_ci_low"] <= 0:
        return f"no clear gap to close ({gap})"
    return f"{g['value']:.2f} [{g['ci_low']:.2f}, {g['ci_high']:.2f}] ({gap})"


def _trace_table(results: dict[str, Any], combos: list[str]) -> list[str]:
    """Claim (a): peak and early-phase Tr(F) per configuration."""
    s, agg = results["settings"], results["aggregates"]
    lines = [
        "",
        "## (a) Tr(F) early in training",
        "",
        ("Mean ± std over seeds. Peak Tr(F) is the largest measurement after the first epoch (the paper's Table 4); Tr(Fᵢ) is the "
         f"paper's early-phase value, Tr(F) at the first measurement where the training loss is at or below ε = "
         f"{s['loss_threshold']:g} (ln 10 ≈ 2.3 at initialisation), with the step it happens at."),
        "",
        "| data/model | config | peak Tr(F) | its std. error (mean) | step of peak | Tr(Fᵢ) | step of Tr(Fᵢ) |",
        "|---|---|---|---|---|---|---|",
    ]
    for combo in combos:
        for v in CLEAN_VARIANTS:
            a = agg[combo][v]
            err = a["stderr_at_peak"]["mean"] if a["stderr_at_peak"] else None
            lines.append(
                f"| {combo} | {LABELS[v]} | {pm(a['peak_trace'], digits=1)} | "
                f"{'n/a' if err is None else format(err, '.1f')} | {pm(a['step_of_peak_trace'], digits=0)} | "
                f"{pm(a['trace_at_threshold'], digits=1)} | {pm(a['step_at_threshold'], digits=0)} |"
            )
    if combos:
        lines += ["", "Ratio of mean peak Tr(F), small / large learning rate: "
                  + ", ".join(f"{c}: {agg[c]['peak_ratio_small_over_large']:.2f}" for c in combos) + "."]
    return lines


def _noisy_table(results: dict[str, Any]) -> list[str]:
    """Claim (c): the fitting of clean and noisy labels, per configuration."""
    s, agg = results["settings"], results["aggregates"]
    nsets = _noisy_settings(s)
    if not nsets:
        return []
    lines = [
        "",
        "## (c) Memorisation of noisy labels",
        "",
        ("Train accuracy against the labels used for training, on the clean and on the noisy subset (chance on the "
         "noisy subset is below 10%, since its labels differ from the true ones). 'Mean over training' averages all "
         "measurements over the least epochs, which every run trains (an area under the learning curve: lower = "
         "slower fitting). 'Train' is the accuracy on the whole training set against those labels, at four fifths of "
         f"training and at its end; 'plateaued' = its mean moved by at most {_points(s)} in between; 'epochs' = the "
         "least and the most epochs its runs trained."),
        "",
        ("| data/model, η | config | clean final (%) | noisy final (%) | clean mean over training (%) | noisy mean over "
         "training (%) | train at 4/5 → final (%) | epochs | plateaued | test acc. at best val. (%) | final test acc. "
         f"(%) | peak Tr(F) | {_DIVERGED_HEADER} |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for d, m, w in nsets:
        label = noisy_label(d, m, w, s)
        for v in [v for v in NOISY_VARIANTS if v in agg[label]]:
            a = agg[label][v]
            lines.append(
                f"| {d}/{m}, {lr_text(w, s)} | {LABELS[v]} (η={a['lr']:.4g}, α={a['alpha']:g}) | "
                f"{pm(a['clean_acc'], True)} | {pm(a['noisy_acc'], True)} | {pm(a['clean_acc_auc'], True)} | "
                f"{pm(a['noisy_acc_auc'], True)} | {_mean_change(a['train_acc_at_four_fifths'], a['train_acc'])} | "
                f"{_epochs(a.get('epochs'))} | {_yes_no(a['plateaued'])} | {pm(a['test_acc_at_best_val'], True)} | "
                f"{pm(a['test_acc'], True)} | {pm(a['peak_trace'], digits=1)} | {_diverged(a)} |"
            )
    lines += [
        "",
        "Penalty / no-penalty ratio of the mean-over-training accuracy (mean ± std over seeds; below 1 = slower): "
        + "; ".join(
            f"{d}/{m} at {lr_text(w, s)}, {LABELS[fp]}: "
            f"clean {pm(agg[noisy_label(d, m, w, s)][f'{fp}_over_base_clean_auc'], digits=2)}, "
            f"noisy {pm(agg[noisy_label(d, m, w, s)][f'{fp}_over_base_noisy_auc'], digits=2)}"
            for d, m, w in nsets
            for fp in ("fp", "fp_fixed")
            if f"{fp}_over_base_clean_auc" in agg[noisy_label(d, m, w, s)]
        )
        + ".",
    ]
    return lines
