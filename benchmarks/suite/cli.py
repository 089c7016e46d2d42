"""The command line of ``benchmarks/run.py``: a run, a re-render, or one sweep point."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
import warnings
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from torchfim._io import write_text

from . import peers as peer_lib
from .config import QUICK, Config
from .models import load_data
from .pairing import workload_ratios
from .plots import plot_sweep
from .render import fmt_value, render_markdown, summary_table
from .store import Report, details_path, environment
from .sweep import run_sweep, sweep_point
from .targets import evaluate_targets
from .timing import Outcome, Quiet, run_workload, short_error
from .workload import Workload
from .workloads import WORKLOADS

__all__ = ["parse_args", "main"]

DESCRIPTION = "Benchmarks of torchfim against its peers (BackPACK, nngeometry, curvlinops)."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The options of ``run.py``."""
    ap = argparse.ArgumentParser(prog="benchmarks/run.py", description=DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write {workload: {contender: seconds}} here (+ .details.json)")
    ap.add_argument("--markdown", type=Path, help="write the report (docs/performance.md) here")
    ap.add_argument("--plots", type=Path, help="directory for the sweep PNGs (default: <markdown dir>/performance)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    ap.add_argument("--reps", type=int, help="timed repetitions per contender (default 5; --quick 3)")
    ap.add_argument("--workloads", default="all", help="comma-separated workload names, 'all' or 'none'")
    ap.add_argument("--sweep", action="store_true", help="run the scaling sweep (implied by --markdown)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sweep even with --markdown")
    ap.add_argument("--threads", type=int, help="torch threads (default 2; --quick 1)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--quiet-wait", type=float,
                    help="before each timed call wait up to this many seconds for other jobs to leave the "
                         "cores free, and retake a call that ran under contention (default 60; --quick 0: off)")
    ap.add_argument("--quiet-budget", type=float, help="total seconds of such waiting per run (default 1800)")
    ap.add_argument("--render", type=Path, help="re-render --markdown from this finished run's --json file")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--sweep-point", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark (or re-render a finished run, or time one sweep point); exit status."""
    # BackPACK's module hooks fire on the first layer, whose input needs no gradient; torch warns about
    # that on every backward. It is harmless (BackPACK's own test suite sees it too) and floods the log.
    warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
    args = parse_args(argv)
    if args.sweep_point:
        print("SWEEP-POINT " + json.dumps(sweep_point(json.loads(args.sweep_point))), flush=True)
        return 0
    if args.render:
        return _rerender(args)
    if args.workloads == "all":
        names = list(WORKLOADS)
    elif args.workloads == "none":
        names = []
    else:
        names = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in names if w not in WORKLOADS]
        if unknown:
            print(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
    cfg = QUICK if args.quick else Config()
    cfg = replace(cfg, tol=args.tol, **({"reps": args.reps} if args.reps else {}),
                  **({"threads": args.threads} if args.threads else {}),
                  **({"quiet_wait_s": args.quiet_wait} if args.quiet_wait is not None else {}),
                  **({"quiet_budget_s": args.quiet_budget} if args.quiet_budget is not None else {}))
    torch.set_num_threads(cfg.threads)
    report = _run(args, cfg, names)
    print(summary_table(report.main, report.details))
    print()
    for t in report.details["targets"]:
        print(f"[{t['status']:>6}] {t['target']}: {fmt_value(t)}")
    return 0


def _rerender(args: argparse.Namespace) -> int:
    """``--render``: the markdown (and the sweep plots) again from a finished run's files."""
    main_map = json.loads(Path(args.render).read_text())
    details = json.loads(details_path(args.render).read_text())
    # Ratios and targets again from the samples (the statistic may have changed since the run).
    details["ratios"] = {w: workload_ratios(main_map, details, w) for w in main_map if w in details.get("ratio_reference", {})}
    details["targets"] = evaluate_targets(main_map, details)
    if args.markdown:
        plots = details.get("plots") or {}
        if details.get("sweep"):  # redraw from the stored points (the plotting code may have changed)
            plots = plot_sweep(details["sweep"], args.plots or (args.markdown.parent / "performance"))
        write_text(args.markdown, render_markdown(main_map, details, args.markdown, plots))
        print(f"wrote {args.markdown}")
    print(summary_table(main_map, details))
    return 0


def _run(args: argparse.Namespace, cfg: Config, names: list[str]) -> Report:
    """Every chosen workload in turn, then the sweep, the targets and the files."""
    quiet = Quiet(cfg)
    start = time.perf_counter()
    status = peer_lib.peer_status()
    load_data(cfg)  # imports scikit-learn
    # Move everything allocated by the imports to the permanent generation: gc.collect() before
    # each timed call then costs microseconds instead of a scan of the whole heap.
    gc.collect()
    gc.freeze()
    report = Report()
    d = report.details
    d.update({"about": "sibling of the --json mapping {workload: {contender: median seconds}}",
              "environment": environment(cfg, status), "n_inputs": load_data(cfg).n,
              "ratios": {}, "ratio_reference": {}, "agreement": {}, "pivot": {}, "checks": {}, "flagged": {},
              "errors": {}, "left_out": {}, "notes": {}, "skipped": {}, "models": {}, "samples": {},
              "warmup_seconds": {}, "contention": {}, "retried": {}, "clean": {}, "turns": {}, "targets": [], "sweep": [],
              "plots": {}})
    for name, st in status.items():
        if not st["available"]:
            print(f"peer {name}: {st['error']}", file=sys.stderr)

    # progress: one tick per warm-up and per timed repetition of each contender
    bar = tqdm(total=0, desc="benchmarks", unit="run", disable=args.no_progress)
    for name in names:
        bar.set_postfix_str(f"{name}: building")
        wl = _build(name, cfg, status, d)
        if wl is not None:
            bar.total += len(wl.contenders) * (1 + cfg.reps)
            bar.refresh()
            _record(report, name, wl, run_workload(wl, cfg, bar, quiet))
        report.write(args.json)
    bar.close()

    if (args.sweep or args.markdown is not None) and not args.no_sweep:
        d["sweep"] = run_sweep(cfg, quiet, progress=not args.no_progress)
        plot_dir = args.plots or ((args.markdown.parent / "performance") if args.markdown else None)
        if plot_dir is not None:
            try:
                d["plots"] = plot_sweep(d["sweep"], plot_dir)
            except Exception as exc:  # noqa: BLE001
                d["errors"]["sweep-plots"] = {"matplotlib": short_error(exc)}
    d["targets"] = evaluate_targets(report.main, d)
    d["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    d["total_seconds"] = time.perf_counter() - start
    d["waited_for_quiet_seconds"] = quiet.waited
    report.write(args.json)
    if args.markdown:
        write_text(args.markdown, render_markdown(report.main, d, args.markdown, d["plots"]))
    return report


def _build(name: str, cfg: Config, status: dict, d: dict) -> Workload | None:
    """The workload, or None when it cannot be built (the reason goes to ``d["skipped"]``)."""
    try:
        return WORKLOADS[name](cfg, status)
    except ImportError as exc:
        d["skipped"][name] = f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        d["skipped"][name] = "building the workload failed: " + short_error(exc)
        traceback.print_exc(file=sys.stderr)
    return None


def _record(report: Report, name: str, wl: Workload, out: Outcome) -> None:
    """A timed workload's medians into the ``--json`` mapping, everything else into the details."""
    d = report.details
    report.main[name] = out.seconds
    d["ratio_reference"][name] = wl.ratio_to
    d["agreement"][name] = out.agreement
    d["pivot"][name] = out.pivot
    if out.check is not None:
        d["checks"][name] = out.check
    d["flagged"][name] = out.flagged
    d["errors"][name] = out.errors
    d["left_out"][name] = wl.left_out
    d["notes"][name] = wl.notes + ([(f"only two results, which disagree: {', '.join(out.flagged)} flagged by "
                                     "convention (torchfim is the pivot), which of the two is wrong is open")]
                                   if out.flagged and len(out.agreement) == 1 and out.pivot == "torchfim" else [])
    d["models"][name] = {"arch": wl.model, "P": wl.num_params}
    d["samples"][name] = out.samples
    d["warmup_seconds"][name] = out.warmup
    d["contention"][name] = out.contention
    d["retried"][name] = out.retried
    d["clean"][name] = out.clean
    d["turns"][name] = out.turns
    d["ratios"][name] = workload_ratios(report.main, d, name)
    if out.contended_medians:
        d["notes"][name].append("too few calls on a quiet machine for " + ", ".join(out.contended_medians)
                                + ": the median includes calls that ran under contention")
    for c, info in out.flagged.items():
        tqdm.write(f"[{name}] {c} FLAGGED: {info['reason']}", file=sys.stderr)
