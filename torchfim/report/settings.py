"""The report's fixed choices: file names, defaults, and how many inputs the variance parts use."""

from __future__ import annotations

from .._words import counted
from .wording import MODES, option, said

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_OUT",
    "DEFAULT_EPOCHS",
    "DEFAULT_VARIANCE_INPUTS",
    "HESSIAN_BUDGET",
    "MIN_AUTO_VARIANCE_INPUTS",
    "DEFAULT_MAX_BLOCK",
    "REL_ERROR",
    "FILES",
    "EMPIRICAL_FIGURE",
    "SCORE_ONLY_FIGURE",
    "REPORT_FILES",
    "MODES",
    "FULL_REPORT_SECONDS",
    "SCATTER_POINTS_PER_LAYER",
    "variance_plan",
]

#: Version of the report.json layout (bumped when keys change meaning).
FORMAT_VERSION = 1
#: Default output directory.
DEFAULT_OUT = "torchfim-report"
#: The default model's training: this many epochs of Adam on the digits (about 1 s on one core), all of
#: them whatever they take, so the default model is the same for a seed on every run and every machine.
DEFAULT_EPOCHS = 30
#: Inputs used by the variance parts (the Hessian estimator costs a pass per parameter per input).
DEFAULT_VARIANCE_INPUTS = 256
#: Unless the number of variance inputs is given explicitly, the subset is shrunk so that
#: parameters × inputs stays under this (the Hessian-estimator parts cost one forward-over-forward
#: pass per parameter and input, :mod:`torchfim.trace_summary`; they took five, under a budget of
#: 4 M, before), but not below MIN_AUTO_VARIANCE_INPUTS; a model too large even for that gets the
#: score-estimator parts only (the Î2 numbers are None).
HESSIAN_BUDGET = 20_000_000
MIN_AUTO_VARIANCE_INPUTS = 16
#: Largest per-layer block whose eigenvalues are computed (a dense size² matrix and eigvalsh).
DEFAULT_MAX_BLOCK = 2048
#: Target relative standard error (one σ: s.e. ≤ REL_ERROR × value) for the samples-needed figure and columns,
#: as ``rel_error`` of :func:`torchfim.samples_needed`.
REL_ERROR = 0.1
#: At most this many diagonal entries per layer in the empirical-vs-true scatter (and report.json).
SCATTER_POINTS_PER_LAYER = 4000

#: Files every report has; ``empirical_vs_true.png`` is added when the data has targets.
FILES = (
    "report.md",
    "report.json",
    "model.pt",
    "overview.png",
    "trace_per_layer.png",
    "variance_per_layer.png",
    "samples_needed.png",
    "spectrum.png",
)
EMPIRICAL_FIGURE = "empirical_vs_true.png"
#: The one figure of a score-only report (:mod:`torchfim.report.score_only`), beside report.md, report.json
#: and model.pt.
SCORE_ONLY_FIGURE = "trace_score_only.png"
#: Every file name a report may write: the only files of ``--out`` it ever replaces or removes.
REPORT_FILES = (*FILES, EMPIRICAL_FIGURE, SCORE_ONLY_FIGURE)
#: Seconds the full report may take, by :func:`torchfim.report.cost.full_report_seconds`, before ``--mode auto``
#: gives the score-only report instead.
FULL_REPORT_SECONDS = 1800.0
#: How the reason of a score-only report that the caller asked for starts (its notes then advise no smaller
#: data), followed by the option that asked, in the caller's words (:mod:`.wording`).
ASKED_SCORE_ONLY = "asked for"


def variance_plan(variance_inputs: int | None, n: int, P: int, positions: int = 1) -> tuple[int, bool, str | None]:
    """``(m, with_hessian, note)``: the subset size for the variance parts and whether Î2's are done.

    An explicit ``variance_inputs`` is obeyed (capped at ``n``). Otherwise the default 256 shrinks
    so that ``P·m·positions ≤ HESSIAN_BUDGET`` (a forward-over-forward pass per parameter costs in
    proportion to the inputs and their output positions, e.g. tokens), down to MIN_AUTO_VARIANCE_INPUTS;
    past that the Hessian estimator's variances are skipped (the score estimator's stay, on min(n, 256)
    inputs).
    """
    if variance_inputs is not None:
        return min(int(variance_inputs), n), True, None
    m = min(DEFAULT_VARIANCE_INPUTS, n)
    per_input = P * max(1, positions)
    if per_input * m <= HESSIAN_BUDGET:
        return m, True, None
    affordable = HESSIAN_BUDGET // per_input
    where = counted(P, "parameter") + (f" and {positions} output positions per input" if positions > 1 else "")
    if affordable >= MIN_AUTO_VARIANCE_INPUTS:
        return int(affordable), True, (
            f"the variance subset was reduced from {m} to {affordable} inputs because the model has "
            f"{where}, and the Hessian estimator's variance costs a pass per parameter over the inputs; "
            f"pass {option('variance_inputs', metavar='N')} to choose (and wait for) another size"
        )
    return m, False, (
        f"the Hessian estimator's (Î2) variances were skipped: with {where} they would cost "
        f"{P} forward-over-forward passes over the inputs; pass {option('variance_inputs', metavar='N')} to compute "
        f"them anyway on N inputs (slow), or freeze parameters with requires_grad_(False){said(' in --model', '')}"
    )
