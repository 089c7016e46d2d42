"""How much memory a dense result may take before torchfim refuses to build it."""

from __future__ import annotations

import os

import torch


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, else the host's available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
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


def fits_in_memory(n_entries: int, dtype: torch.dtype, device: torch.device,
                   copies: int = 2) -> tuple[bool, float, float]:
    """Whether ``copies`` tensors of ``n_entries`` fit (by default a result plus one working copy); also the GiB
    needed and free."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = copies * n_entries * itemsize
    free = available_bytes(device)
    return needed <= free, needed / 2**30, free / 2**30
