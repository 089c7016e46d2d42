"""Timing the contenders: warm-up, agreement, interleaved timed rounds on a quiet machine, medians.

Each round runs turn by turn (every contender's k-th call of the round next to the others'), and each
sample keeps its ``(round, turn)``, from which :mod:`.pairing` takes ratios of calls paired by round.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .agreement import agreement
from .config import Config
from .workload import Runner, Workload

__all__ = ["contention_probe", "Quiet", "Outcome", "run_workload", "short_error"]


def contention_probe(threads: int) -> float:
    """How much slower a small parallel op runs on ``threads`` threads than on one, right now.

    ``torch.tanh`` of a 256×256 tensor, best of 3 bursts of 20. On an idle machine the ratio is
    about 1 or below; when other processes occupy the cores, each parallel region waits for a
    descheduled thread and the ratio climbs far above 1 (tens, on a busy 2-core machine), and
    every timing with ``threads > 1`` is inflated accordingly — the more small ops a contender
    issues, the more. Recorded before every timing round so the report can say how much to trust
    the numbers.
    """
    if threads <= 1:
        return 1.0
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def best(k: int) -> float:
        torch.set_num_threads(k)
        fastest = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                torch.tanh(a)
            fastest = min(fastest, time.perf_counter() - t0)
        return fastest

    try:
        single = best(1)
        return best(threads) / max(single, 1e-9)
    finally:
        torch.set_num_threads(threads)


class Quiet:
    """Waits, before a timed call, until the contention probe is at most ``cfg.quiet_threshold``.

    At most ``cfg.quiet_wait_s`` per call and ``cfg.quiet_budget_s`` over the whole run; then
    it times anyway (and the probe value goes to the report).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.budget = cfg.quiet_budget_s
        self.waited = 0.0

    def wait(self, notify: Callable[[], None] | None = None) -> float:
        """Wait for a quiet machine (``notify`` once if waiting); return the last probe."""
        probe = contention_probe(self.cfg.threads)
        spent = 0.0
        while probe > self.cfg.quiet_threshold and spent < self.cfg.quiet_wait_s and self.budget > 0:
            if notify is not None and spent == 0.0:
                notify()
            time.sleep(2.0)
            spent += 2.0
            self.budget -= 2.0
            self.waited += 2.0
            probe = contention_probe(self.cfg.threads)
        return probe


@dataclass
class Outcome:
    """What timing one workload found: medians, samples, agreement, flags, errors, probes."""
    seconds: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    warmup: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    pivot: str | None = None
    flagged: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    check: dict | None = None
    contention: list[float] = field(default_factory=list)
    retried: int = 0
    clean: dict[str, list[bool]] = field(default_factory=dict)  # per sample: no contention around it
    turns: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # per sample: (round, turn)
    contended_medians: list[str] = field(default_factory=list)  # medians that had to use contended calls


