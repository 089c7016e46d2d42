"""Atomic writes for the results that runs produce (docs/math.md §9).

Each helper writes to a temporary file in the destination's own directory and then moves it into
place with :func:`os.replace`, which is atomic on POSIX and Windows when both paths are on the same
file system. A run that is interrupted therefore leaves either the previous complete file or the new
complete file, never a half-written one; the temporary file is removed on failure.
:func:`write_files` does the same for several files of one directory, all written before any is
renamed into place.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import IO, Any

__all__ = ["atomic_write", "write_files", "write_text", "write_bytes", "write_json", "save_figure"]


def _write_temporary(path: Path, write: Callable[[IO], None], binary: bool) -> Path:
    """Call ``write(file)`` on a new temporary file beside ``path``, flushed to disk; return its path.

    The file gets the usual permissions (0o666 minus the umask), like one opened with
    ``open(path, "w")``. On failure the temporary file is removed.
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return tmp


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[IO], None], *, binary: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it to ``path``.

    The parent directory is created if needed. The new file gets the usual permissions (0o666 minus
    the umask), like a file opened with ``open(path, "w")``. The temporary files of ``path`` that a killed
    process left behind are removed. Returns ``path`` as a :class:`Path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path.parent, [path.name])
    tmp = _write_temporary(path, write, binary)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


def write_files(directory: str | os.PathLike, files: Mapping[str, str | bytes], *, remove: Iterable[str] = (),
                before_renaming: Callable[[], object] | None = None) -> Path:
    """Put ``files`` (name -> text or bytes) into ``directory``, each atomically; delete ``remove``.

    Every file is first written in full to a temporary file in ``directory``; only then are they
    renamed into place, in the order given, and the names in ``remove`` deleted just before the
    last rename. So an interruption at any point leaves each of these files either as it was or
    complete and new, a failure while writing (a full disk) leaves them all as they were, and the
    last file is the last to appear: make it the one that says the others are complete. Nothing
    else in ``directory`` is touched, except the temporary files of these names that a killed
    process left behind. Directories created here are removed again when nothing could be
    written. ``before_renaming`` is called once every file is written, before the first rename (a
    failure in it counts as one while writing). Returns ``directory`` as a :class:`Path`.
    """
    directory = Path(directory)
    made = _missing_dirs(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(directory, files)
    staged: list[tuple[Path, Path]] = []
    try:
        for name, content in files.items():
            path = directory / name
            staged.append((_write_temporary(path, lambda f, c=content: f.write(c), not isinstance(content, str)), path))
        if before_renaming is not None:
            before_renaming()
    except BaseException:
        for tmp, _ in staged:
            _unlink_quietly(tmp)
        for d in made:
            _rmdir_if_empty(d)
        raise
    renamed = 0
    try:
        for tmp, path in staged[:-1]:
            os.replace(tmp, path)
            renamed += 1
        for name in remove:
            _unlink_quietly(directory / name)
        for tmp, path in staged[-1:]:
            os.replace(tmp, path)
            renamed += 1
    except BaseException:
        for tmp, _ in staged[renamed:]:
            _unlink_quietly(tmp)
        raise
    return directory


def _remove_stale_temporaries(directory: Path, names: Iterable[str]) -> None:
    """Remove the temporary files of ``names`` whose writing process no longer runs (it was killed)."""
    if os.name != "posix":  # no safe test of whether a process runs
        return
    for name in names:
        for tmp in directory.glob(f".{name}.*.tmp"):
            pid, _, tag = tmp.name[len(name) + 2 : -len(".tmp")].partition(".")
            if pid.isdigit() and len(tag) == 8 and not _running(int(pid)):
                _unlink_quietly(tmp)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _missing_dirs(directory: Path) -> list[Path]:
    """``directory`` and those of its parents that do not exist yet, deepest first."""
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    return missing


def _rmdir_if_empty(directory: Path) -> None:
    try:
        os.rmdir(directory)
    except OSError:
        pass


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
