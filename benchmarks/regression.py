"""Same-run comparison of this checkout's torchfim with an earlier commit's, on the older workloads.

    python benchmarks/regression.py [--against COMMIT] [--rounds N] [--markdown docs/regression.md]

A ratio to the floor measured on another day is not comparable with today's: a new torch build or
another machine moves the floor (the CNN's floor went from 48-58 ms to 27-31 ms between the runs of
docs/performance.md before and after the engine, with the same code), so "within 10 % of the figure
before" is measured here instead, in one run. ``git archive`` exports the earlier commit's
``torchfim`` into a temporary folder; each round runs every workload once per tree, in a fresh worker
process each (which tree goes first alternates), timing the floor and torchfim's call interleaved
(medians after a warm-up). The figure per workload is the median over rounds of

    (this tree's time / its floor) / (the earlier tree's time / its floor),

so the machine's speed cancels within a round; ≤ 1.10 means within 10 % of the earlier code.
"""

from __future__ import annotations

import argparse
import copy
import json
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
#: Workload name → (model, timed repetitions per round in a worker).
WORKLOADS = {
    "diag-score-mlp": ("mlp", 15), "diag-score-cnn": ("cnn", 9), "diag-exact-mlp": ("mlp", 9),
    "diag-exact-cnn": ("cnn", 5), "full-exact-mlps": ("mlps", 2), "trace-exact-mlp": ("mlp", 9),
    "variance-score-diag-mlp": ("mlp", 7), "variance-hessian-diag-mlp": ("mlp", 2),
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
    import torch.nn.functional as F

    def stepper(every: int | None):
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        pen = None if every is None else torchfim.train.FisherPenalty(
            model, family="categorical", alpha=cfg.alpha, every=every, generator=torch.Generator().manual_seed(0))
        state = {"step": 0}

        def run() -> None:
            for _ in range(cfg.penalty_steps):
                step = state["step"]
                x, y = data.batches[step % len(data.batches)], data.targets[step % len(data.targets)]
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                if pen is not None:
                    loss = loss + pen(x, step=step)
                loss.backward()
                opt.step()
                state["step"] = step + 1

        return run

    return stepper(None), stepper(10 if name.endswith("every10") else 1)


def worker(tree: str, name: str, reps: int) -> None:
    """Time one workload with the ``torchfim`` found in ``tree``; print ``{"floor": s, "call": s}``."""
    import warnings

    warnings.simplefilter("ignore")
    sys.path.insert(0, tree)
    sys.path.insert(1, str(HERE))
    import torch
    import torchfim

    if not torchfim.__file__.startswith(tree):
        raise SystemExit(f"imported torchfim from {torchfim.__file__}, not from {tree}")
    from suite.config import Config
    from suite.models import model_for

    torch.set_num_threads(2)
    cfg = Config()
    model, data, _ = model_for(cfg, WORKLOADS[name][0])
    floor, call = _calls(name, torchfim, model, data, cfg)
    floor(), call()  # warm-up
    times: dict[str, list[float]] = {"floor": [], "call": []}
    for _ in range(reps):
        for key, fn in (("floor", floor), ("call", call)):
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    print(json.dumps({k: statistics.median(v) for k, v in times.items()}))


# ----------------------------------------------------------------------------- driver side
def export(commit: str, into: Path) -> Path:
    """The ``torchfim`` package of ``commit`` under ``into`` (``git archive``)."""
    archive = subprocess.run(["git", "archive", commit, "torchfim"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_one(tree: Path, name: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, __file__, "--worker", str(tree), name], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(commit: str, rounds: int, names: list[str]) -> dict[str, dict]:
    """Per workload: each round's two ratios to the floor and the median of their quotient."""
    results: dict[str, dict] = {n: {"now": [], "before": []} for n in names}
    with tempfile.TemporaryDirectory() as tmp:
        before = export(commit, Path(tmp))
        for r in range(rounds):
            for name in names:
                order = [("now", ROOT), ("before", before)]
                for key, tree in order if r % 2 == 0 else order[::-1]:
                    t = run_one(tree, name)
                    results[name][key].append(t["call"] / t["floor"])
                print(f"round {r + 1}/{rounds} {name}: now {results[name]['now'][-1]:.2f}× floor, "
                      f"before {results[name]['before'][-1]:.2f}× floor", file=sys.stderr, flush=True)
    for res in results.values():
        res["quotient"] = statistics.median(a / b for a, b in zip(res["now"], res["before"]))
    return results


def markdown(results: dict[str, dict], commit: str, rounds: int) -> str:
    lines = [
        "# Regression check against the code before the engine", "",
        "<!-- Generated by benchmarks/regression.py; edit that script, not this file. -->", "",
        f"This checkout's torchfim against commit `{commit[:12]}` (the last before the engine), on the "
        f"workloads both have, in one run: {rounds} rounds, each workload once per tree per round in a fresh "
        "process (2 threads), the floor and torchfim's call interleaved. Ratio = median over rounds of "
        "(now / floor) / (before / floor); the target is ≤ 1.10 (within 10 %).", "",
        "| workload | now (× floor, per round) | before (× floor, per round) | now / before | ≤ 1.10 |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, res in results.items():
        now = ", ".join(f"{v:.2f}" for v in res["now"])
        before = ", ".join(f"{v:.2f}" for v in res["before"])
        ok = "met" if res["quotient"] <= 1.10 else "**missed**"
        lines.append(f"| `{name}` | {now} | {before} | {res['quotient']:.2f} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--against", default=BEFORE_ENGINE, help="the earlier commit (default: the last before the engine)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated names")
    p.add_argument("--markdown", type=Path, help="write the table here (e.g. docs/regression.md)")
    p.add_argument("--json", type=Path, help="write the raw ratios here")
    p.add_argument("--worker", nargs=2, metavar=("TREE", "WORKLOAD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], WORKLOADS[args.worker[1]][1])
        return
    names = [n for n in args.workloads.split(",") if n]
    unknown = sorted(set(names) - set(WORKLOADS))
    if unknown:
        raise SystemExit(f"unknown workloads {unknown}; choose from {sorted(WORKLOADS)}")
    results = compare(args.against, args.rounds, names)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    table = markdown(results, args.against, args.rounds)
    if args.markdown:
        args.markdown.write_text(table)
    print(table)


if __name__ == "__main__":
    main()
