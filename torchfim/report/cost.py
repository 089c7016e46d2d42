"""How long the full report would take, estimated before it starts (the automatic mode's test of time,
beside the test of memory in :mod:`torchfim.report.check`).

The full report's costs that grow without bound grow with ``W``, the output numbers of one input
(classes × positions): its exact Fisher pulls back about ``W`` output vectors per input, and its
closed-form trace variances pull back all ``W`` together and form each parameter tensor's output Gram
matrix, ``W²`` multiply-adds per parameter and input. Over the report's passes (:mod:`.measure`, ``n``
inputs, ``m`` in the variance subset, ``S`` layers with a spectrum):

* pull-backs of one vector through one input: ``W·(3n + 3m + S·n)`` (exact trace and diagonal, the
  trace variances on all inputs; the subset's diagonal, trace variances and diagonal variances; one
  exact block per spectrum layer);
* Gram multiply-adds: ``W²·P·(n + 2m)`` (the trace variances on all inputs and on the subset, and the
  diagonal variances on the subset).

* with the Hessian estimator's variances, their sweep over the output-Hessian diagonals: one forward-over-forward
  pass per curved parameter entry ``E`` (those the outputs do not depend on piecewise linearly, and that no layer
  factors by unit) and input of the subset, ``E·m`` (:func:`time_hessian_sweep`).

A vector's pull-back and a chunk of the sweep are timed on the first inputs and the multiply-add rate on a matrix
product, all on this machine, so the estimate is in seconds. (The sweep was left out, as bounded by
:data:`~torchfim.report.settings.HESSIAN_BUDGET`: but that bounds its passes, not its time; on a 2-layer BERT
classifier of 5,891 parameters and 16 inputs it was 21 of the report's 24 s, estimated at 0.33 s in all.)
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from .data import Data

__all__ = ["PullBack", "Sweep", "time_pull_back", "time_hessian_sweep", "full_report_work", "full_report_seconds"]

#: Inputs over which one vector's pull-back is timed (per input: the report's passes batch them).
TIMED_INPUTS = 16


@dataclass(frozen=True)
class PullBack:
    """One output vector pulled back through one input, with its per-sample squares: seconds, and
    ``width``, the input's output numbers ``W``."""

    seconds: float
    width: int


def time_pull_back(model: nn.Module, data: Data, fam, mask: str | None, class_dim: int) -> PullBack:
    """Time one random output vector's pull-back through the first :data:`TIMED_INPUTS` inputs (the
    default backend, after one untimed run), per input: the best of three, as :func:`multiply_add_rate`'s (one
    timing taken while another program held the cores made a 10-second report "about 47 minutes" and sent the
    automatic mode to the score-only report, in a user trial)."""
    from ..engine.session import engine_pass

    with engine_pass(model, "auto", None, class_dim) as one:
        rec, _ = next(one.batches(data.given(slice(0, min(TIMED_INPUTS, data.n))), None, fam, mask, False, "report"))
        v = torch.randn(rec.batch.size, 1, rec.values.shape[1], dtype=rec.values.dtype, device=rec.values.device)
        one.backend.squares(rec, v)
        _finished(v)
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            one.backend.squares(rec, v)
            _finished(v)
            best = min(best, time.perf_counter() - start)
        return PullBack(best / rec.batch.size, int(rec.values.shape[1]))


@dataclass(frozen=True)
class Sweep:
    """The Hessian estimator's sweep through one input: ``seconds``, and ``entries``, the parameter entries ``E`` it
    passes along one forward-over-forward pass each."""

    seconds: float
    entries: int


def time_hessian_sweep(model: nn.Module, data: Data, fam, mask: str | None, class_dim: int) -> Sweep:
    """Time the Hessian estimator's sweep (:func:`torchfim.trace_summary.hessian_trace_variances`) per input on the
    first :data:`TIMED_INPUTS` inputs: the per-unit parts of the layers that factor whole, and one chunk of the
    directions swept one entry at a time, after one untimed chunk, scaled to all ``E`` of them. A model without
    forward-mode derivatives (whose Î2 variances the report skips) sweeps nothing: ``Sweep(0, 0)``."""
    from ..engine.backend import second_order_support
    from ..engine.session import engine_pass
    from ..variance import HessianVariance

    with engine_pass(model, "auto", None, class_dim) as one, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a sweep's projected-time warning is the report's to say, not this probe's
        rec, fam_b = next(one.batches(data.given(slice(0, min(TIMED_INPUTS, data.n))), None, fam, mask, False,
                                      "report"))
        backend, batch = one.backend, rec.batch
        try:
            with second_order_support():
                start = time.perf_counter()
                backend.unit_hessian_traces(batch)
                backend.unit_hessian_terms(batch, HessianVariance(backend, rec, fam_b, "exact").quadratic, 4)
                units = time.perf_counter() - start
                swept = backend.unfactored(batch)
                entries = sum(backend.layout.sizes[i] for i in swept)
                per_entry = _seconds_per_direction(backend, batch, swept)
        except Exception:  # noqa: BLE001 - no forward-mode rule: the report skips Î2's variances, and says why
            return Sweep(0.0, 0)
        return Sweep((units + per_entry * entries) / batch.size, entries)


def _seconds_per_direction(backend, batch, swept: list[int]) -> float:
    """Seconds of one direction's output-Hessian diagonals over ``batch``: the second chunk's pace (the first pays
    one-time costs; the only one where there is one)."""
    paces = []
    for _, columns in backend.direction_chunks(batch, swept):
        start = time.perf_counter()
        _finished(backend.output_hessian_diagonals(batch, columns))
        paces.append((time.perf_counter() - start) / len(columns))
        if len(paces) == 2:
            break
    return paces[-1] if paces else 0.0


def _finished(t: torch.Tensor) -> None:
    """Wait for the device's queued work (a GPU runs it after the call returns)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def full_report_work(width: int, n: int, m: int, parameters: int, spectra: int) -> tuple[int, int]:
    """``(pull-backs of one vector through one input, Gram multiply-adds)`` of the full report (module
    docstring): ``W·(3n + 3m + S·n)`` and ``W²·P·(n + 2m)``."""
    return width * (3 * n + 3 * m + spectra * n), width * width * parameters * (n + 2 * m)


def full_report_seconds(pull_back: PullBack, n: int, m: int, parameters: int, spectra: int,
                        dtype: torch.dtype, device: torch.device, sweep: Sweep | None = None) -> float:
    """The full report's estimated seconds on this machine (module docstring); ``sweep``: the Hessian estimator's,
    through each of the ``m`` inputs of the subset (None: no Î2 variances)."""
    pull_backs, multiply_adds = full_report_work(pull_back.width, n, m, parameters, spectra)
    hessian = 0.0 if sweep is None else m * sweep.seconds
    return pull_backs * pull_back.seconds + multiply_adds / multiply_add_rate(dtype, device) + hessian


def multiply_add_rate(dtype: torch.dtype, device: torch.device) -> float:
    """Multiply-adds per second of a 256 × 2048 by 2048 × 256 matrix product (best of three, after one)."""
    a = torch.randn(256, 2048, dtype=dtype, device=device)
    b = torch.randn(2048, 256, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(4):
        start = time.perf_counter()
        (a @ b).sum().item()  # .item(): the product has finished, on any device
        best = min(best, time.perf_counter() - start)
    return 256 * 2048 * 256 / max(best, 1e-9)
