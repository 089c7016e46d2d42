"""The temporary files of :mod:`torchfim._io` that a killed process left: the next write of the same name removes
them (its writing process no longer runs), and never those of a process that still runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from torchfim._io import atomic_write, write_files, write_text

pytestmark = pytest.mark.skipif(os.name != "posix", reason="whether a process runs is only asked on POSIX")


def _dead_pid() -> int:
    """The id of a process that has finished."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(done.stdout)


def _leftovers(directory: Path, name: str) -> tuple[Path, Path]:
    """A temporary file of ``name`` from a killed writer, and one from this (running) process."""
    killed = directory / f".{name}.{_dead_pid()}.0123abcd.tmp"
    running = directory / f".{name}.{os.getpid()}.4567cdef.tmp"
    for tmp in (killed, running):
        tmp.write_text("half a fig")
    return killed, running


@pytest.mark.parametrize("writer", ["atomic_write", "write_text", "write_files"])
def test_a_killed_writers_temporary_file_goes_at_the_next_write(tmp_path: Path, writer: str) -> None:
    killed, running = _leftovers(tmp_path, "figure.png")
    target = tmp_path / "figure.png"
    if writer == "atomic_write":  # what save_figure writes through (before: the killed writer's file stayed)
        atomic_write(target, lambda f: f.write("done"))
    elif writer == "write_text":
        write_text(target, "done")
    else:
        write_files(tmp_path, {"figure.png": "done"})
    assert target.read_text() == "done"
    assert not killed.exists()
    assert running.exists()
