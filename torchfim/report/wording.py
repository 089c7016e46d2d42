"""How the report names its options to the user: as ``torchfim report``'s flags where the command line runs it
(:func:`on_command_line`), as :func:`~torchfim.report.run_report`'s keywords elsewhere.

Its messages named both at once, ``score_only=None (--mode auto)``, which a user of either had to decode (a user
trial of the command line), and others named the flags alone, ``--mask KEY`` to a caller of the API.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["MODES", "on_command_line", "from_command_line", "option", "said", "library_words"]

#: ``--mode`` of ``torchfim report`` -> ``score_only`` of :func:`torchfim.report.run_report`.
MODES = {"auto": None, "full": False, "score-only": True}
_ON_COMMAND_LINE: ContextVar[bool] = ContextVar("torchfim_report_on_command_line", default=False)
#: What a keyword's value is given as where the flag's value differs (``--mode`` takes a name, not a bool).
_FLAG_VALUES = {"score_only": ("--mode", {value: mode for mode, value in MODES.items()})}
#: Keywords whose value is a flag of its own, without a value (``resume=False`` is ``--no-resume``).
_SWITCHES = {("resume", False): "--no-resume"}
_NO_VALUE = object()


@contextmanager
def on_command_line() -> Iterator[None]:
    """Within: the report runs from ``torchfim report``, and its messages name the command line's flags."""
    token = _ON_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _ON_COMMAND_LINE.reset(token)


def from_command_line() -> bool:
    """Whether the report runs within :func:`on_command_line`."""
    return _ON_COMMAND_LINE.get()


def said(command_line: str, api: str) -> str:
    """``command_line`` within :func:`on_command_line`, else ``api``: for words that differ beyond an option's
    name (``make --data return`` and ``pass``).

    Example:
        >>> said("the --model factory", "the model")
        'the model'
    """
    return command_line if from_command_line() else api


def option(keyword: str, value: object = _NO_VALUE, *, metavar: str | None = None) -> str:
    """The option ``keyword`` of :func:`~torchfim.report.run_report` (given ``value``, if any) as the user sets it:
    ``--max-block 4096`` (``--mode full`` for ``score_only`` False, ``--no-resume`` for ``resume`` False) within
    :func:`on_command_line`, else ``max_block=4096``; with ``metavar`` in place of a value, ``--variance-inputs N``
    or ``variance_inputs=N``; with neither, the name alone (``--max-block``, ``max_block``).

    Example:
        >>> option("max_block", 4096), option("score_only", None), option("variance_inputs", metavar="N")
        ('max_block=4096', 'score_only=None', 'variance_inputs=N')
        >>> with on_command_line():
        ...     option("max_block", 4096), option("score_only", None), option("variance_inputs")
        ('--max-block 4096', '--mode auto', '--variance-inputs')
        >>> with on_command_line():
        ...     option("resume", False), option("variance_inputs", metavar="N")
        ('--no-resume', '--variance-inputs N')
    """
    if metavar is not None:
        value = _Shown(metavar)
    if not from_command_line():
        return keyword if value is _NO_VALUE else f"{keyword}={value!r}"
    if isinstance(value, bool) and (keyword, value) in _SWITCHES:
        return _SWITCHES[keyword, value]
    flag, values = _FLAG_VALUES.get(keyword, ("--" + keyword.replace("_", "-"), {}))
    return flag if value is _NO_VALUE else f"{flag} {values.get(value, value)}"


def library_words(text: str) -> str:
    """A message of the library's in the report's user's words: within :func:`on_command_line` its ``family='X'``
    is ``--family X``, the option that sets it there; elsewhere the text as it is.

    Example:
        >>> with on_command_line():
        ...     library_words("pass family='categorical' (one class index per input)")
        'pass --family categorical (one class index per input)'
    """
    return re.sub(r"family='(\w+)'", r"--family \1", text) if from_command_line() else text


class _Shown(str):
    """A value shown as it is written, in both forms (a metavar: ``N``, not ``'N'``)."""

    def __repr__(self) -> str:
        return str(self)
