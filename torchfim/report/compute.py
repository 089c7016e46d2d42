"""Computing a report: check the model and data, choose the subsets, measure, assemble."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import replace

import torch
from torch import nn

from .._memory import fits_in_memory
from .._words import counted
from ..engine.loop import without_backend_choice
from ..engine.private_tree import unwrapped
from ..errors import TorchfimError, warn_user
from . import settings
from .assemble import Layout, Setup, assemble
from .check import check_model_and_data
from .cost import full_report_seconds, time_hessian_sweep, time_pull_back
from .data import Data
from .kept_steps import KeptSteps
from .measure import Steps, measure_empirical, measure_rounding, measure_spectra, measure_trace, measure_variances
from .rounding import CHECK_INPUTS
from .score_only import compute_score_only
from .warned import library_warnings
from .wording import from_command_line, option

__all__ = ["compute_report"]


def compute_report(
    model: nn.Module,
    data: Data,
    family: str = "categorical",
    *,
    n_samples: int = 1,
    variance_inputs: int | None = None,
    max_block: int = settings.DEFAULT_MAX_BLOCK,
    seed: int = 0,
    rel_error: float = settings.REL_ERROR,
    progress: bool = True,
    mask: str | None = None,
    class_dim: int | None = None,
    score_only: bool | None = None,
    keep_in: str | os.PathLike | None = None,
) -> dict:
    """Every number of the report, as a JSON-ready dict (see :mod:`torchfim.report` for what and how).

    ``model`` is put in eval mode. ``n_samples`` is the labels per input of the score estimate and
    its error bars; the variance comparison is for one label per input (divide by k for k labels).
    The variance subset is ``torch.randperm(n, generator=manual_seed(seed))[:m]``, sorted. Outputs
    with positions ``(batch, *positions, C)`` (or ``(batch, C, *positions)`` with ``class_dim=1``; None reads the
    classes last, with a note where there are two or more position dims) are read one vector per position, those where the dict inputs' entry ``mask`` is 0 left out, as
    :func:`torchfim.fisher` reads them (see :mod:`torchfim.report.outputs`).

    ``score_only``: True computes the score-only report (:mod:`torchfim.report.score_only`: Tr(F) per
    layer by the score estimator with ``max(n_samples, 2)`` labels per input and error bars from their
    spread, the empirical Fisher beside it); None (default) does so only where the exact Fisher and the
    closed forms would not fit in memory (a language model over a real vocabulary) or would take longer
    than :data:`~torchfim.report.settings.FULL_REPORT_SECONDS` (:mod:`torchfim.report.cost`), saying why in
    the report; False computes the full report whatever it takes, and refuses a model that does not fit.

    ``keep_in``: a folder where each step's result is kept as it finishes (:mod:`.kept_steps`), so that the
    same report computed again after an interruption reads the finished steps back (report.json's
    ``resumed_steps`` counts them); None keeps nothing.

    torchfim's warnings while it computes (a model ending in a softmax under the categorical family) are
    report.json's ``warnings`` (:mod:`.warned`), each once; a Gaussian family's σ is its ``sigma``.
    """
    from ..families import Gaussian, get_family

    if score_only not in (None, True, False):
        raise TorchfimError(f"score_only must be None (automatic), True or False, got {score_only!r}")
    fam = get_family(family)
    with library_warnings() as warned, without_backend_choice():  # the report takes no backend=: its refusals name none
        results = _compute(model, data, fam, n_samples, variance_inputs, max_block, seed, rel_error, progress, mask,
                           class_dim, score_only, keep_in)
    results["warnings"] = warned
    if isinstance(fam, Gaussian):
        results["sigma"] = fam.sigma
    return results


def _compute(model, data, fam, n_samples, variance_inputs, max_block, seed, rel_error, progress, mask, class_dim,
             score_only, keep_in) -> dict:
    """:func:`compute_report`'s results, but for the warnings and σ."""
    # The inner module of torch.compile's or a data-parallel wrapper: the engine computes on it, so its results
    # are by its parameter names (the wrapper's, ``_orig_mod.``/``module.``, were looked up and raised KeyError).
    model = unwrapped(model)
    model.eval()
    data, targets_note, outputs, beyond = check_model_and_data(model, data, fam, fam.name, mask, class_dim)
    if beyond is not None and score_only is False:
        raise TorchfimError(
            f"{beyond}; for the score-only report pass {option('score_only', True)} (or {option('score_only', None)}, "
            "which chooses it here), or report on fewer output numbers (shorter sequences, a model with fewer classes)")
    measured_time = score_only is None and beyond is None  # the time estimate then sizes the subset and spectra
    layout = Layout.of(model)
    m, with_hessian, variance_note = settings.variance_plan(variance_inputs, data.n, layout.n_parameters,
                                                            math.prod(outputs.positions))
    spectrum_layers = [i for i, s in enumerate(layout.sizes) if s <= max_block]
    _check_blocks_fit(model, layout, spectrum_layers, max_block)
    if (score_only is None or (score_only is False and progress)) and beyond is None:  # asked for: the estimate only
        reason = _too_long(model, data, fam, outputs, layout.n_parameters, m, len(spectrum_layers), progress,
                           falls_back=score_only is None, with_hessian=with_hessian)
        beyond = reason if score_only is None else None
    scoring_only = bool(score_only or beyond is not None)
    sized = measured_time or not scoring_only  # the subset and the spectra shape the steps, or chose score-only
    options = {"family": (type(fam).__qualname__, repr(fam), dict(getattr(fam, "__dict__", {}))),
               "n_samples": n_samples, "seed": seed, "m": m if sized else None,
               "max_block": max_block if sized else None, "mask": mask, "class_dim": class_dim,
               "with_hessian": with_hessian if sized else None, "score_only": scoring_only,
               # steps kept before every library call took the labels (a dict's, then a tensor's -100) are not read back
               "observed": "the mask's positions that the labels score, a dict's or a tensor's"}
    kept = KeptSteps.of(keep_in, model, data, options)
    if scoring_only:
        reason = beyond or f"{settings.ASKED_SCORE_ONLY} ({option('score_only', True)})"
        return {**compute_score_only(model, data, fam, outputs, n_samples=n_samples, seed=seed, progress=progress,
                                     targets_note=targets_note, reason=reason, kept=kept),
                "unused_options": {} if measured_time else _full_report_options(variance_inputs, max_block),
                "resumed_steps": kept.resumed}
    setup = Setup(
        family=fam.name, n_samples=int(n_samples), seed=seed, rel_error=rel_error, max_block=max_block,
        subset=torch.randperm(data.n, generator=torch.Generator().manual_seed(seed))[:m].sort().values,
        with_hessian=with_hessian, spectrum_layers=spectrum_layers,
        targets_note=targets_note, variance_note=variance_note, outputs=outputs,
    )
    measured, timings = _measure(model, data, fam, layout, setup, progress, kept)
    if measured["hessian_skipped"] is not None:
        notes = [n for n in (setup.variance_note, measured["hessian_skipped"]) if n]
        setup = replace(setup, with_hessian=False, variance_note="; ".join(notes))
    return {**assemble(model, data, layout, setup, measured, timings), "resumed_steps": kept.resumed}


