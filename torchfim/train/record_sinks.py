"""Where :class:`~torchfim.train.FisherTraceMonitor` writes its records besides ``.history``.

* :class:`CsvSink` — one flushed line per record, so an interrupted run keeps its rows; on resuming
  from a saved state the file is rewritten to hold exactly the restored history.
* :class:`TensorBoardSink` — scalars under ``fisher/trace``, ``fisher/trace_stderr`` (and
  ``fisher/trace_variance_ratio``); on resuming, TensorBoard's ``purge_step`` drops the events
  logged after the saved state, as it does for any resumed run.
* :func:`process_paths` — under several processes (``torch.distributed``), each writes its own files: the
  first the paths given, process r ``<stem>.rank<r><suffix>`` and the folder ``rank<r>`` inside the log
  directory, so that no two processes append to one file.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

from .._io import atomic_write
from .._out_folder import check_creatable
from .._processes import process_group
from ..errors import TorchfimError

#: The characters of a blank line (the CSV module reads ``\r\n`` as a line's end), and their bytes.
BLANK_TEXT = " \t\r\n"
BLANK = BLANK_TEXT.encode()


def process_paths(csv_path: str | os.PathLike | None,
                  tensorboard_dir: str | os.PathLike | None) -> tuple[Path | None, Path | None]:
    """This process's CSV file and TensorBoard directory (see the module docstring)."""
    csv_file = None if csv_path is None else Path(csv_path)
    log_dir = None if tensorboard_dir is None else Path(tensorboard_dir)
    if csv_file is not None:  # refused now, with the option named, rather than at the first record
        if csv_file.is_dir():
            raise TorchfimError(f"csv_path {str(csv_path)!r} is a folder; name the CSV file, e.g. "
                                f"csv_path={str(csv_file / 'trace.csv')!r}")
        check_creatable(csv_file.parent, "Tr(F) records", "csv_path")
    if log_dir is not None:
        check_creatable(log_dir, "TensorBoard events", "tensorboard_dir")
    rank = (process_group() or (0, 1))[0]
    if rank == 0:
        return csv_file, log_dir
    return (None if csv_file is None else csv_file.with_name(f"{csv_file.stem}.rank{rank}{csv_file.suffix}"),
            None if log_dir is None else log_dir / f"rank{rank}")


def _load_summary_writer() -> type | None:
    """``torch.utils.tensorboard.SummaryWriter``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


def _row(record: object, columns: Sequence[str]) -> list[object]:
    return [repr(v) if isinstance(v, float) else v for v in (getattr(record, c) for c in columns)]


class CsvSink:
    """The records as CSV lines with the header ``columns`` (checked against an existing file)."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str]) -> None:
        self.path = Path(path)
        self.columns = tuple(columns)
        if self.path.exists() and self.path.is_dir():
            raise TorchfimError(f"csv_path {str(self.path)!r} is a directory; pass a file path such as 'trace.csv'")
        if self.path.exists():
            try:  # opened for appending, unchanged: one that cannot take the records is refused now, not mid-run
                self.path.open("a").close()
            except OSError as err:
                raise TorchfimError(f"csv_path {str(self.path)!r} cannot be written ({err.strerror}); pass a path "
                                    "this process may write, or make the file writable") from None
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="") as f:
                header = f.readline()
            # the header cut short while written (the first record's write, which holds it): no record to keep
            cut = not header.endswith("\n") and ",".join(self.columns).startswith(header)
            if header.strip() != ",".join(self.columns) and not cut:
                raise TorchfimError(
                    f"csv_path {str(self.path)!r} exists with header {header.strip()!r}, not "
                    f"{','.join(self.columns)!r}; pass a new path or delete the file (records are appended to an "
                    "existing file)"
                )
            _drop_incomplete_line(self.path)

    def append(self, record: object) -> None:
        """One write per record (the header too, the first time), flushed."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if not self.path.exists() or self.path.stat().st_size == 0:
            writer.writerow(self.columns)
        writer.writerow(_row(record, self.columns))
        with self.path.open("a", newline="") as f:
            f.write(buf.getvalue())
            f.flush()

    def rewrite(self, records: Iterable[object]) -> None:
        """The file replaced, atomically, by the header and ``records`` (rows past them are dropped)."""
        def write(f) -> None:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(self.columns)
            writer.writerows(_row(r, self.columns) for r in records)
        atomic_write(self.path, write)


def _drop_incomplete_line(path: Path) -> None:
    """Cut an existing CSV file back to its last complete line, with a warning, where a run stopped while writing a
    record: a new record appended to the partial line made one malformed line of the two (a review), which no
    reader, ``plot-trace`` included, could take. Blank lines after the last record (an editor's) are cut silently:
    they hold no record, but one left before the next record would stop every reader there."""
    with path.open("rb") as f:
        f.seek(-min(2, path.stat().st_size), os.SEEK_END)  # one byte: a header cut short
        tail = f.read(2)
        if tail[1:] == b"\n" and tail[:1] not in BLANK:  # the usual case: the last two bytes alone are read
            return
        f.seek(0)
        data = f.read()
    filled = len(data.rstrip(BLANK))  # the end of the last line that is not blank
    complete = data.find(b"\n", filled) + 1  # 0: that line has no end
    kept = complete or data.rfind(b"\n") + 1
    if kept < len(data):
        with path.open("r+b") as f:
            f.truncate(kept)
    if not complete:
        warnings.warn(f"torchfim: csv_path {str(path)!r} ended in an incomplete line (a run stopped while writing "
                      f"it?): {len(data) - kept} bytes dropped before appending", RuntimeWarning, stacklevel=4)


class TensorBoardSink:
    """A ``SummaryWriter`` on ``log_dir``, opened at the first record (a warning at construction when
    tensorboard is not installed; records still go to ``.history`` and the CSV file)."""

    def __init__(self, log_dir: str | os.PathLike) -> None:
        self.log_dir = Path(log_dir)
        self._writer_cls = _load_summary_writer()
        self._writer = None
        self._purge_step: int | None = None
        if self._writer_cls is None:
            warnings.warn(
                f"tensorboard is not installed, so FisherTraceMonitor will not log to {str(self.log_dir)!r} "
                "(records still go to .history and csv_path); pip install tensorboard to enable it",
                RuntimeWarning,
                stacklevel=3,
            )

    def log(self, record: object) -> None:
        if self._writer_cls is None:
            return
        if self._writer is None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            purge = {} if self._purge_step is None else {"purge_step": self._purge_step}
            self._writer = self._writer_cls(log_dir=str(self.log_dir), **purge)
            self._purge_step = None
        self._writer.add_scalar("fisher/trace", record.trace, record.step)
        self._writer.add_scalar("fisher/trace_stderr", record.stderr, record.step)
        if record.variance_ratio is not None:
            self._writer.add_scalar("fisher/trace_variance_ratio", record.variance_ratio, record.step)
        self._writer.flush()

    def resume_after(self, step: int | None) -> None:
        """Drop, when the writer next opens, the events logged at steps after ``step`` (all of them when None)."""
        self.close()
        self._purge_step = 0 if step is None else step + 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