def short_error(exc: BaseException) -> str:
    """``Type: message``, cut to 500 characters."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 500 else text[:497] + "..."


def run_workload(wl: Workload, cfg: Config, bar, quiet: Quiet) -> Outcome:
    """Warm up every contender, check that their results agree, time the agreeing ones."""
    out = Outcome()
    runners, results = _warm_up(wl, out, bar)
    _check(wl, cfg, out, runners, results)
    timed = [c for c in runners if c not in out.flagged]
    bar.update(cfg.reps * (len(wl.contenders) - len(timed)))
    _time(wl, cfg, out, runners, timed, bar, quiet)
    # The median over the calls that ran on a quiet machine, when there are at least five of them
    # (or all of the calls were clean); otherwise over all calls, and the report says so.
    for c in timed:
        kept = [t for t, ok in zip(out.samples[c], out.clean[c]) if ok]
        if len(kept) < min(5, len(out.samples[c])):
            kept = out.samples[c]
            out.contended_medians.append(c)
        out.seconds[c] = statistics.median(kept)
    return out


def _warm_up(wl: Workload, out: Outcome, bar) -> tuple[dict[str, Runner], dict[str, object]]:
    """Make and run each contender once: ``(runners, results to compare)``; failures go to ``out.errors``."""
    runners: dict[str, Runner] = {}
    results: dict[str, object] = {}
    for c in wl.contenders:
        bar.set_postfix_str(f"{wl.name}: {c.name} (warm-up)")
        try:
            runner = c.make()
            gc.collect()
            t0 = time.perf_counter()
            result = runner()
            out.warmup[c.name] = (time.perf_counter() - t0) / c.per_call
            runners[c.name] = runner
            if c.compare and result is not None:
                results[c.name] = result
        except Exception as exc:  # noqa: BLE001 - one contender's failure must not end the run
            out.errors[c.name] = short_error(exc)
            traceback.print_exc(file=sys.stderr)
        bar.update(1)
    return runners, results


def _check(wl: Workload, cfg: Config, out: Outcome, runners: dict, results: dict) -> None:
    """The agreement of the results (and the workload's own check); disagreeing contenders are flagged."""
    compared = dict(results)
    if wl.reference_value is not None and "torchfim" in compared:
        compared["torchfim"] = wl.reference_value
    if len(compared) >= 2:
        out.pivot, out.agreement, flagged = agreement(compared, cfg.tol)
        for name, err in flagged.items():
            out.flagged[name] = {"rel_error": err, "against": out.pivot,
                                 "reason": f"result differs from {out.pivot}'s by rel. error {err:.2e} "
                                           f"(≥ {cfg.tol:g}); time dropped"}
    if wl.check is not None and "torchfim" in runners:
        try:
            err, what = wl.check(results.get("torchfim"))
            out.check = {"rel_error": err, "against": what, "passed": err < cfg.tol}
            if not err < cfg.tol:
                out.flagged["torchfim"] = {"rel_error": err, "against": what,
                                           "reason": f"differs from the independent check by rel. error "
                                                     f"{err:.2e} (≥ {cfg.tol:g}); time dropped"}
        except Exception as exc:  # noqa: BLE001
            out.check = {"rel_error": None, "against": "check failed: " + short_error(exc), "passed": None}
            traceback.print_exc(file=sys.stderr)


def _time(wl: Workload, cfg: Config, out: Outcome, runners: dict, timed: list[str], bar, quiet: Quiet) -> None:
    """``cfg.reps`` interleaved rounds of timed calls, each retaken (up to ``cfg.retries``) under contention."""
    by_name = {c.name: c for c in wl.contenders}
    out.samples = {c: [] for c in timed}
    # Short calls are noisy: a contender whose warm-up took under 0.3 s is timed several times per
    # round (up to 10), each call one sample, so its median rests on more samples.
    inner = {c: max(1, min(cfg.max_inner, int(0.3 / max(out.warmup[c] * by_name[c].per_call, 1e-4))))
             for c in timed}
    for r in range(cfg.reps):
        order = timed[r % len(timed):] + timed[: r % len(timed)] if timed else []
        # Turn by turn: every contender's k-th call of the round next to the others', so that a phase of
        # the machine within the round reaches all of them.
        turns = [(n, k) for k in range(max(inner.values(), default=0)) for n in order if k < inner[n]]
        for name, k in turns:
            bar.set_postfix_str(f"{wl.name}: {name} ({r + 1}/{cfg.reps})")
            for _ in range(1 + (cfg.retries if cfg.quiet_wait_s > 0 else 0)):
                before = quiet.wait(lambda: bar.set_postfix_str(f"{wl.name}: waiting for a quiet machine"))
                gc.collect()
                gc.disable()  # no collection pauses inside a timed call (garbage of another contender)
                try:
                    t0 = time.perf_counter()
                    runners[name]()
                    seconds = (time.perf_counter() - t0) / by_name[name].per_call
                finally:
                    gc.enable()
                after = contention_probe(cfg.threads)
                if max(before, after) <= cfg.quiet_threshold:
                    break
                out.retried += 1  # contention around this call: take it again
            clean = max(before, after) <= cfg.quiet_threshold
            out.samples[name].append(seconds)
            out.turns.setdefault(name, []).append((r, k))
            out.clean.setdefault(name, []).append(clean)
            out.contention.append(max(before, after))
            if k == inner[name] - 1:
                bar.update(1)
