"""``torchfim plot-trace``: Tr(F) over training with its error band, from FisherTraceMonitor CSV files.

``torchfim plot-trace lr0.1.csv lr0.01.csv --out trace.png`` draws one line per file (labelled by its
name, or by ``--labels``) with ``±2`` standard errors shaded (:func:`torchfim.train.plot_trace`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

HELP = "plot Tr(F) over training, with its error band, from FisherTraceMonitor CSV files"
#: The widest band, in standard errors: wider says nothing more, and 1e308 overflows matplotlib.
MAX_BAND = 100.0


def band_width(text: str) -> float:
    """``--band``: a number of standard errors from 0 to :data:`MAX_BAND`."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 <= value <= MAX_BAND:
        raise argparse.ArgumentTypeError(f"expected a number of standard errors from 0 to {MAX_BAND:g}, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", nargs="+", metavar="CSV", help="a monitor's csv_path file; several: one line each")
    parser.add_argument("--out", default="trace.png", metavar="FILE",
                        help="the figure (format from the suffix: png, pdf, svg; default: trace.png)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", default=None,
                        help="one label per CSV file (default: the file names without their suffix)")
    parser.add_argument("--band", type=band_width, default=2.0, metavar="K",
                        help=f"shade ± K standard errors around each estimate, 0 to {MAX_BAND:g} (default: 2; 0: no band)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--log", dest="log", action="store_true", default=None, help="a logarithmic Tr(F) axis")
    scale.add_argument("--linear", dest="log", action="store_false", help="a linear Tr(F) axis (default: log "
                       "where the estimates span more than a factor of 10)")


def main(args: argparse.Namespace) -> int:
    """Run ``torchfim plot-trace`` with the parsed options."""
    from .._out_folder import check_out_file
    from .._words import counted
    from ..errors import TorchfimError
    from .trace_plot import plot_trace, read_trace_csv

    _check_format(args.out)
    paths = [Path(p) for p in args.csv]
    labels = args.labels or [p.stem for p in paths]
    if len(labels) != len(paths):
        raise TorchfimError(f"--labels gives {counted(len(labels), 'label')} for {counted(len(paths), 'CSV file')}; "
                            "give one per file")
    if len(set(labels)) != len(labels):
        raise TorchfimError(f"the runs' labels {labels} repeat; pass --labels with one distinct label per file")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TorchfimError(f"no such CSV file: {', '.join(missing)}")
    runs = {label: read_trace_csv(p) for label, p in zip(labels, paths)}
    empty = [str(p) for p, records in zip(paths, runs.values()) if not records]
    if empty:
        raise TorchfimError(f"{', '.join(empty)} holds no records, only its header; plot it once the monitor has "
                            "measured (after its first `every` steps)")
    check_out_file(args.out, "figure")
    plot_trace(runs, band=args.band, log=args.log, path=args.out)
    print(f"wrote {args.out}")
    return 0


def _check_format(out: str) -> None:
    """Refuse an ``--out`` whose suffix names no format matplotlib writes, before the CSV files are read (matplotlib's
    own refusal came once the figure was drawn, without naming --out)."""
    from ..errors import TorchfimError

    fmt = Path(out).suffix.lstrip(".").lower()
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:  # plot_trace says how to install it
        return
    formats = FigureCanvasBase.get_supported_filetypes()
    if fmt and fmt not in formats:
        raise TorchfimError(f"--out {out}: matplotlib writes no {fmt!r} figures; end the file name in .png, .pdf or .svg "
                            f"(or another of {', '.join(sorted(formats))})")
