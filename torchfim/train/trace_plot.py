"""Tr(F) over training with its error band: from a monitor, its records or the CSV files it writes.

:func:`plot_trace` draws one line per run, the estimate against the step, with a band of ``±band``
standard errors around it (``band=2``: about a 95 % interval for each measurement on its own), on a
log axis where the estimates span more than a factor of 10 (an explosion of Tr(F) spans decades). Tr(F)
is not negative, so the band's lower edge stops at 0 (on a log axis, at a thousandth of the estimate). :func:`read_trace_csv` reads the records back from a monitor's ``csv_path``. Drawn with
matplotlib's object API (no pyplot, no change of backend); matplotlib comes with the ``cli`` extra.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._io import save_figure
from .._words import counted
from ..errors import TorchfimError, real_number, warn_user
from .monitor import FisherTraceMonitor
from .record_sinks import BLANK_TEXT as BLANK
from .trace_record import COLUMNS, TraceRecord

#: What :func:`plot_trace` takes as one run: a monitor, its records, or the path of its CSV file.
Run = FisherTraceMonitor | Sequence[TraceRecord] | str | os.PathLike

LOG_SPAN = 10.0  # max/min of the estimates above which the axis is logarithmic (log=None)
FLOOR = 1e-3  # on a log axis, the band's lower edge is at least FLOOR × the estimate
QUOTED = 80  # the most characters of a wrong header that an error quotes


def read_trace_csv(path: str | os.PathLike) -> list[TraceRecord]:
    """The records of a :class:`~torchfim.train.FisherTraceMonitor` CSV file (``csv_path``), in file order.

    An incomplete last line (one without its line end: what a run killed while writing leaves) is left out with a
    warning naming it, blank lines after the last record without one;
    a step that goes back (two runs appended to one file) is kept, with a warning naming its line.

    Example:
        >>> import tempfile, torch, torchfim
        >>> from pathlib import Path
        >>> path = Path(tempfile.mkdtemp()) / "trace.csv"
        >>> model, held = torch.nn.Linear(4, 3), torch.randn(50, 4)
        >>> mon = torchfim.train.FisherTraceMonitor(model, held, every=1, csv_path=path)
        >>> for step in range(3):
        ...     _ = mon.step(step)
        >>> torchfim.train.read_trace_csv(path) == mon.history  # the records, read back as they were measured
        True
    """
    path = Path(path)
    if not path.is_file():
        raise TorchfimError(f"no CSV file at {str(path)!r}{' (a folder)' if path.is_dir() else ''}; pass the csv_path "
                            "a FisherTraceMonitor wrote its records to")
    try:
        with path.open(newline="") as f:
            text = f.read()
        rows = list(csv.reader(io.StringIO(text)))
    except (UnicodeDecodeError, csv.Error) as exc:  # a binary file (a checkpoint, a figure), or a field of 128 KB
        raise TorchfimError(f"{str(path)!r} is not a FisherTraceMonitor CSV file ({exc}); pass the monitor's "
                            "csv_path") from None
    expected = list(COLUMNS)
    if not rows or rows[0] not in (expected, [*expected, "variance_ratio"]):
        found = ",".join(rows[0]) if rows else "an empty file"
        found = found if len(found) <= QUOTED else found[:QUOTED] + "…"  # a JSON file is one long line
        raise TorchfimError(
            f"{str(path)!r} is not a FisherTraceMonitor CSV file: its header is {found!r}, not "
            f"{','.join(expected)!r} (with ',variance_ratio' after control_variate=True); pass the monitor's csv_path"
        )
    header = rows[0]
    while len(rows) > 1 and not "".join(rows[-1]).strip():  # blank lines after the last record hold none
        rows.pop()
    if len(rows) > 1 and "\n" not in text[len(text.rstrip(BLANK)):]:
        # The monitor ends each line it writes: this one was cut while written, though what is left may parse (its
        # last field cut short, 0.4567 read as 0.4).
        _left_out(path, len(rows))
        rows.pop()
    records = []
    for line, row in enumerate(rows[1:], start=2):
        try:
            records.append(TraceRecord(**{k: _number(k, v) for k, v in zip(header, row, strict=True)}))
        except ValueError as exc:
            if line == len(rows):
                _left_out(path, line)
                break
            raise TorchfimError(
                f"{str(path)!r}: line {line} is not a record of numbers ({exc}); delete or mend that line"
            ) from None
    _warn_step_back(path, records)
    return records


def _left_out(path: Path, line: int) -> None:
    warn_user(f"{str(path)!r}: its last line, {line}, is incomplete (a run stopped while writing it?) and is left out")


def _warn_step_back(path: Path, records: list[TraceRecord]) -> None:
    """Warn where a step is below the one before it: the file holds several runs, drawn as a zig-zag."""
    back = next((i for i in range(1, len(records)) if records[i].step < records[i - 1].step), None)
    if back is not None:
        warn_user(f"{str(path)!r}: the step goes back from {records[back - 1].step} to {records[back].step} at line "
                  f"{back + 2}: the file holds more than one run; split it into one file per run")


def _number(key: str, text: str) -> int | float:
    return int(text) if key in ("step", "n_inputs", "n_samples") else float(text)


def plot_trace(runs: Run | Mapping[str, Run], *, band: float = 2.0, log: bool | None = None, ax: Any = None,
               path: str | os.PathLike | None = None) -> Any:
    """Tr(F) against the training step, ``±band`` standard errors shaded, one line per run.

    Args:
        runs: one run, or a dict label → run; a run is a monitor (its ``history``), a list of
            :class:`~torchfim.train.TraceRecord` or the path of a monitor's CSV file.
        band: the half-width of the shaded band in standard errors (0: no band).
        log: a logarithmic y axis (None: where the estimates, all positive, span more than ``LOG_SPAN``).
        ax: a matplotlib ``Axes`` to draw into (None: a new figure).
        path: save the figure there (the format from its suffix, written atomically).

    Returns:
        The matplotlib ``Figure``.

    Example:
        >>> import torch, torchfim.train
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> mon = torchfim.train.FisherTraceMonitor(model, torch.randn(64, 4), every=1)
        >>> for step in range(3):
        ...     _ = mon.step(step)
        >>> fig = torchfim.train.plot_trace({"lr 0.1": mon})
        >>> [line.get_label() for line in fig.axes[0].get_lines()]
        ['lr 0.1']
    """
    width = real_number(band)
    if width is None or not width >= 0 or math.isinf(width):
        raise TorchfimError(f"band must be a finite number of standard errors ≥ 0, got {band!r}")
    band = width
    named = dict(runs) if isinstance(runs, Mapping) else {None: runs}
    if not named:
        raise TorchfimError("plot_trace got no run (an empty dict); pass a monitor, its records or its CSV file, "
                            "or a dict {label: run} with at least one")
    records = {label: _records(run) for label, run in named.items()}
    empty = [_named(label, named[label]) for label, recs in records.items() if not recs]
    if empty:  # an empty figure said nothing of why
        raise TorchfimError(f"plot_trace: {', '.join(empty)} holds no record; plot once the monitor has measured "
                            "(mon.step(step) at a multiple of every, or mon.measure(step))")
    for label, recs in records.items():
        _warn_non_finite(label, recs)
    fig, ax = _axes(ax)
    traces = [r.trace for recs in records.values() for r in recs]
    if log is None:
        log = bool(traces) and min(traces) > 0 and max(traces) > LOG_SPAN * min(traces)
    for label, recs in records.items():
        steps, values = [r.step for r in recs], [r.trace for r in recs]
        (line,) = ax.plot(steps, values, marker="." if len(recs) < 30 else None, label=label)
        if band > 0:
            low = [v - band * r.stderr for v, r in zip(values, recs)]
            low = [max(lo, FLOOR * v if log else 0.0) for lo, v in zip(low, values)]
            high = [v + band * r.stderr for v, r in zip(values, recs)]
            if len(recs) == 1:  # a band needs two points: one record's interval as an error bar
                ax.errorbar(steps, values, yerr=[[values[0] - low[0]], [high[0] - values[0]]], fmt="none",
                            ecolor=line.get_color(), alpha=0.5, capsize=3)
            else:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(f"Tr(F), ± {band:g} standard errors" if band > 0 else "Tr(F)")
    ax.grid(alpha=0.3)
    if any(label is not None for label in records):
        ax.legend()
    if path is not None:
        save_figure(fig, path, dpi=120)
    return fig


def _warn_non_finite(label: str | None, records: list[TraceRecord]) -> None:
    """Warn where a record's Tr(F) or standard error is NaN or infinite: matplotlib leaves such points and bands
    out without a word."""
    steps = [r.step for r in records if not (math.isfinite(r.trace) and math.isfinite(r.stderr))]
    if steps:
        shown = ", ".join(str(s) for s in steps[:5]) + (", …" if len(steps) > 5 else "")
        run = "" if label is None else f"run {label!r}: "
        warn_user(f"torchfim: {run}{counted(len(steps), 'record')} with a non-finite Tr(F) or standard error (step "
                  f"{shown}; a measurement of a diverged model?): their points, or where only the standard error is "
                  "not finite their band, are left out of the figure")


def _named(label: str | None, run: Run) -> str:
    """How an error names a run: by its label, else by its CSV file's path (what the command line names)."""
    if label is not None:
        return repr(label)
    return repr(str(run)) if isinstance(run, (str, os.PathLike)) else "the run"


def _records(run: Run) -> list[TraceRecord]:
    if isinstance(run, (str, os.PathLike)):
        return read_trace_csv(run)
    history = run.history if isinstance(run, FisherTraceMonitor) else run
    if not isinstance(history, Sequence) or not all(isinstance(r, TraceRecord) for r in history):
        raise TorchfimError(
            f"a run must be a FisherTraceMonitor, a list of TraceRecord or the path of a monitor's CSV file, got "
            f"{type(run).__name__}; several runs go in a dict {{label: run}}, e.g. plot_trace({{'lr 0.1': monitor}})"
        )
    return list(history)


def _axes(ax: Any) -> tuple[Any, Any]:
    if ax is not None:
        return ax.figure, ax
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise TorchfimError(
            "plotting Tr(F) needs matplotlib, which is not installed; run `pip install matplotlib` (or install "
            "torchfim with the cli extra)"
        ) from err
    fig = Figure(figsize=(6.4, 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots()
