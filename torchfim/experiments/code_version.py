"""Which code made a study's run: torch's version and a hash of torchfim's own source, stored in each run file.

A study resumed after an update of torch or of torchfim finishes with runs of two codes. Their numbers can differ
(the labels a penalty draws changed between versions of the package, and with them every penalised run), so the
study names how many of its run files another code made, rather than mixing them without a word.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch

__all__ = ["code_version", "other_code"]

_PACKAGE = Path(__file__).resolve().parents[1]


@functools.cache
def code_version() -> dict[str, str]:
    """``{"torch": torch.__version__, "torchfim": hash}``, the hash a SHA-256 (16 hex digits) of every ``.py`` file of
    the installed torchfim package, by relative path and content: any edit of the source changes it."""
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE.rglob("*.py")):
        digest.update(path.relative_to(_PACKAGE).as_posix().encode())
        digest.update(path.read_bytes())
    return {"torch": torch.__version__, "torchfim": digest.hexdigest()[:16]}


def other_code(records: list[dict]) -> str:
    """Empty where every record's ``"code"`` is this code's; else a sentence naming how many were made by other code
    (or by a version of the study that stored none) and how they differ."""
    now = code_version()
    other = [r.get("code") for r in records if r.get("code") != now]
    if not other:
        return ""
    torches = sorted({c["torch"] for c in other if isinstance(c, dict) and c.get("torch") != now["torch"]})
    differs = [f"torch {', '.join(torches)} (now {now['torch']})"] if torches else []
    if any(not isinstance(c, dict) or c.get("torchfim") != now["torchfim"] for c in other):
        differs.append("another torchfim source (or one that did not record its code)")
    return (f"{len(other)} of the {len(records)} run files were made by other code: {' and '.join(differs)}; "
            "their numbers may differ from this code's (penalised runs draw other labels)")
