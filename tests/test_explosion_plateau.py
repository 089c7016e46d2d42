"""The explosion study trains each run until its training accuracy plateaus (issue 12, point 1): at least the least
epochs, then a check every tenth of them, up to the most epochs. The oracle is the rule applied by hand to the
run's own recorded curves, at every check it passed."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("sklearn")

from torchfim.experiments import explosion as E

TINY = E.TINY
SPEC = E.RunSpec("x", "clean", "digits", "mlp", "small", 0.05, 0.0, 0.0, 11, 0)


def _train_acc_at_four_fifths(curves: dict, last_step: int) -> float:
    """The training accuracy at the last measurement at or before four fifths of ``last_step``."""
    return [a for s, a in zip(curves["step"], curves["train_acc"]) if s <= 0.8 * last_step][-1]


def _plateaued_at(curves: dict, step: int, tolerance: float) -> bool:
    """The rule by hand on the curves cut at ``step``: the accuracy there against four fifths of the way."""
    end = curves["train_acc"][curves["step"].index(step)]
    return abs(end - _train_acc_at_four_fifths(curves, step)) <= tolerance


@pytest.mark.parametrize("tolerance", [0.0, 0.02, 0.2])
def test_a_run_stops_at_its_first_check_that_finds_a_plateau(tolerance: float) -> None:
    settings = replace(TINY, epochs=(("digits", 2), ("mnist1d", 2)), max_epochs=(("digits", 12), ("mnist1d", 4)),
                       plateau_tolerance=tolerance)
    result = E.train_one(SPEC, settings)
    curves, per_epoch, epochs = result["curves"], result["steps_per_epoch"], result["final"]["epochs"]
    assert result["steps"] == epochs * per_epoch and curves["step"][-1] == result["steps"]
    checks = range(2, 12)  # a check after every epoch from the least (a tenth of 2 epochs rounds up to 1)
    stopped = next((e for e in checks if _plateaued_at(curves, e * per_epoch, tolerance)), 12)
    assert epochs == stopped
    assert _train_acc_at_four_fifths(curves, result["steps"]) == result["final"]["train_acc_at_four_fifths"]


def test_the_tolerances_give_runs_of_different_lengths() -> None:
    """Else the test above could pass with a rule that never looks at the curves."""
    lengths = set()
    for tolerance in (-1.0, 1.0):
        settings = replace(TINY, epochs=(("digits", 2), ("mnist1d", 2)), max_epochs=(("digits", 5), ("mnist1d", 4)),
                           plateau_tolerance=tolerance)
        lengths.add(E.train_one(SPEC, settings)["final"]["epochs"])
    assert lengths == {2, 5}  # always plateaued: the least epochs; never: the most


def test_the_mean_over_training_is_over_the_least_epochs() -> None:
    """Runs of different lengths compare their memorisation curves over the epochs every run trains."""
    settings = replace(TINY, epochs=(("digits", 2), ("mnist1d", 2)), max_epochs=(("digits", 5), ("mnist1d", 4)),
                       plateau_tolerance=-1.0)
    spec = E.RunSpec("y", "noisy", "digits", "mlp", "small_base", 0.05, 0.0, 0.25, 11, 0)
    result = E.train_one(spec, settings)
    curves, least = result["curves"], 2 * result["steps_per_epoch"]
    kept = [a for s, a in zip(curves["step"], curves["noisy_acc"]) if s <= least]
    assert result["steps"] > least and len(kept) < len(curves["step"])
    assert result["final"]["noisy_acc_auc"] == pytest.approx(sum(kept) / len(kept), rel=1e-5)


def test_a_step_is_measured_once() -> None:
    """A plateau check at an epoch's end is not measured again by the next epoch's first step (each measurement
    draws the monitor's labels)."""
    settings = replace(TINY, epochs=(("digits", 2), ("mnist1d", 2)), max_epochs=(("digits", 4), ("mnist1d", 4)),
                       plateau_tolerance=-1.0)
    steps = E.train_one(SPEC, settings)["curves"]["step"]
    assert 20 in steps and len(steps) == len(set(steps))  # step 20, an epoch's end, is also an eval step of TINY
