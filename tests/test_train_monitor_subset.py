"""FisherTraceMonitor(subset=m): rotating windows of held inputs and a finite-population standard error.

Sampling-order contract relied on by the brute force below: at its first measurement the
monitor draws ``torch.randperm(N, generator=g)`` over the N held inputs (pooled in order); then
measurement j draws the labels of window ``perm[j·m … j·m + m − 1 (mod N)]`` with one call
``family.sample(o, n_samples, g)`` on that window's outputs, and nothing else.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from test_train_monitor import score_sq_norms
from torch import nn

import torchfim
from torchfim.families import get_family
from torchfim.train import FisherTraceMonitor
from torchfim.train.held import hold, pooled_groups


def fpc_variance(s: torch.Tensor, population: int) -> float:
    """((1 − f) s² + f v̄)/n written out: s² of the per-input means, v̄ their label variance (k ≥ 2)."""
    n, k = s.shape
    m = s.mean(1)
    spread = float(((m - m.mean()) ** 2).sum() / (n - 1))
    label = float((((s - s.mean(1, keepdim=True)) ** 2).sum(1) / (k - 1) / k).mean()) if k > 1 else spread
    f = n / population
    return ((1 - f) * spread + f * label) / n


@pytest.mark.parametrize("k", [1, 3])
def test_windows_rotate_over_one_permutation_and_match_brute_force(k: int) -> None:
    """Five measurements of 12 out of 40 inputs (held as three mini-batches): the fourth wraps around."""
    model, x = tanh_mlp(3, seed=60), mlp_inputs(40, seed=61)
    held = [x[:15], x[15:30], x[30:]]
    mon = FisherTraceMonitor(model, held, every=1, n_samples=k, subset=12, generator=torch.Generator().manual_seed(8))
    replay = torch.Generator().manual_seed(8)
    perm = torch.randperm(40, generator=replay)
    seen = []
    for j in range(5):
        rec = mon.step(j)
        rows = perm[(j * 12 + torch.arange(12)) % 40]
        seen.append(rows)
        with torch.no_grad():
            y = get_family("categorical").sample(model(x[rows]), k, replay)
        s = score_sq_norms(model, x[rows], y)
        assert math.isclose(rec.trace, float(s.mean()), rel_tol=1e-10)
        assert math.isclose(rec.stderr, math.sqrt(fpc_variance(s, 40)), rel_tol=1e-10)
        assert rec.n_inputs == 12 and rec.variance_ratio is None
    assert set(torch.cat(seen[:4]).tolist()) == set(range(40))  # the first 48 positions cover all 40


def spread_and_coverage(model, x, subset: int, k: int, reps: int = 200) -> tuple[float, float, float, float]:
    """Over ``reps`` monitors (independent permutations and labels), one measurement each."""
    traces, variances = [], []
    for r in range(reps):
        rec = FisherTraceMonitor(model, x, n_samples=k, subset=subset, generator=torch.Generator().manual_seed(r)).step(0)
        traces.append(rec.trace)
        variances.append(rec.stderr**2)
    t = torch.tensor(traces, dtype=torch.float64)
    return float(t.mean()), float(t.std()), math.sqrt(sum(variances) / reps), float(t.std() / math.sqrt(reps))


@pytest.mark.parametrize("n_held,subset,k", [(256, 32, 1), (64, 32, 4)])
def test_stderr_matches_the_spread_over_200_repetitions(n_held: int, subset: int, k: int) -> None:
    """The SE covers input sampling and label noise, as an error on the mean over ALL held inputs.

    At fixed weights, 200 monitors (each its own permutation and labels) measure once. The target
    is the exact Tr(F) over all held inputs: their mean must be within 4 SE of it, and the std of
    the 200 estimates over the RMS of the reported SE must be in [0.8, 1.25] (the sample std of
    200 values has a relative error of about 0.05-0.06, so that band is ≈ 4σ wide; seeds fixed).
    With f = 32/64 and k = 4 the finite-population correction matters: the uncorrected s²/n
    claims a visibly larger error than the spread shows.
    """
    model, x = tanh_mlp(3, seed=62), mlp_inputs(n_held, seed=63)
    exact = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    mean, spread, rms_se, se_of_mean = spread_and_coverage(model, x, subset, k)
    assert abs(mean - exact) < 4 * se_of_mean, (mean, exact, se_of_mean)
    assert 0.8 < spread / rms_se < 1.25, spread / rms_se
    if n_held == 64:
        naive = []
        for r in range(20):
            mon = FisherTraceMonitor(model, x, n_samples=k, subset=subset, generator=torch.Generator().manual_seed(r))
            replay = torch.Generator().manual_seed(r)
            rows = torch.randperm(n_held, generator=replay)[:subset]
            with torch.no_grad():
                y = get_family("categorical").sample(model(x[rows]), k, replay)
            s = score_sq_norms(model, x[rows], y)
            assert math.isclose(mon.step(0).stderr ** 2, fpc_variance(s, n_held), rel_tol=1e-10)
            naive.append(float(s.mean(1).var() / subset))
        assert spread / math.sqrt(sum(naive) / len(naive)) < 0.8  # uncorrected: the band would fail


def test_subset_of_all_held_inputs_is_the_standard_error_at_fixed_inputs() -> None:
    """``subset=N`` with ``k ≥ 2``: the label noise alone, the spread of measurements on the same held inputs with fresh
    labels (to compare measurements on one set of inputs): std of 200 over RMS SE in [0.8, 1.25], where the SE without
    a subset, which counts the inputs' spread too, is far above that spread."""
    model, x = tanh_mlp(3, seed=62), mlp_inputs(64, seed=63)
    exact = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    mean, spread, rms_se, se_of_mean = spread_and_coverage(model, x, 64, 4)
    assert abs(mean - exact) < 4 * se_of_mean, (mean, exact, se_of_mean)
    assert 0.8 < spread / rms_se < 1.25, spread / rms_se
    whole = [FisherTraceMonitor(model, x, n_samples=4, generator=torch.Generator().manual_seed(r)).step(0).stderr
             for r in range(20)]
    assert spread / math.sqrt(sum(se * se for se in whole) / len(whole)) < 0.8


