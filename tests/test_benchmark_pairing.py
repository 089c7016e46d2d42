"""The benchmark's ratios pair each call with the median of the reference's calls in the same round
(benchmarks/suite/pairing.py), and the harness times rounds turn by turn and records each call's turn."""

from __future__ import annotations

import statistics
import types

import pytest


def _details(a: list, b: list, turns_a: list, turns_b: list, clean_a=None, clean_b=None) -> dict:
    return {"samples": {"w": {"a": a, "b": b}}, "turns": {"w": {"a": turns_a, "b": turns_b}},
            "clean": {"w": {"a": clean_a or [True] * len(a), "b": clean_b or [True] * len(b)}}}


def test_paired_ratio_cancels_slow_rounds_that_medians_keep(suite):
    # Rounds run 1×, 1×, 3×, 3×, 3× slow; b calls three times a round, a once (a fell into slow rounds).
    slow = [1.0, 1.0, 3.0, 3.0, 3.0]
    turns_b = [(r, k) for r in range(5) for k in range(3)]
    b = [slow[r] for r, _ in turns_b]
    turns_a = [(r, 0) for r in (0, 2, 3, 4, 4)]
    a = [2.0 * slow[r] for r, _ in turns_a]  # a is twice b in every round
    details = _details(a, b, turns_a, turns_b)
    assert suite["pairing"].paired_ratio(details, "w", "a", "b") == pytest.approx(2.0)
    assert statistics.median(a) / statistics.median(b) == pytest.approx(2.0)  # by luck: b's median is 3...
    turns_a = [(r, 0) for r in (0, 0, 1, 1, 2)]  # ...but a timed in the fast rounds would seem faster than b
    a = [2.0 * slow[r] for r, _ in turns_a]
    details = _details(a, b, turns_a, turns_b)
    assert suite["pairing"].paired_ratio(details, "w", "a", "b") == pytest.approx(2.0)
    assert statistics.median(a) / statistics.median(b) == pytest.approx(2 / 3)


def test_a_slow_first_call_of_the_reference_does_not_move_the_ratio(suite):
    # b's first call of each round follows a long call of another contender and runs 3× slow; a calls
    # once a round, in the first turn: pairing by turn would give 2/3, the round's median gives 2.
    turns_b = [(r, k) for r in range(5) for k in range(5)]
    b = [3.0 if k == 0 else 1.0 for _, k in turns_b]
    turns_a = [(r, 0) for r in range(5)]
    details = _details([2.0] * 5, b, turns_a, turns_b)
    assert suite["pairing"].paired_ratio(details, "w", "a", "b") == pytest.approx(2.0)


def test_rounds_the_reference_lacks_are_left_out(suite):
    details = _details([4.0, 6.0, 30.0], [1.0, 3.0], [(0, 0), (0, 1), (1, 0)], [(0, 0), (0, 1)])
    # round 0: 4/2 and 6/2; round 1 has no call of b
    assert suite["pairing"].paired_ratio(details, "w", "a", "b") == pytest.approx(2.5)


def test_contended_calls_are_left_out_when_five_quiet_ones_remain(suite):
    turns = [(r, 0) for r in range(7)]
    a = [2.0] * 5 + [50.0, 50.0]
    b = [1.0] * 7
    quiet = [True] * 5 + [False, False]
    pairing = suite["pairing"]
    assert pairing.paired_ratio(_details(a, b, turns, turns, quiet), "w", "a", "b") == 2.0
    few = [True] * 4 + [False] * 3  # four quiet calls: all seven count
    a[:3] = [50.0] * 3
    assert pairing.paired_ratio(_details(a, b, turns, turns, few), "w", "a", "b") == 50.0
    # in the reference's rounds, its quiet calls make the partner
    turns_b = [(r, k) for r in range(7) for k in range(2)]
    b = [1.0, 9.0] * 7
    details = _details([2.0] * 7, b, turns, turns_b, clean_b=[True, False] * 7)
    assert pairing.paired_ratio(details, "w", "a", "b") == 2.0


def test_ratio_falls_back_to_medians_without_turns_or_across_workloads(suite):
    ratio = suite["pairing"].ratio
    main = {"w": {"a": 6.0, "b": 2.0}, "v": {"b": 3.0}}
    details = _details([4.0], [1.0], [(0, 0)], [(0, 0)])
    assert ratio(main, details, "w", "a", "w", "b") == 4.0  # paired
    assert ratio(main, {}, "w", "a", "w", "b") == 3.0  # a run without turns: medians
    assert ratio(main, details, "w", "a", "v", "b") == 2.0  # two workloads: medians
    assert ratio(main, details, "w", "c", "w", "b") is None


def test_targets_use_the_paired_ratio(suite):
    turns = [(r, 0) for r in range(5)]
    main = {"penalty-step-mlp": {"plain": 1.0, "torchfim-fd": 3.0}}
    details = {"samples": {"penalty-step-mlp": {"plain": [1.0, 2.0, 4.0, 8.0, 16.0],
                                                "torchfim-fd": [2.1, 4.2, 8.4, 16.8, 33.6]}},
               "turns": {"penalty-step-mlp": {"plain": turns, "torchfim-fd": turns}}}
    targets = {t["target"]: t for t in suite["targets"].evaluate_targets(main, details)}
    fd = targets["penalty step with the finite-difference gradient, every=1: ≤ 2.2× plain SGD step"]
    assert fd["value"] == pytest.approx(2.1) and fd["status"] == "met"  # the medians would say 3.0, missed


def test_rounds_run_turn_by_turn_and_each_sample_keeps_its_turn(suite, monkeypatch):
    timing, workload = suite["timing"], suite["workload"]
    monkeypatch.setattr(timing, "contention_probe", lambda threads: 1.0)
    # A clock of its own: a real sleep measured on a loaded machine ran long and changed the calls per round.
    clock = [0.0]
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0],
                                                              sleep=lambda s: clock.__setitem__(0, clock[0] + s)))
    calls: list[str] = []

    def contender(name: str, warmup_s: float):
        def make():
            first = [True]

            def run():
                calls.append(name)
                if first[0]:  # the warm-up: how long the call seems to take decides its calls per round
                    first[0] = False
                    clock[0] += warmup_s
            return run
        return workload.Contender(name, make, compare=False)

    wl = workload.Workload("w", "m", 1, [contender("fast", 0.065), contender("slow", 0.2)])
    cfg = suite["config"].Config(reps=2, quiet_wait_s=0.0, max_inner=10)

    class Bar:
        def set_postfix_str(self, *_):
            pass

        def update(self, *_):
            pass

    out = timing.run_workload(wl, cfg, Bar(), timing.Quiet(cfg))
    timed = calls[2:]  # after the two warm-ups: fast 4 calls a round (0.3 s / 0.065 s), slow 1
    assert timed == ["fast", "slow", "fast", "fast", "fast"] + ["slow", "fast", "fast", "fast", "fast"]
    assert out.turns == {"fast": [(r, k) for r in range(2) for k in range(4)], "slow": [(0, 0), (1, 0)]}
    assert [len(out.samples[c]) for c in ("fast", "slow")] == [8, 2]
