"""Same-run comparison of this checkout's torchfim with an earlier commit's, on the older workloads.

    python benchmarks/regression.py [--against COMMIT] [--rounds N] [--fixed-malloc] [--markdown docs/regression.md]

A ratio to the floor measured on another day is not comparable with today's: a new torch build or
another machine moves the floor (the CNN's floor went from 48-58 ms to 27-31 ms between the runs of
docs/performance.md before and after the engine, with the same code), so "within 10 % of the figure
before" is measured here instead, in one process. ``git archive`` exports the earlier commit's
``torchfim`` into a temporary folder, where it is imported as the package ``torchfim_before`` next
to this checkout's ``torchfim``. For each workload a fresh worker process times the floor, the
earlier call and the current call round-robin (call by call, after a warm-up), so that the
machine's slow and fast phases reach all three alike (garbage collected before each call and
paused inside it, as ``run.py`` times). Each now call is paired with the before call of the same
turn of the round-robin (at most two calls apart), and the figure is the median of these paired
quotients over all turns of all rounds, with a distribution-free 90 % interval for that median
(binomial order statistics); ≤ 1.10 means within 10 % of the earlier code. Pairing adjacent calls
cancels the machine's slow and fast phases, which a quotient of whole-round medians keeps (on two
cores shared with other work that one read ±10 % from round to round). ``--fixed-malloc`` runs the
workers with glibc's thresholds fixed (:data:`FIXED_MALLOC`, the settings of docs/speed.md): with the
defaults, where the heap happens to trim decides a good part of a second-order sweep's time (the
same Î2 variance read 1.12 and 1.08 on two runs, 2.1-2.4 M page faults per call against 1.9-2.1 M),
and with them only the code does.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: The last commit before the engine (issue 10): the per-layer fast path and the torch.func path.
BEFORE_ENGINE = "2a26b692a5155ff258bebf2ddc47720671dc9874"
#: glibc thresholds under which freed memory stays in the worker (docs/speed.md, "The memory allocator (Linux)").
FIXED_MALLOC = {"MALLOC_MMAP_THRESHOLD_": "268435456", "MALLOC_TRIM_THRESHOLD_": "1073741824"}
#: Workload name → (model, timed calls of each of the floor, before and now per worker).
WORKLOADS = {
    "diag-score-mlp": ("mlp", 30), "diag-score-cnn": ("cnn", 15), "diag-exact-mlp": ("mlp", 15),
    "diag-exact-cnn": ("cnn", 6), "full-exact-mlps": ("mlps", 3), "trace-exact-mlp": ("mlp", 15),
    "variance-score-diag-mlp": ("mlp", 9), "variance-hessian-diag-mlp": ("mlp", 3),
    "penalty-step-mlp": ("mlp", 30), "penalty-step-mlp-every10": ("mlp", 30),
}


# ----------------------------------------------------------------------------- worker side
def _calls(name: str, torchfim, model, data, cfg):
    """``(floor, call)``: the workload's floor and torchfim's timed call, as in benchmarks/suite."""
    import torch
    import torch.nn.functional as F

    def floor() -> None:
        for x, y in zip(data.batches, data.targets):
            F.cross_entropy(model(x), y, reduction="sum").backward()
        model.zero_grad(set_to_none=True)

    gen = torch.Generator()
    kw = {"n_samples": 1}
    if name.startswith("penalty"):
        return _penalty_calls(name, torchfim, model, data, cfg)
    if name.startswith("variance"):
        estimator = name.split("-")[1]
        return floor, lambda: torchfim.fisher_variance(model, data.batches, estimator=estimator, structure="diag", **kw)
    structure, estimator = name.split("-")[:2]
    return floor, lambda: torchfim.fisher(model, data.batches, estimator=estimator, structure=structure,
                                          generator=gen.manual_seed(cfg.seed), **kw)


def _penalty_calls(name: str, torchfim, base, data, cfg):
    """One plain SGD step against one step with the exact Fisher penalty (every 1 or 10 steps)."""
    import torch
    from suite.workloads.penalty import sgd_steps

    every = 10 if name.endswith("every10") else 1
    model = copy.deepcopy(base)
    pen = torchfim.train.FisherPenalty(model, family="categorical", alpha=cfg.alpha, every=every,
                                       generator=torch.Generator().manual_seed(0))
    return sgd_steps(copy.deepcopy(base), None, data, cfg), sgd_steps(model, pen, data, cfg)


def _import_before(tree: str):
    """The earlier ``torchfim`` under ``tree``, imported as the package ``torchfim_before``."""
    import importlib.util

    init = Path(tree) / "torchfim" / "__init__.py"
    spec = importlib.util.spec_from_file_location("torchfim_before", init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["torchfim_before"] = module
    spec.loader.exec_module(module)
    return module


def worker(tree: str, name: str, reps: int) -> None:
    """Time one workload with both packages; print every call's seconds ``{"floor", "now", "before"}``
    (lists in the order timed; the i-th entries of the three are one turn of the round-robin)."""
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, str(HERE))
    import torch

    import torchfim

    before = _import_before(tree)
    from suite.config import Config
    from suite.models import model_for

    torch.set_num_threads(2)
    cfg = Config()
    model, data, _ = model_for(cfg, WORKLOADS[name][0])
    floor, now = _calls(name, torchfim, model, data, cfg)
    _, then = _calls(name, before, model, data, cfg)
    fns = {"floor": floor, "now": now, "before": then}
    for fn in fns.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(reps):
        for key in list(fns)[r % 3:] + list(fns)[: r % 3]:
            gc.collect()
            gc.disable()  # as benchmarks/run.py times: no collection of another call's garbage inside a call
            try:
                start = time.perf_counter()
                fns[key]()
                times[key].append(time.perf_counter() - start)
            finally:
                gc.enable()
    print(json.dumps(times))


# ----------------------------------------------------------------------------- driver side
def export(commit: str, into: Path) -> Path:
    """The ``torchfim`` package of ``commit`` under ``into`` (``git archive``)."""
    archive = subprocess.run(["git", "archive", commit, "torchfim"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_one(tree: Path, name: str, env: dict[str, str] | None = None, reps: int | None = None) -> dict[str, list[float]]:
    """One worker's times; ``env``: variables added to its environment; ``reps``: turns (default: the workload's)."""
    extra = [] if reps is None else ["--worker-reps", str(reps)]
    out = subprocess.run([sys.executable, __file__, "--worker", str(tree), name, *extra], check=True,
                         capture_output=True, text=True, env=None if env is None else {**os.environ, **env})
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values``: order statistics ``(x_(j), x_(n+1-j))``
    with the largest ``j`` whose coverage ``1 − 2·P(Binomial(n, ½) ≤ j − 1)`` is at least ``confidence``
    (the whole range when no ``j`` reaches it)."""
    x, n = sorted(values), len(values)
    j, tail = 1, 1 / 2**n  # tail = P(Binomial(n, ½) ≤ j − 1)
    while j < (n + 1) / 2:
        next_tail = tail + math.comb(n, j) / 2**n
        if 1 - 2 * next_tail < confidence:
            break
        j, tail = j + 1, next_tail
    return x[j - 1], x[n - j]