def test_subset_back_propagates_only_its_window() -> None:
    """A window of m inputs runs the model on m inputs per measurement, not on all N held ones."""
    model, x = tanh_mlp(3, seed=64), mlp_inputs(4096, seed=65)
    rows_seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: rows_seen.append(args[0].shape[0]))
    full = FisherTraceMonitor(model, x, every=1, generator=torch.Generator().manual_seed(0))
    part = FisherTraceMonitor(model, x, every=1, subset=256, generator=torch.Generator().manual_seed(0))
    for s in range(2):  # set-up checks (independence, coverage) happen on the first measurements
        full.step(s), part.step(s)
    rows_seen.clear()
    part.step(2)
    assert sum(rows_seen) == 256, rows_seen
    rows_seen.clear()
    full.step(2)
    assert sum(rows_seen) == 4096, rows_seen


def test_subset_edge_cases_and_errors() -> None:
    model, x = tanh_mlp(3, seed=66), mlp_inputs(10, seed=67)
    everything = FisherTraceMonitor(model, x, subset=50, generator=torch.Generator().manual_seed(1)).step(0)
    replay = torch.Generator().manual_seed(1)
    rows = torch.randperm(10, generator=replay)  # a subset above N: all inputs, in permutation order
    with torch.no_grad():
        y = get_family("categorical").sample(model(x[rows]), 1, replay)
    s = score_sq_norms(model, x[rows], y)
    assert everything.n_inputs == 10 and math.isclose(everything.trace, float(s.mean()), rel_tol=1e-10)
    assert math.isclose(everything.stderr**2, float(s.mean(1).var()) / 10, rel_tol=1e-10)  # k = 1: s²/n
    for bad in (0, -1, 2.5, True):
        with pytest.raises(torchfim.TorchfimError, match="subset"):
            FisherTraceMonitor(model, x, subset=bad)
    with pytest.raises(torchfim.TorchfimError, match="NaN"):
        FisherTraceMonitor(model, torch.full((4, 3), float("nan"), dtype=torch.float64))


ONE_HELD = "hold at least 2 inputs, or pass subset=1 with n_samples ≥ 2 for the label noise of the one held input alone$"


@pytest.mark.parametrize("held, subset, k, fix", [(10, 1, 3, "pass subset ≥ 2$"), (1, None, 3, ONE_HELD),
                                                  (1, 1, 1, ONE_HELD)],
                         ids=["a-window-of-one", "one-held-input", "one-held-input-in-a-window-of-one-label"])
