"""How the report names its options to the user: as ``torchfim report``'s flags where the command line runs it
(:func:`on_command_line`), as :func:`~torchfim.report.run_report`'s keywords elsewhere.

Its messages named both at once, ``score_only=None (--mode auto)``, which a user of either had to decode (a user
trial of the command line).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from .settings import MODES

__all__ = ["on_command_line", "option"]

_ON_COMMAND_LINE: ContextVar[bool] = ContextVar("torchfim_report_on_command_line", default=False)
#: What a keyword's value is given as where the flag's value differs (``--mode`` takes a name, not a bool).
_FLAG_VALUES = {"score_only": ("--mode", {value: mode for mode, value in MODES.items()})}
_NO_VALUE = object()


@contextmanager
def on_command_line() -> Iterator[None]:
    """Within: the report runs from ``torchfim report``, and its messages name the command line's flags."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def option(keyword: str, value: object = _NO_VALUE) -> str:
    """The option ``keyword`` of :func:`~torchfim.report.run_report` (given ``value``, if any) as the user sets it:
    ``--max-block 4096`` (``--mode full`` for ``score_only`` False) within :func:`on_command_line`, else
    ``max_block=4096``; without a value, the name alone (``--max-block``, ``max_block``).

    Example:
        >>> option("max_block", 4096), option("score_only", None)
        ('max_block=4096', 'score_only=None')
        >>> with on_command_line():
        ...     option("max_block", 4096), option("score_only", None), option("variance_inputs")
        ('--max-block 4096', '--mode auto', '--variance-inputs')
    """
    if not _ON_COMMAND_LINE.get():
        return keyword if value is _NO_VALUE else f"{keyword}={value!r}"
    flag, values = _FLAG_VALUES.get(keyword, ("--" + keyword.replace("_", "-"), {}))
    return flag if value is _NO_VALUE else f"{flag} {values.get(value, value)}"
