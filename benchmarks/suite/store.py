"""The run's files: ``--json`` (medians) and its sibling ``.details.json`` (everything else), written
atomically after every workload, and the environment they record."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

import torchfim
from torchfim._io import write_text

from .config import ROOT, Config

__all__ = ["details_path", "environment", "Report"]


def details_path(json_path: Path) -> Path:
    """``bench.json`` -> ``bench.details.json``."""
    json_path = Path(json_path)
    stem = json_path.name[:-5] if json_path.name.endswith(".json") else json_path.name
    return json_path.with_name(stem + ".details.json")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(cfg: Config, status: dict) -> dict:
    """Date, versions, commit, CPU, threads, load and the configuration of this run."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dirty = _git("status", "--porcelain", "--", "torchfim")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchfim": getattr(torchfim, "__version__", None),
        "torchfim_commit": _git("rev-parse", "--short", "HEAD"),
        "torchfim_uncommitted_changes": bool(dirty),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peers": status,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
    }


@dataclass
class Report:
    """The ``--json`` mapping and its details, as they grow."""
    main: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def write(self, json_path: Path | None) -> None:
        """Write both files atomically (nothing without ``--json``)."""
        if json_path is None:
            return
        write_text(Path(json_path), json.dumps(self.main, indent=2) + "\n")
        write_text(details_path(json_path), json.dumps(self.details, indent=2, default=str) + "\n")
