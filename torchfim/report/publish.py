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
from ..errors import TorchfimError
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


def _in_the_way(path: Path) -> list[str]:
    """Names a report writes that exist in ``path`` but were not written there by a report."""
    owned = _earlier_report(path)
    return [name for name in REPORT_FILES
            if os.path.lexists(path / name) and (name not in owned or not (path / name).is_file())]


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a Path, if a report can be written into it without overwriting anyone else's file.

    ``out`` may be missing (it is created), any directory without files of a report's names, or a
    directory holding an earlier report (whose files are replaced).
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise TorchfimError(f"--out {out} is an existing file; choose a directory name for the report")
    if path.is_dir():
        taken = _in_the_way(path)
        if taken:
            raise TorchfimError(
                f"--out {out} holds {', '.join(taken)}, which the report would overwrite and no earlier "
                "torchfim report there wrote; move them or choose another directory (a report writes "
                "only its own files and leaves all others alone)"
            )
    return path


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
