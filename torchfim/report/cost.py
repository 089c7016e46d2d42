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

A vector's pull-back is timed on the first inputs and the multiply-add rate on a matrix product, both
on this machine, so the estimate is in seconds. The Hessian estimator's sweep is left out: its size is
bounded by :data:`~torchfim.report.settings.HESSIAN_BUDGET`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from .data import Data

__all__ = ["PullBack", "time_pull_back", "full_report_work", "full_report_seconds"]

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


def _finished(t: torch.Tensor) -> None:
    """Wait for the device's queued work (a GPU runs it after the call returns)."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def full_report_work(width: int, n: int, m: int, parameters: int, spectra: int) -> tuple[int, int]:
    """``(pull-backs of one vector through one input, Gram multiply-adds)`` of the full report (module
    docstring): ``W·(3n + 3m + S·n)`` and ``W²·P·(n + 2m)``."""
    return width * (3 * n + 3 * m + spectra * n), width * width * parameters * (n + 2 * m)


def full_report_seconds(pull_back: PullBack, n: int, m: int, parameters: int, spectra: int,
                        dtype: torch.dtype, device: torch.device) -> float:
    """The full report's estimated seconds on this machine (module docstring)."""
    pull_backs, multiply_adds = full_report_work(pull_back.width, n, m, parameters, spectra)
    return pull_backs * pull_back.seconds + multiply_adds / multiply_add_rate(dtype, device)


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
