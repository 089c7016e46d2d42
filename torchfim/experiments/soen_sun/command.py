"""``torchfim reproduce soen-sun``: the study's command line."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..._out_folder import folder_text
from ...cli.types import thread_count
from ...errors import TorchfimError
from ..out_folder import check_study_out
from .settings import DEFAULT_OUT, FILES
from .study import run

__all__ = ["HELP", "add_arguments", "interrupted_hint", "main"]

HELP = "the Soen & Sun (2021) variance experiments at CPU scale"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchfim reproduce soen-sun``."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (created if needed; default: {DEFAULT_OUT}/). An interrupted study "
                             "does not resume (it takes minutes): the same command run again starts it over, replacing the "
                             "files it had written")
    parser.add_argument("--quick", action="store_true",
                        help="tiny networks and fewer settings (under a minute; for tests and smoke runs)")
    parser.add_argument("--threads", type=thread_count, default=1, metavar="N",
                        help="torch intra-op threads, at most 256 (default: 1; more only helps on an idle machine)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    # not an option: "--resume" (which the explosion study has) is answered with why not and what to do instead
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)


def interrupted_hint(out: str) -> str:
    """What an interrupted study left, and that it does not resume."""
    summary = Path(out) / FILES["summary"]
    left = (f"the finished parts are in {folder_text(out)} ({FILES['summary']}, marked 'Run incomplete', names what was not "
            "run; results.json, results.csv and the figures of the finished parts)" if summary.is_file()
            else f"nothing was written to {folder_text(out)} yet")
    return f"{left}; the study does not resume: run the same command again to start it over"


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run from parsed ``args`` (the ``torchfim reproduce soen-sun`` options) or from an argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m torchfim.experiments.soen_sun", description=HELP)
        add_arguments(parser)
        args = parser.parse_args(args)
    if getattr(args, "resume", False):
        raise TorchfimError("--resume: the soen-sun study does not resume (a full run takes a few minutes); run the "
                            "same command without --resume to start it over")
    for module in ("matplotlib", "sklearn", "mnist1d"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(
                f"torchfim reproduce soen-sun needs the optional package {module!r}: pip install 'torchfim[cli]'"
            ) from exc
    check_study_out(args.out, FILES.values(), "soen-sun")
    cmd = f"torchfim reproduce soen-sun --out {args.out}" + (" --quick" if args.quick else "")
    start = time.perf_counter()
    try:
        run(args.out, quick=args.quick, progress=not args.no_progress, threads=args.threads, command=cmd)
    except KeyboardInterrupt:
        args._interrupted = lambda parsed: interrupted_hint(parsed.out)  # said by torchfim.cli when interrupted
        raise
    print(f"wrote {Path(args.out) / FILES['summary']} and {len(FILES) - 1} more files "
          f"in {time.perf_counter() - start:.0f} s")
    return 0
