"""``argparse`` value types shared by the commands (``type=`` of ``add_argument``).

Each raises :class:`argparse.ArgumentTypeError` with a message naming what was expected, which the
command line prints as one line (see :mod:`torchfim.cli`).
"""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "nonnegative_int", "positive_float", "layer_widths"]


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    return _integer(text, 1, "a whole number ≥ 1")


def nonnegative_int(text: str) -> int:
    """An integer ≥ 0, such as a seed."""
    return _integer(text, 0, "a whole number ≥ 0")


def positive_float(text: str) -> float:
    """A finite number > 0, such as a time in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def layer_widths(text: str) -> tuple[int, ...]:
    """Comma-separated hidden-layer widths, each ≥ 1 (``"32,32"``; empty: no hidden layer)."""
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip() != "")
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 32,32, got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"layer widths must be at least 1, got {text!r}")
    return values
