"""The progress bar of torchfim's functions and commands: tqdm's (``tqdm.auto``) on a terminal or in a notebook; on a
stream that is not a terminal (a pipe, a log file), a whole line at most every :data:`LOG_SECONDS` and one when the
bar closes.

tqdm redraws its bar in place with carriage returns, and each new description or postfix redraws it at once: piped
into a log, a report or study wrote a line per update (a user trial of the command line).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from tqdm.asyncio import tqdm as _console_tqdm
from tqdm.auto import tqdm as _auto_tqdm

__all__ = ["ProgressBar", "LOG_SECONDS"]

#: Seconds between two lines of a bar written to a stream that is not a terminal.
LOG_SECONDS = 30.0
#: Whether tqdm.auto draws notebook widgets here (its console class otherwise), which no stream shows.
_IN_NOTEBOOK = _auto_tqdm is not _console_tqdm


def _now() -> float:
    return time.monotonic()


def _is_terminal(stream: object) -> bool:
    try:
        return bool(stream.isatty())  # type: ignore[attr-defined]
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class _Unseen:
    """Where tqdm's own drawing goes on a stream that is not a terminal: nowhere (the bar writes its lines itself)."""

    encoding = "utf-8"

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        """Nothing to flush."""


class ProgressBar(_auto_tqdm):
    """``tqdm.auto.tqdm``, taking the same arguments, but for a ``file`` (default: ``sys.stderr``) that is not a
    terminal: there it writes the bar as a whole line (ending in a newline) at most every :data:`LOG_SECONDS`, and
    once more when it closes, whatever the updates, descriptions and postfixes in between. ``disable=True`` writes
    nothing, as tqdm's."""

    def __init__(self, *args: Any, file: Any = None, **kwargs: Any) -> None:
        stream = sys.stderr if file is None else file
        #: The stream the lines go to, or None where tqdm draws the bar itself.
        self._lines_to = None if _IN_NOTEBOOK or _is_terminal(stream) else stream
        self._last_line = _now()
        super().__init__(*args, file=stream if self._lines_to is None else _Unseen(), **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> bool | None:
        """tqdm's drawing (on a terminal), or a line where :data:`LOG_SECONDS` have passed since the last."""
        if self._lines_to is None:
            return super().display(msg, pos)
        if msg is None and _now() - self._last_line >= LOG_SECONDS:
            self._line()
        return True

    def close(self) -> None:
        """Close the bar, with its last line where it writes lines (once: tqdm closes again when collected)."""
        if self._lines_to is not None and not self.disable:
            self._line()
            self._lines_to = None  # tqdm's clearing of the bar, below, goes to the unseen stream
        super().close()

    def _line(self) -> None:
        self._last_line = _now()
        self._lines_to.write(self.format_meter(**{**self.format_dict, "ascii": True}) + "\n")
        self._lines_to.flush()
