"""``torchfim plot-trace``: Tr(F) over training with its error band, from FisherTraceMonitor CSV files.

``torchfim plot-trace lr0.1.csv lr0.01.csv --out trace.png`` draws one line per file (labelled by its
name, or by ``--labels``) with ``±2`` standard errors shaded (:func:`torchfim.train.plot_trace`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "plot Tr(F) over training, with its error band, from FisherTraceMonitor CSV files"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("csv", nargs="+", metavar="CSV", help="a monitor's csv_path file; several: one line each")
    parser.add_argument("--out", default="trace.png", metavar="FILE",
                        help="the figure (format from the suffix: png, pdf, svg; default: trace.png)")
    parser.add_argument("--labels", nargs="+", metavar="LABEL", default=None,
                        help="one label per CSV file (default: the file names without their suffix)")
    parser.add_argument("--band", type=float, default=2.0, metavar="K",
                        help="shade ± K standard errors around each estimate (default: 2; 0: no band)")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--log", dest="log", action="store_true", default=None, help="a logarithmic Tr(F) axis")
    scale.add_argument("--linear", dest="log", action="store_false", help="a linear Tr(F) axis (default: log "
                       "where the estimates span more than a factor of 10)")


def main(args: argparse.Namespace) -> int:
    from ..errors import TorchfimError
    from .trace_plot import plot_trace

    paths = [Path(p) for p in args.csv]
    labels = args.labels or [p.stem for p in paths]
    if len(labels) != len(paths):
        raise TorchfimError(f"--labels gives {len(labels)} labels for {len(paths)} CSV files; give one per file")
    if len(set(labels)) != len(labels):
        raise TorchfimError(f"the runs' labels {labels} repeat; pass --labels with one distinct label per file")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TorchfimError(f"no such CSV file: {', '.join(missing)}")
    plot_trace(dict(zip(labels, paths)), band=args.band, log=args.log, path=args.out)
    print(f"wrote {args.out}")
    return 0