def _full_report_options(variance_inputs: int | None, max_block: int) -> dict:
    """The options of the full report's variances and spectra that the caller set: unused by a score-only report
    that was asked for or chosen for memory (its Re-create line leaves them out; a time estimate uses them)."""
    unused = {} if variance_inputs is None else {"variance_inputs": variance_inputs}
    if max_block != settings.DEFAULT_MAX_BLOCK:
        unused["max_block"] = max_block
    return unused


def _too_long(model: nn.Module, data: Data, fam, outputs, parameters: int, m: int, spectra: int,
              progress: bool, falls_back: bool, with_hessian: bool = True) -> str | None:
    """Why the full report would take too long (over :data:`~torchfim.report.settings.FULL_REPORT_SECONDS`
    by :func:`.cost.full_report_seconds`), or None; with ``progress``, a full report of more than a minute that
    will run says its estimate first (its progress bar's steps are of very uneven length, so the bar's own time
    left swings): where it is asked for, or within its budget where ``falls_back`` (the automatic mode) would
    otherwise give the score-only report. The command line prints the estimate; a caller of the API is warned
    (a RuntimeWarning, shown at once: :mod:`.warned`), so that its filters decide. ``with_hessian``: the Î2
    variances' sweep over the ``m`` inputs of the subset is counted too."""
    pull_back = time_pull_back(model, data, fam, outputs.mask, outputs.class_dim)
    sweep = time_hessian_sweep(model, data, fam, outputs.mask, outputs.class_dim) if with_hessian else None
    first = next(p for p in model.parameters() if p.requires_grad)
    seconds = full_report_seconds(pull_back, data.n, m, parameters, spectra, first.dtype, first.device, sweep)
    if progress and 60 < seconds and (seconds <= settings.FULL_REPORT_SECONDS or not falls_back):
        note = (f"torchfim report: the full report will take about {seconds / 60:,.0f} min here (estimated from a "
                f"timed pull-back of {pull_back.width:,} output numbers per input); the score-only report "
                f"({option('score_only', True)}) takes a fraction of it")
        if from_command_line():
            print(note, file=sys.stderr, flush=True)
        else:
            warn_user(note)
    if seconds <= settings.FULL_REPORT_SECONDS:
        return None
    return (f"the full report would take about {seconds / 60:,.0f} min here, more than its budget of "
            f"{settings.FULL_REPORT_SECONDS / 60:.0f}: over the {counted(data.n, 'input')} it pulls back about "
            f"{pull_back.width:,} output vectors per input and forms output Gram matrices of {pull_back.width:,}² "
            "entries per parameter" + _sweep_text(sweep, m) + " (estimated from a timed pull-back"
            + (", a timed chunk of the Hessian sweep" if sweep is not None and sweep.entries else "")
            + f" and a timed matrix product); pass {option('score_only', False)} to compute it anyway")


