"""Build torchfim's API reference (HTML) from its docstrings, with pdoc.

Usage, from the repository root::

    .venv/bin/pip install -c constraints.txt -e '.[docs]'
    .venv/bin/python docs/api/build.py                  # writes build/api/index.html and the pages
    .venv/bin/python docs/api/build.py --out DIR

The reference covers the library (``torchfim`` and the submodules its ``__all__`` lists), the
report's Python API (``torchfim.report``) and the data loaders (``torchfim.datasets``). Docstrings
are read as reStructuredText (``:func:`torchfim.fisher``` becomes a link). Every warning during the
build (a module that fails to import, a reference or a docstring pdoc cannot resolve) is an error:
the build stops with exit status 1, so the reference never silently loses a page.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: The modules documented (their public submodules with them).
MODULES = ("torchfim", "torchfim.report", "torchfim.datasets")
DEFAULT_OUT = ROOT / "build" / "api"


def build(out: Path) -> list[Path]:
    """Write the reference into ``out``; return the pages written. Warnings raise."""
    import pdoc
    import pdoc.render

    pdoc.render.configure(docformat="restructuredtext", search=True, show_source=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pdoc.pdoc(*MODULES, output_directory=out)
    return sorted(out.rglob("*.html"))


def main(argv: list[str] | None = None) -> int:
    """Build into ``--out``; exit status 1 (and one line on stderr) on any warning or import error."""
    parser = argparse.ArgumentParser(prog="docs/api/build.py", description="Build torchfim's API reference.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    args = parser.parse_args(argv)
    try:
        pages = build(args.out)
    except (Warning, RuntimeError) as exc:  # pdoc reports a module that fails to import as RuntimeError
        cause = f" ({type(exc.__cause__).__name__}: {exc.__cause__})" if exc.__cause__ else ""
        print(f"docs/api/build.py: error: {type(exc).__name__}: {exc}{cause}", file=sys.stderr)
        return 1
    print(f"wrote {len(pages)} pages into {args.out} (open {args.out / 'index.html'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
