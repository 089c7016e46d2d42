"""``argparse`` value types shared by the commands (``type=`` of ``add_argument``).

Each raises :class:`argparse.ArgumentTypeError` with a message naming what was expected, which the
command line prints as one line (see :mod:`torchfim.cli`).
"""

from __future__ import annotations

import argparse

__all__ = ["positive_int", "nonnegative_int", "seed_int", "thread_count", "positive_float", "layer_widths",
           "MAX_SEED", "MAX_THREADS"]

#: The largest seed: torch.manual_seed takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1
#: The most torch intra-op threads a command takes: a fixed cap rather than a multiple of the CPUs, so that a
#: command line works alike on every machine; thousands of threads hang or crash torch (10⁵ segfaulted).
MAX_THREADS = 256


def _integer(text: str, minimum: int, what: str, maximum: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer ≥ 1."""
    return _integer(text, 1, "a whole number ≥ 1")


def nonnegative_int(text: str) -> int:
    """An integer ≥ 0, such as a seed."""
    return _integer(text, 0, "a whole number ≥ 0")


def seed_int(text: str) -> int:
    """A seed: an integer from 0 to :data:`MAX_SEED`."""
    return _integer(text, 0, f"a whole number from 0 to 2**63-1 = {MAX_SEED}", MAX_SEED)


def thread_count(text: str) -> int:
    """A number of threads: an integer from 1 to :data:`MAX_THREADS`."""
    return _integer(text, 1, f"a number of threads from 1 to {MAX_THREADS}", MAX_THREADS)


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
