"""Whether contenders computed the same numbers: relative errors and the agreeing group."""

from __future__ import annotations

import math

import torch

__all__ = ["rel_error", "agreement"]


def rel_error(a: object, b: object) -> float:
    """``‖a − b‖ / max(‖a‖, ‖b‖)`` over all entries (float64); NaN/Inf or a shape mismatch → inf."""
    a = torch.as_tensor(a).detach().to(torch.float64).reshape(-1).cpu()
    b = torch.as_tensor(b).detach().to(torch.float64).reshape(-1).cpu()
    if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    diff = float((a - b).norm())
    scale = max(float(a.norm()), float(b.norm()))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def agreement(results: dict[str, object], tol: float, prefer: str = "torchfim") -> tuple[str | None, dict[str, float], dict[str, float]]:
    """Pivot, each result's rel. error to the pivot, and the flagged ones (outside the agreeing group).

    The pivot is the result that agrees with the most others (ties: ``prefer``); a result
    agreeing with the pivot passes. With two results that disagree the pivot is ``prefer`` and
    the other is flagged — the report says so, since two results cannot tell which is wrong.
    """
    names = list(results)
    if not names:
        return None, {}, {}
    err = {(a, b): rel_error(results[a], results[b]) for a in names for b in names if a < b}

    def e(a: str, b: str) -> float:
        return 0.0 if a == b else err[(a, b) if a < b else (b, a)]

    pivot = max(names, key=lambda c: (sum(e(c, d) < tol for d in names if d != c), c == prefer))
    errors = {c: e(c, pivot) for c in names if c != pivot}
    flagged = {c: v for c, v in errors.items() if not v < tol}
    return pivot, errors, flagged
