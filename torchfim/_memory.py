"""How much memory a dense result may take before torchfim refuses to build it.

On the host the free memory is ``MemAvailable``; in a container whose cgroup limits its memory (Docker's
``--memory``, a Kubernetes pod's limit) it is the least, over the process's cgroup and those above it, of
the limit less the memory charged there that cannot be reclaimed (the usage less its inactive file cache, as
Kubernetes counts a working set): ``MemAvailable`` reports the host's, and a result that fits the host but not
the limit would be killed, not refused.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: Where cgroup file systems are mounted and the file naming the process's cgroups (module attributes so that a
#: test can point them at a tree of its own).
CGROUP_ROOT, PROC_CGROUP = Path("/sys/fs/cgroup"), Path("/proc/self/cgroup")
#: Per cgroup version: the folder under :data:`CGROUP_ROOT`, the files of the limit, the usage, and the key of
#: the inactive file cache in ``memory.stat``.
_V2 = ("", "memory.max", "memory.current", "inactive_file")
_V1 = ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
#: Limits at or above this are "no limit" (cgroup v1 writes 2⁶³ rounded down to a page).
_UNLIMITED = 2**60


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, else the host's available RAM, or less where the process's
    cgroups limit its memory (see the module docstring)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    limited = cgroup_free_bytes()
    host = _host_available()
    return host if limited is None else min(host, limited)


def _host_available() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**63 - 1


def cgroup_free_bytes() -> int | None:
    """The least free memory under a limit of the process's memory cgroup or one above it (None: no limit, or
    no cgroup file system to read)."""
    try:
        entries = [line.split(":", 2) for line in PROC_CGROUP.read_text().splitlines()]
    except OSError:
        return None
    free = None
    for _, controllers, path in (e for e in entries if len(e) == 3):
        version = _V2 if controllers == "" else _V1 if "memory" in controllers.split(",") else None
        if version is None:
            continue
        base = CGROUP_ROOT / version[0]
        here = base / path.strip("/")
        for folder in [here, *here.parents] if here.is_dir() else [base]:  # a namespaced cgroup sits at the root
            room = _room(folder, *version[1:])
            if room is not None:
                free = room if free is None else min(free, room)
            if folder == base:
                break
    return free


def _room(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    """The limit of the cgroup ``folder`` less its usage that cannot be reclaimed; None without a limit. A usage
    or cache that cannot be read counts as none: the limit itself stays known."""
    try:
        limit = (folder / limit_file).read_text().strip()
        limit_bytes = None if limit == "max" else int(limit)
    except (OSError, ValueError):
        return None
    if limit_bytes is None or limit_bytes >= _UNLIMITED:
        return None
    return max(0, limit_bytes - _read_int(folder / usage_file) + _stat(folder, inactive_key))


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return 0


def _stat(folder: Path, key: str) -> int:
    """The value of ``key`` in the cgroup's ``memory.stat`` (0 where it cannot be read)."""
    try:
        for line in (folder / "memory.stat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def size_text(gib: float) -> str:
    """A size given in GiB as a person reads it: in GiB from 1 GiB, else in MiB, else in KiB (a refusal of a small
    matrix on a machine out of memory read "0.0 GiB needed, 0.0 GiB available")."""
    gib = max(gib, 0.0)  # a cgroup's usage above its limit leaves no room, not a negative one
    if gib >= 1:
        return f"{_digits(gib)} GiB"
    return f"{_digits(gib * 1024)} MiB" if gib >= 1 / 1024 else f"{gib * 1024**2:.0f} KiB"


def _digits(x: float) -> str:
    """Three significant digits, without an exponent (14901, not 1.49e+04)."""
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


#: Below this (in GiB) a refused allocation is small: the machine, not the request, is what to change.
SMALL_REQUEST_GIB = 1 / 16


def fits_in_memory(n_entries: int, dtype: torch.dtype, device: torch.device,
                   copies: int = 2) -> tuple[bool, float, float]:
    """Whether ``copies`` tensors of ``n_entries`` fit (by default a result plus one working copy); also the GiB
    needed and free."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = copies * n_entries * itemsize
    free = available_bytes(device)
    return needed <= free, needed / 2**30, free / 2**30
