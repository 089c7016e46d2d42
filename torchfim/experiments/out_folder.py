"""The ``--out`` folder of a reproduction: checked at start-up by :func:`check_study_out`."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

from .._out_folder import check_out_folder

__all__ = ["check_study_out"]

RESULTS = "results.json"


def check_study_out(out: str | os.PathLike, files: Iterable[str], experiment: str,
                    earlier: Callable[[Path], bool] | None = None) -> Path:
    """``out`` as a Path, created if missing, once the study ``experiment`` can write ``files`` there.

    The files are the study's own, to be replaced, when the folder's results.json is that experiment's
    (or ``earlier(path)`` says an unfinished study of it is there); otherwise any of them there is a
    user's file, and the folder is refused (see :func:`torchfim._out_folder.check_out_folder`).
    """
    names = list(files)

    def owned(path: Path) -> set[str]:
        mine = _results_experiment(path / RESULTS) == experiment or (earlier is not None and earlier(path))
        return set(names) if mine else set()

    return check_out_folder(out, names, owned, f"{experiment} study")


def _results_experiment(path: Path) -> str | None:
    """The experiment that wrote the results.json ``path`` (its "experiment", or its "meta"'s), or None."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict):
        return None
    meta = results.get("meta")
    return results.get("experiment") or (meta.get("experiment") if isinstance(meta, dict) else None)
