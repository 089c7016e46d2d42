"""The score-only report: Tr(F) per layer by the score estimator Î1 with error bars from its own labels.

For models whose per-input Jacobian would not fit in memory (a language model over a real vocabulary:
tokens × vocabulary output numbers per input), the exact Fisher and the closed-form variances are out of
reach, since both pull back about one vector per output number. The score estimator pulls back ``k``
vectors per input, and its error bars come from the spread of its own draws
(:func:`torchfim.score_norms.squared_score_norms`): with ``k ≥ 2`` labels per input, the spread over an
input's labels measures the label noise alone, so the standard error is that of the estimate about
``Tr(F)`` of these inputs, as in the full report; the standard error of ``E_x Tr(F(x))`` with the inputs
taken as a sample of the data (input spread counted too) stands beside it. With targets, the empirical
Fisher's trace per layer is shown against the estimate.
"""

from __future__ import annotations

import math
import time
import warnings

import torch
from torch import nn

from .._words import counted
from . import settings
from .assemble import Layout, model_summary, ratio, samples_needed, versions
from .data import Data
from .kept_steps import KeptSteps
from .measure import Steps, json_float, measure_empirical
from .outputs import OutputLayout

__all__ = ["MIN_LABELS", "compute_score_only"]

#: Fewest labels per input of the score-only report: the spread of one input's labels is its error bar.
MIN_LABELS = 2


def compute_score_only(model: nn.Module, data: Data, fam, outputs: OutputLayout, *, n_samples: int, seed: int,
                       progress: bool, targets_note: str | None, reason: str, kept: KeptSteps | None = None) -> dict:
    """The score-only report.json dict; ``reason`` says why the exact parts were left out.

    ``max(n_samples, MIN_LABELS)`` labels per input (per position) are drawn with ``torch.Generator``
    seeded ``seed + 1``, as the full report draws its score estimate; ``kept`` keeps the finished steps
    (:mod:`.kept_steps`)."""
    from ..score_norms import ScoreNorms, squared_score_norms

    k = max(int(n_samples), MIN_LABELS)
    layout = Layout.of(model)
    opts = outputs.options(fam)
    timings: dict[str, float] = {}
    steps = Steps(2 if data.targets is not None else 1, progress, kept)

    def score_norms() -> dict:
        got = squared_score_norms(model, data.given(), **opts, n_samples=k, progress=progress,
                                  generator=torch.Generator().manual_seed(seed + 1))
        return {"names": got.names, "per_tensor": got.per_tensor}

    try:
        t0 = time.perf_counter()
        norms = ScoreNorms(**steps.run(f"score estimate ({counted(k, 'label')} per input)", score_norms))
        timings["trace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        diag_emp = measure_empirical(model, data.given(), data.targets, opts, steps)
        timings["empirical"] = time.perf_counter() - t0
    finally:
        steps.close()
    empirical = layout.per_layer(diag_emp) if diag_emp is not None else None
    whole = _entry(norms, None, None if empirical is None else sum(empirical), k)
    layers = [{"name": name, "shape": layout.shapes[i], "size": layout.sizes[i],
               **_entry(norms, name, None if empirical is None else empirical[i], k)}
              for i, name in enumerate(layout.names)]
    for layer in layers:
        layer["share_of_trace"] = json_float(ratio(layer["trace_score_estimate"], whole["trace_score_estimate"]))
    return {
        **versions(),
        "mode": "score_only",
        "mode_reason": reason,
        "family": fam.name,
        "outputs": outputs.to_json(),
        "n_samples": k,
        "rel_error": settings.REL_ERROR,
        "seed": seed,
        "model": model_summary(model, layout),
        "data": {"source": data.source, "n_inputs": data.n, "input_shape": data.input_shape(),
                 "has_targets": data.targets is not None, "targets_note": targets_note},
        "trace": whole,
        "layers": layers,
        "timings": timings,
    }


def _entry(norms, name: str | None, empirical: float | None, k: int) -> dict:
    """The report.json entry of one layer (``name``) or of the whole model (None); the labels per input
    for a relative standard error (one σ) of :data:`~torchfim.report.settings.REL_ERROR` from the one-label variance
    ``k·s.e.²`` that the draws estimate."""
    # Every input's k draws gave one value: the labels' spread was not seen, which is no exact Tr(F) (a zero error bar
    # would claim one, and one label per input enough); left out ("–"), and the text says so instead of a warning.
    unseen = norms.label_spread_unseen(name)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="every input's .* labels gave the same")
        estimate, stderr = norms.trace(name)
    stderr = math.nan if unseen else stderr
    _, stderr_inputs = norms.trace(name, inputs_as_sample=True)
    return {
        "trace_score_estimate": json_float(estimate),
        "trace_score_stderr": json_float(stderr),
        "label_spread_unseen": unseen,
        "trace_score_stderr_inputs": json_float(stderr_inputs),
        "samples_needed_score": samples_needed(k * stderr**2 if math.isfinite(stderr) else None, estimate,
                                               settings.REL_ERROR),
        "trace_empirical": json_float(empirical),
        "empirical_ratio": json_float(ratio(empirical, estimate)),
    }
