"""The ``torchfim`` command line (also ``python -m torchfim``).

Each subcommand lives in its own module, listed in :data:`COMMANDS`. A command module provides

- ``HELP``: a one-line description for ``torchfim --help``;
- ``add_arguments(parser)``: adds its options to its ``argparse`` sub-parser;
- ``main(args) -> int``: runs it with the parsed ``argparse.Namespace`` and returns the exit status.

``add_arguments`` may set the default ``_interrupted`` (``parser.set_defaults``): what to do after an
interruption (how to go on), printed after ``interrupted``; a string, or a function of the parsed arguments
that says it at the time.

Adding a command is one module with those three names plus one line in :data:`COMMANDS`; the
``argparse`` value types the commands share are in :mod:`torchfim.cli.types`. Command modules
import optional dependencies inside ``main`` so that ``torchfim --help`` works without them.

User mistakes (bad options, bad values, missing optional packages) end with one line on stderr and
exit status 2, never a traceback. Warnings print as one line in the command's name. Set ``TORCHFIM_DEBUG=1`` to
get the traceback anyway (and warnings as Python prints them, with the line that raised them).
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

__all__ = ["main", "build_parser", "COMMANDS", "ALIASES", "UsageError"]

#: Subcommand name -> module implementing it (see the module docstring).
COMMANDS: dict[str, str] = {
    "demo": "torchfim.demo",
    "report": "torchfim.report.command",
    "reproduce": "torchfim.experiments.command",
    "explosion": "torchfim.experiments.explosion.command",
    "plot-trace": "torchfim.train.plot_command",
}
#: Commands kept under their old name: name -> the command line it is the same as.
ALIASES: dict[str, str] = {"explosion": "reproduce explosion"}

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """A mistake on the command line; reported as one line with exit status 2."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are raised, to be printed as one line by :func:`main`."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(self.prog, message)


def _version() -> str:
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("torchfim")
    except PackageNotFoundError:  # pragma: no cover - not installed as a distribution
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser, with one sub-parser per entry of :data:`COMMANDS`."""
    parser = _Parser(
        prog="torchfim",
        description="Fisher information of PyTorch models: exact, score and Hessian estimators.",
    )
    parser.add_argument("--version", action="version", version=f"torchfim {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        description = module.HELP
        if name in ALIASES:
            description = f"the same as '{parser.prog} {ALIASES[name]}': {module.HELP}"
        p = sub.add_parser(name, help=description, description=description)
        p.set_defaults(_run=module.main, _prog=p.prog)
        module.add_arguments(p)
    return parser


def _fail(prog: str, message: str, hint: str = "") -> int:
    text = " ".join(str(message).split())  # one line, whatever the message held
    print(f"{prog}: error: {text}{hint}", file=sys.stderr)
    return EXIT_USAGE


@contextmanager
def _warnings_in_words(prog: str) -> Iterator[None]:
    """Warnings printed while a command runs read ``<prog>: warning: <message>``, one line: a command has no
    line of the user's to point at (under ``python -m`` Python would name ``<frozen runpy>``). Only their
    printing changes: the filters (``-W``, ``PYTHONWARNINGS``) and anything recording them work as before."""
    own = warnings.formatwarning

    def in_words(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 line: str | None = None) -> str:
        # the library's own prefix ("torchfim: ", "torchfim report: ") said once, by the command's name
        text = re.sub(r"^torchfim(?: [\w-]+)?: ", "", " ".join(str(message).split()))
        return f"{prog}: warning: {text}\n"

    warnings.formatwarning = in_words
    try:
        yield
    finally:
        warnings.formatwarning = own


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the chosen command, return its exit status."""
    debug = os.environ.get("TORCHFIM_DEBUG", "") not in ("", "0")
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
    except UsageError as exc:
        return _fail(exc.prog, str(exc), f" (see {exc.prog} --help)")
    if getattr(args, "_run", None) is None:
        names = ", ".join(COMMANDS)
        return _fail(parser.prog, f"choose a command: {names}", f" (see {parser.prog} --help)")

    # the innermost sub-parser's name ("torchfim reproduce explosion"), which the top-level parser's own
    # "unrecognized arguments" error would not name
    prog = args._prog
    if extra:
        return _fail(prog, f"unrecognized arguments: {' '.join(extra)}", f" (see {prog} --help)")
    try:
        with _warnings_in_words(prog) if not debug else nullcontext():
            return int(args._run(args) or 0)
    except KeyboardInterrupt:
        hint = getattr(args, "_interrupted", None)
        hint = hint(args) if callable(hint) else hint
        print(f"{prog}: interrupted" + (f"; {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, ImportError, OSError) as exc:
        # torchfim.TorchfimError is a ValueError; ImportError covers missing optional extras;
        # OSError covers unreadable or unwritable paths.
        if debug:
            raise
        return _fail(prog, str(exc) or type(exc).__name__)