def compare(commit: str, rounds: int, names: list[str], env: dict[str, str] | None = None) -> dict[str, dict]:
    """Per workload and round (one worker each, ``env`` added to its environment): both ratios to the
    floor (medians of the round); over all rounds, the paired quotients now ÷ before of the calls of one
    turn, their median and interval."""
    results: dict[str, dict] = {n: {"now": [], "before": [], "pairs": []} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        tree = export(commit, Path(tmp))
        for r in range(rounds):
            for name in names:
                t = run_one(tree, name, env)
                res = results[name]
                floor = statistics.median(t["floor"])
                res["now"].append(statistics.median(t["now"]) / floor)
                res["before"].append(statistics.median(t["before"]) / floor)
                res["pairs"].extend(a / b for a, b in zip(t["now"], t["before"]))
                print(f"round {r + 1}/{rounds} {name}: now {res['now'][-1]:.2f}× floor, before "
                      f"{res['before'][-1]:.2f}× floor", file=sys.stderr, flush=True)
    for res in results.values():
        res["quotient"] = statistics.median(res["pairs"])
        res["interval"] = median_interval(res["pairs"])
    return results


def markdown(results: dict[str, dict], commit: str, rounds: int, env: dict[str, str] | None = None) -> str:
    engine = commit.startswith(BEFORE_ENGINE[: len(commit)]) and len(commit) >= 7
    lines = [
        "# Regression check against " + ("the code before the engine" if engine else f"commit {commit[:12]}"), "",
        "<!-- Generated by benchmarks/regression.py; edit that script, not this file. -->", "",
        (f"This checkout's torchfim against commit `{commit[:12]}`{' (the last before the engine)' if engine else ''} on the "
         f"workloads both have, both packages imported in one process per workload and round ({rounds} rounds, "
         "2 threads), the floor and the two calls timed round-robin, call by call, with garbage collected "
         "before each call. The ratio columns give each round's medians as ratios to the floor. The figure pairs "
         "each call of this code with the earlier code's call of the same turn (at most two calls apart, so a "
         "slow phase of the machine reaches both): the median of these quotients over all turns and rounds, "
         "with a distribution-free 90 % interval for it. The target is a median ≤ 1.10 (within 10 %)."
         + ("" if not env else " The workers ran with " + " ".join(f"`{k}={v}`" for k, v in env.items())
            + ": glibc keeps freed memory, so where its heap trims does not decide the figure.")), "",
        ("| workload | now (× floor, per round) | before (× floor, per round) | now ÷ before, paired "
         "(median [90 % interval], pairs) | ≤ 1.10 |"),
        "| --- | --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        now = ", ".join(f"{v:.2f}" for v in res["now"])
        before = ", ".join(f"{v:.2f}" for v in res["before"])
        ok = "met" if res["quotient"] <= 1.10 else "**missed**"
        low, high = res["interval"]
        lines.append(f"| `{name}` | {now} | {before} | {res['quotient']:.2f} [{low:.2f}, {high:.2f}], "
                     f"{len(res['pairs'])} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default=BEFORE_ENGINE, help="the earlier commit (default: the last before the engine)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names")
    p.add_argument("--markdown", type=Path, help="write the table here (e.g. docs/regression.md)")
    p.add_argument("--json", type=Path, help="write the raw ratios here")
    p.add_argument("--fixed-malloc", action="store_true", help="run the workers with glibc's thresholds fixed")
    p.add_argument("--worker", nargs=2, metavar=("TREE", "WORKLOAD"), help=argparse.SUPPRESS)
    p.add_argument("--worker-reps", type=int, help=argparse.SUPPRESS)  # fewer turns, for the tests
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], args.worker_reps or WORKLOADS[args.worker[1]][1])
        return
    names = [n for n in args.workloads.split(",") if n]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    env = FIXED_MALLOC if args.fixed_malloc else None
    results = compare(args.against, args.rounds, names, env)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    table = markdown(results, args.against, args.rounds, env)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