def _sweep_text(sweep, m: int) -> str:
    """The Î2 variances' part of the estimate, where they take a sweep: its passes and minutes, and the option that
    shortens it."""
    if sweep is None or not sweep.entries:
        return ""
    seconds = m * sweep.seconds
    took = f"{seconds / 60:,.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return (f", and the Hessian estimator's variances take one forward-over-forward pass per parameter entry and "
            f"input of the subset ({sweep.entries:,} × {m:,}, about {took}: a smaller {option('variance_inputs')} "
            "shortens it)")


def _check_blocks_fit(model: nn.Module, layout: Layout, spectrum_layers: list[int], max_block: int) -> None:
    """Refuse, before any work, a ``max_block`` that lets in a layer whose dense block (float64, for its spectrum)
    would not fit in memory: it failed minutes in, naming the Python API's options (a user trial)."""
    if not spectrum_layers:
        return
    largest = max(spectrum_layers, key=lambda i: layout.sizes[i])
    size = layout.sizes[largest]
    device = next(model.parameters()).device
    fits, needed, free = fits_in_memory(size * size, torch.float64, device)
    if not fits:
        raise TorchfimError(
            f"{option('max_block', max_block)} lets in layer {layout.names[largest]!r} of "
            f"{counted(size, 'parameter', spec=',')}, whose {size:,}×{size:,} block for its spectrum needs "
            f"{needed:.1f} GiB, more than the {free:.1f} GiB free; pass a {option('max_block')} below {size:,} (the "
            f"default is {settings.DEFAULT_MAX_BLOCK:,})")


def _total_steps(setup: Setup, has_targets: bool) -> int:
    return 5 + 3 + (1 if setup.with_hessian else 0) + len(setup.spectrum_layers) + (1 if has_targets else 0)


def _measure(model: nn.Module, data: Data, fam, layout: Layout, setup: Setup, progress: bool,
             kept: KeptSteps) -> tuple[dict, dict]:
    """The four measurement parts in turn, with their wall-clock seconds (of this run: a step ``kept`` from an
    interrupted one takes none)."""
    X, names, opts = data.given(), layout.names, setup.outputs.options(fam)
    timings: dict[str, float] = {}
    steps = Steps(_total_steps(setup, data.targets is not None), progress, kept)
    try:
        t0 = time.perf_counter()
        measured = measure_trace(model, X, opts, names, setup.n_samples, setup.seed, steps)
        draw = torch.Generator().manual_seed(setup.seed)  # as the variance subset is drawn: 8 of its inputs, or all
        checked = torch.randperm(data.n, generator=draw)[:CHECK_INPUTS].sort().values
        measured["rounding"] = measure_rounding(model, data.given(checked), opts, names, setup.seed, steps)
        timings["trace"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        measured.update(measure_variances(model, data.given(setup.subset), opts, names, setup.with_hessian, steps))
        timings["variance"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        measured["spectra"] = measure_spectra(model, X, opts, names, setup.spectrum_layers, steps)
        timings["spectrum"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        measured["diag_emp"] = measure_empirical(model, X, data.targets, opts, steps)
        timings["empirical"] = time.perf_counter() - t0
    finally:
        steps.close()
    return measured, timings
