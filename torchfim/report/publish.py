"""Writing a report into ``--out``: only the report's own files, each atomically; nothing else there.

A report writes the names of :data:`~torchfim.report.settings.REPORT_FILES` and no others. Files
of an earlier report in ``--out`` (the names its report.json lists) are replaced; every other file
there (notes, a thesis, a ``runs/`` folder) is left alone. A file with a report's name that no
earlier report wrote is in the way: :func:`check_out` refuses ``--out`` before anything is
computed, naming it. The files are written by :func:`torchfim._io.write_files`: all in full to
temporary files first, then renamed into place with report.json last, so an interruption at any
point leaves ``--out`` in place and every report file in it either the earlier one or the new one,
complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .. import _io
from .._out_folder import check_out_folder
from .settings import REPORT_FILES

__all__ = ["check_out", "publish"]

#: Written last: once it is new, every other file of the new report is in place.
INDEX = "report.json"


def _earlier_report(path: Path) -> set[str]:
    """The names of the files that the torchfim report in ``path`` wrote (empty: no report there)."""
    try:
        with open(path / INDEX, encoding="utf-8") as f:
            earlier = json.load(f)
    except (OSError, ValueError):
        return set()
    if not isinstance(earlier, dict) or "torchfim_report" not in earlier:
        return set()
    listed = earlier.get("files")
    return {INDEX} | {name for name in (listed if isinstance(listed, list) else []) if name in REPORT_FILES}


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a Path, created if missing, once a report can be written into it without overwriting
    anyone else's file (:func:`torchfim._out_folder.check_out_folder`).

    ``out`` may be missing, any directory without files of a report's names, or a directory holding an
    earlier report (whose files are replaced).
    """
    return check_out_folder(out, REPORT_FILES, _earlier_report, "report")


def publish(out: Path, files: dict[str, bytes | str]) -> Path:
    """Write ``files`` (name -> content, names from REPORT_FILES, report.json among them) into ``out``.

    Files of an earlier report there that the new one does not have (the empirical figure of data
    with targets) are removed; nothing else in ``out`` is touched.
    """
    out = check_out(out)  # again: the folder may have changed while the report was computed
    stale = sorted(_earlier_report(out) - set(files)) if out.is_dir() else []
    ordered = {name: content for name, content in files.items() if name != INDEX}
    ordered[INDEX] = files[INDEX]
    _io.write_files(out, ordered, remove=stale)
    return out
