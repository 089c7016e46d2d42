"""Atomic writes for the results that runs produce (DESIGN.md §6).

Each helper writes to a temporary file in the destination's own directory and then moves it into
place with :func:`os.replace`, which is atomic on POSIX and Windows when both paths are on the same
file system. A run that is interrupted therefore leaves either the previous complete file or the new
complete file, never a half-written one; the temporary file is removed on failure.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_text", "write_bytes", "write_json", "save_figure"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    The parent directory is created if needed. The new file gets the usual permissions (0o666 minus
    the umask), like a file opened with ``open(path, "w")``. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda f: f.write(data), binary=True)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically.

    Non-finite floats are rejected (``allow_nan=False``): JSON has no NaN or infinity, so store
    ``None`` for an undefined number. The text is serialised before the file is touched, so an
    unserialisable object leaves the old file in place.
    """
    text = json.dumps(obj, indent=indent, allow_nan=False, ensure_ascii=False) + "\n"
    return write_text(path, text)


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """Save a matplotlib figure to ``path`` atomically; the format comes from the file's suffix."""
    path = Path(path)
    fmt = savefig_kwargs.pop("format", None) or path.suffix.lstrip(".") or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, **savefig_kwargs), binary=True)
