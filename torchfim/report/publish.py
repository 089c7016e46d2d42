"""Writing a report into ``--out``: only the report's own files, each atomically; nothing else there.

A report writes the names of :data:`~torchfim.report.settings.REPORT_FILES` and no others. Files
of an earlier report in ``--out`` (the names its report.json lists) are replaced; every other file
there (notes, a thesis, a ``runs/`` folder) is left alone. A file with a report's name that no
earlier report wrote is in the way: :func:`check_out` refuses ``--out`` before anything is
computed, naming it. The files are written by :func:`torchfim._io.write_files`: all in full to
temporary files first, then renamed into place with report.json last, so an interruption at any
point leaves ``--out`` in place and every report file in it either the earlier one or the new one,
complete. Before the first rename, :data:`PUBLISHING` records each file's name with the SHA-256 of
its content (and of the report file it replaces); it is removed once report.json is in place. A
report interrupted while it renames (Ctrl-C, a kill) thus leaves files that no report.json lists yet,
which it still owns: the same command run again replaces them, while a file of a report's name with
other content stays the user's and is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import _io
from .._out_folder import check_out_folder
from .settings import REPORT_FILES

__all__ = ["check_out", "publish"]

#: Written last: once it is new, every other file of the new report is in place.
INDEX = "report.json"


#: Written before the report's files are renamed into place, removed once report.json is: each file's name
#: and the SHA-256 digests of the contents a report put there.
PUBLISHING = ".torchfim-report-publishing.json"


def _read_json(path: Path) -> object:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _digest(content: bytes | str) -> str:
    return hashlib.sha256(content.encode("utf-8") if isinstance(content, str) else content).hexdigest()


def _file_digest(path: Path) -> str | None:
    try:
        return _digest(path.read_bytes())
    except OSError:
        return None


def _earlier_report(path: Path) -> set[str]:
    """The names of the files that torchfim reports in ``path`` wrote: those the report.json there lists, and
    those an interrupted publication (:data:`PUBLISHING`) put there with the content they still hold."""
    earlier = _read_json(path / INDEX)
    names = set()
    if isinstance(earlier, dict) and "torchfim_report" in earlier:
        listed = earlier.get("files")
        names = {INDEX} | {name for name in (listed if isinstance(listed, list) else []) if name in REPORT_FILES}
    claims = _read_json(path / PUBLISHING)
    claims = claims if isinstance(claims, dict) else {}
    return names | {name for name, digests in claims.items()
                    if name in REPORT_FILES and isinstance(digests, list) and _file_digest(path / name) in digests}


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
    earlier = _earlier_report(out) if out.is_dir() else set()
    stale = sorted(earlier - set(files))
    ordered = {name: content for name, content in files.items() if name != INDEX}
    ordered[INDEX] = files[INDEX]
    # an interruption may leave any file old or new, so the claim covers both contents
    claims = {name: [d for d in (_file_digest(out / name),) if d is not None] for name in earlier}
    for name, content in files.items():
        claims.setdefault(name, []).append(_digest(content))
    _io.write_files(out, ordered, remove=stale, before_renaming=lambda: _io.write_json(out / PUBLISHING, claims))
    (out / PUBLISHING).unlink(missing_ok=True)
    return out