def test_one_input_per_measurement_is_named_at_construction(held: int, subset: int | None, k: int, fix: str) -> None:
    """A single input has no spread to estimate: the standard error is NaN, which the monitor says when built
    (with a fix that can help: a larger window only where there are more held inputs) rather than only in its
    records."""
    model, x = tanh_mlp(3, seed=68), mlp_inputs(held, seed=69)
    with pytest.warns(RuntimeWarning, match=rf"measures 1 input per measurement.*NaN.*{fix}"):
        mon = FisherTraceMonitor(model, x, subset=subset, n_samples=k)
    record = mon.measure(0)
    assert record.n_inputs == 1 and math.isnan(record.stderr) and math.isfinite(record.trace)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # two inputs: no warning
        FisherTraceMonitor(model, mlp_inputs(10, seed=69), subset=2)


class _Pooling(nn.Module):
    """Takes inputs of any length (the mean and spread of each row): held mini-batches of other lengths."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(torch.stack([x.mean(1), x.std(1)], 1))


def _ragged() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(70)
    return [torch.randn(n, length, dtype=torch.float64, generator=g) for n, length in ((5, 3), (4, 6), (3, 3), (6, 9),
                                                                                       (2, 6))]


def test_mini_batches_that_do_not_join_are_pooled_by_group_and_joined_ones_as_before() -> None:
    held = hold(_ragged())
    assert [b.size for b in pooled_groups(held)] == [8, 6, 6]  # lengths 3 (5 + 3), 6 (4 + 2), 9
    ints = [{"ids": torch.zeros(2, 3, dtype=torch.int32)}, {"ids": torch.ones(3, 3, dtype=torch.int64)}]
    assert [b.size for b in pooled_groups(hold(ints))] == [5]  # joined as one pool joined them before
    flags = [{"x": torch.zeros(2, 3), "flag": flag} for flag in (True, True, False)]
    assert [b.size for b in pooled_groups(hold(flags))] == [4, 2]  # values not per sample: equal ones join


def test_a_resumed_control_variate_run_over_groups_is_the_uninterrupted_one() -> None:
    """Windows over three groups of lengths, the control variate's replays included, the weights moving: a run
    saved and restored mid-way (a fresh monitor, another generator) records exactly what the whole run records."""
    torch.manual_seed(0)
    base = _Pooling().double()

    def run(resume_at: int | None = None) -> list[float]:
        model = copy.deepcopy(base)
        options = {"subset": 8, "control_variate": True, "n_samples": 2}
        monitor = FisherTraceMonitor(model, _ragged(), generator=torch.Generator().manual_seed(3), **options)
        traces = []
        for step in range(8):
            if step == resume_at:
                state = copy.deepcopy(monitor.state_dict())
                monitor = FisherTraceMonitor(model, _ragged(), generator=torch.Generator(), **options)
                monitor.load_state_dict(state)
            traces.append(monitor.measure(step).trace)
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01)
        return traces

    whole = run()
    assert run(resume_at=4) == whole and len(set(whole)) == len(whole)


def test_one_held_input_measured_whole_records_its_label_noise() -> None:
    """One held input, ``subset=1`` (the whole population, f = 1) and k ≥ 2 labels: the standard error is that
    input's label noise, the sample std of its k squared norms over √k, with no NaN warning at construction."""
    model, x = tanh_mlp(3, seed=70), mlp_inputs(1, seed=71)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mon = FisherTraceMonitor(model, x, subset=1, n_samples=4, generator=torch.Generator().manual_seed(3))
    record = mon.measure(0)
    replay = torch.Generator().manual_seed(3)
    torch.randperm(1, generator=replay)  # the window's permutation comes first
    with torch.no_grad():
        y = get_family("categorical").sample(model(x), 4, replay)
    s = score_sq_norms(model, x, y)[0]
    assert math.isclose(record.trace, float(s.mean()), rel_tol=1e-10)
    assert record.n_inputs == 1 and math.isclose(record.stderr, math.sqrt(float(s.var()) / 4), rel_tol=1e-10)


def test_a_measurement_whose_labels_all_coincide_says_its_zero_error_is_a_spread_not_seen() -> None:
    """One held input with p = (0.9, 0.05, 0.05), ``subset=1``, two labels: the measurements whose two labels are the
    same class record a standard error of 0 (its square still the unbiased variance estimate); the first of them says
    once that this is a spread not seen, the others and those that differ say nothing."""
    model = nn.Linear(4, 3).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64).log())
    mon = FisherTraceMonitor(model, torch.randn(1, 4, dtype=torch.float64), subset=1, n_samples=2,
                             generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = [mon.measure(step) for step in range(12)]
    zero = [r.step for r in records if r.stderr == 0.0]
    assert zero and len(zero) < len(records) and all(r.trace > 0 for r in records)
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and f"measurement at step {zero[0]} gave the same squared score norm" in said[0]
    assert "a spread not seen" in said[0] and "n_samples" in said[0]
