"""The ``--out`` folder of a command that writes several files (``report``, ``reproduce ...``): checked at
start-up, so that a folder that cannot be written, or someone else's file in the way, is found before the
work rather than after it."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from .errors import TorchfimError

__all__ = ["check_out_folder", "check_out_file", "folder_text"]


def folder_text(path: str | os.PathLike) -> str:
    """A folder as a message prints it, with one trailing slash: ``out/`` for ``out`` or ``out/``, and ``/`` for
    the root (which printed as ``//`` where a slash was added to its name)."""
    text = str(Path(path))
    return text if text.endswith(("/", os.sep)) else text + "/"


def check_out_folder(out: str | os.PathLike, files: Iterable[str], owned: Callable[[Path], set[str]],
                     what: str) -> Path:
    """``out`` as a Path, once a file can be written into it (:func:`check_writable`) and none of ``files`` there
    is someone else's: each must be missing or among ``owned(path)``, the names an earlier torchfim
    ``what`` (e.g. "report") wrote there, which are replaced.

    Raises :class:`~torchfim.TorchfimError` naming the problem and the fix: an empty name, an existing file,
    a folder that cannot be created or written, or files in the way.
    """
    if str(out) == "":
        raise TorchfimError(f"--out is empty; name a folder for the {what}, e.g. --out ./{what.replace(' ', '-')}")
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise TorchfimError(f"--out {out} is an existing file; choose a directory name for the {what}")
    check_writable(path, what)
    mine = owned(path)
    taken = [name for name in files
             if os.path.lexists(path / name) and (name not in mine or not (path / name).is_file())]
    if taken:
        raise TorchfimError(
            f"--out {out} holds {', '.join(taken)}, which the {what} would overwrite and no earlier torchfim "
            f"{what} there wrote; move them or choose another directory (the {what} writes only its own files "
            "and leaves all others alone)"
        )
    return path


def check_out_file(out: str | os.PathLike, what: str) -> Path:
    """``out`` as a Path, once the file ``what`` (e.g. "figure") can be written there: not a folder, in a
    folder that exists or can be made, and can be written."""
    path = Path(out)
    if str(out) == "":
        raise TorchfimError(f"--out is empty; name the {what} file, e.g. --out trace.png")
    if path.is_dir():
        raise TorchfimError(f"--out {out!r} is a folder, not a file; name the {what} file, e.g. "
                            f"--out {path / 'trace.png'}")
    check_writable(path.parent, what)
    return path


def check_writable(path: Path, what: str) -> None:
    """:func:`check_creatable` for ``--out``, then remove the folders it created: a command refused later (a bad
    option, a bad model) leaves nothing behind, and the writers create them again."""
    path = Path(os.path.abspath(path))  # "new/.." names no folder to remove: its parts do
    created = [p for p in (path, *path.parents) if not p.exists()]
    try:
        check_creatable(path, what, "--out")
    finally:
        for folder in created:  # deepest first
            try:
                folder.rmdir()
            except OSError:  # another command wrote into it meanwhile, or it is gone: leave it
                pass


def check_creatable(path: Path, what: str, option: str) -> None:
    """Make the folder ``path`` if missing and create and remove a file in it, or say why not, naming the ``option``
    that gave the folder (``--out``, ``csv_path``, ...); the folder is kept, since several processes may check the
    same one at once (each removing what it made would pull it from under the others)."""
    path = Path(os.path.abspath(path))
    _create(path, what, option)
    _probe(path, what, option)


def _create(path: Path, what: str, option: str) -> None:
    """Make the folder ``path`` (and its parents), or say why it cannot be made."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        # mkdir says only "File exists": name the file that stands where a folder is needed
        blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), path)
        raise TorchfimError(
            f"{option}: {blocker} is a file, not a folder, so the folder {path} cannot be made; choose another "
            f"{option} for the {what}"
        ) from None
    except OSError as exc:
        raise TorchfimError(
            f"{option}: cannot create the folder {path} ({exc.strerror or exc}); choose a folder you can write to"
        ) from None


def _probe(path: Path, what: str, option: str) -> None:
    """Create and remove a file in ``path``: the folder's permissions, a read-only file system and a full
    disk show here, before the work, rather than when its results are written."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".torchfim-probe-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TorchfimError(
            f"{option}: cannot write into the folder {path} ({exc.strerror or exc}); choose a folder you can write "
            f"to for the {what}, or make it writable"
        ) from None
