"""The scaling sweep of ``torchfim.fisher(estimator="exact", structure="diag")``: each point timed,
and its peak memory measured, in a fresh process (``run.py --sweep-point``)."""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time

import torch
from tqdm.auto import tqdm

import torchfim

from .config import ENTRY, ROOT, Config
from .models import make_mlp, num_params
from .timing import Quiet, contention_probe

__all__ = ["SWEEP_AXES", "LIVE_MALLOC_ENV", "sweep_point", "sweep_specs", "run_sweep", "loglog_slope", "live_peak"]

SWEEP_AXES = ("width", "batch", "classes", "n")


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sweep_point(spec: dict) -> dict:
    """Time and peak memory of one ``torchfim.fisher(exact, diag)`` call; run in a fresh process.

    Peak memory: tracemalloc sees only Python allocations, not torch's (C++) buffers, so the
    process's resident set is measured instead. After imports, data, model and a tiny warm-up
    call (which loads code and allocator pools, not the call's working memory), the kernel's
    peak-RSS mark is reset (``/proc/self/clear_refs``) and the current RSS taken as the baseline;
    the reported peak is ``VmHWM`` after the first full call minus that baseline. Where the reset
    is unsupported, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after is used
    (which can only under-report, if an earlier step had a higher peak).
    """
    import resource

    torch.set_num_threads(int(spec.get("threads", 2)))
    width, classes, batch, n = int(spec["width"]), int(spec["classes"]), int(spec["batch"]), int(spec["n"])
    if spec.get("data") == "digits":
        from torchfim.datasets import load_digits

        X = load_digits(torch.float32)[0][:n]
    else:
        X = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    model = make_mlp((64, width, width, classes), seed=0)
    batches = list(X.split(batch))
    torchfim.fisher(make_mlp((64, 2, 2, classes), seed=0), X[:2], estimator="exact", structure="diag")
    gc.collect()
    reset = _reset_peak()
    base_kib = _rss_kib("VmRSS") if reset else None
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    torchfim.fisher(model, batches, estimator="exact", structure="diag")
    cold = time.perf_counter() - t0
    if reset and base_kib is not None and _rss_kib("VmHWM") is not None:
        peak_kib, method = _rss_kib("VmHWM") - base_kib, "VmHWM after reset"
    else:
        peak_kib, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, "ru_maxrss"
    if spec.get("memory_only"):
        return {**spec, "P": num_params(model), "cold_seconds": cold, "peak_mib": peak_kib / 1024,
                "memory_method": method}
    reps = 1 if cold > 5 else int(spec.get("reps", 3))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torchfim.fisher(model, batches, estimator="exact", structure="diag")
        times.append(time.perf_counter() - t0)
    return {**spec, "P": num_params(model), "seconds": statistics.median(times), "cold_seconds": cold,
            "peak_mib": peak_kib / 1024, "memory_method": method}


def sweep_specs(quick: bool) -> list[dict]:
    """The sweep's points: width, batch size, classes and data-set size, each varied alone."""
    if quick:
        return [
            {"axis": "width", "width": 8, "classes": 10, "batch": 32, "n": 64, "data": "digits"},
            {"axis": "width", "width": 32, "classes": 10, "batch": 32, "n": 64, "data": "digits"},
            {"axis": "n", "width": 16, "classes": 10, "batch": 32, "n": 64, "data": "random"},
            {"axis": "n", "width": 16, "classes": 10, "batch": 32, "n": 128, "data": "random"},
        ]
    specs = []
    for w in (8, 16, 32, 64, 128, 256, 512, 1024):
        specs.append({"axis": "width", "width": w, "classes": 10, "batch": 256, "n": 1797, "data": "digits"})
    for b in (16, 32, 64, 128, 256, 512, 1024, 1797):
        specs.append({"axis": "batch", "width": 256, "classes": 10, "batch": b, "n": 1797, "data": "digits"})
    for c in (2, 5, 10, 20, 50, 100, 200):
        specs.append({"axis": "classes", "width": 256, "classes": c, "batch": 256, "n": 1797, "data": "digits"})
    for n in (256, 512, 1024, 2048, 4096, 8192, 16384):
        specs.append({"axis": "n", "width": 256, "classes": 10, "batch": 256, "n": n, "data": "random"})
    return specs


#: glibc malloc settings for the "live memory" measurement: blocks ≥ 64 KiB come from mmap and go
#: back to the OS when freed, and the heap is trimmed on every free, so the peak resident set
#: follows the memory actually in use instead of heap fragmentation (which, with glibc's defaults,
#: lets the resident set creep up by some MiB over many mini-batches even when nothing is kept).
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _sweep_subprocess(spec: dict, env: dict | None, timeout: float) -> dict:
    cmd = [sys.executable, str(ENTRY), "--sweep-point", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SWEEP-POINT ")]
    if proc.returncode != 0 or not line:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[-1][len("SWEEP-POINT "):])


def run_sweep(cfg: Config, quiet: Quiet, timeout: float = 600.0, progress: bool = True) -> list[dict]:
    """Each point twice, each time in a fresh process: timing and peak RSS with glibc's default
    malloc (``peak_mib``), then peak RSS only with :data:`LIVE_MALLOC_ENV` (``peak_live_mib``)."""
    points = []
    for spec in tqdm(sweep_specs(cfg.quick), desc="sweep", unit="point", disable=not progress):
        spec = {**spec, "threads": cfg.threads}
        for _ in range(1 + (cfg.retries if cfg.quiet_wait_s > 0 else 0)):
            before = quiet.wait() if cfg.quiet_wait_s > 0 else contention_probe(cfg.threads)
            point = _sweep_subprocess(spec, None, timeout)
            point["contention"] = max(before, contention_probe(cfg.threads))
            if point["contention"] <= cfg.quiet_threshold or "error" in point:
                break
        if "error" not in point:
            live = _sweep_subprocess({**spec, "memory_only": True}, LIVE_MALLOC_ENV, timeout)
            point["peak_live_mib"] = live.get("peak_mib")
            if "error" in live:
                point["live_error"] = live["error"]
        points.append(point)
    return points


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log y against log x (None with fewer than two positive points)."""
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def live_peak(point: dict) -> float | None:
    """The live-memory peak of a sweep point (None when it was not measured)."""
    if "error" in point:
        return None
    return point.get("peak_live_mib")
