"""torchfim.train.FisherTraceMonitor: its estimate, its standard error and its side effects (float64).

Sampling-order contract relied on by the brute force below: per measurement the monitor draws
the labels of each held mini-batch with one call ``family.sample(o, n_samples, generator)`` on
that batch's outputs, batch after batch, and nothing else from the generator.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import math
import warnings

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from torch import nn

import torchfim
import torchfim.train.record_sinks as sinks_module
from torchfim.families import get_family
from torchfim.train import FisherTraceMonitor, TraceRecord


def score_sq_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``‖∇_θ log p(y_ij|x_i)‖²`` (n, k) for class labels ``y`` (n, k), one autograd call each."""
    params = list(model.parameters())
    out = torch.empty(y.shape, dtype=torch.float64)
    for i in range(len(x)):
        logp = torch.log_softmax(model(x[i : i + 1])[0], 0)
        for j in range(y.shape[1]):
            g = torch.autograd.grad(logp[y[i, j]], params, retain_graph=True)
            out[i, j] = sum(t.pow(2).sum() for t in g)
    return out


def conditional_std(model: nn.Module, x: torch.Tensor, k: int) -> float:
    """Exact std of the trace estimate over label draws with the inputs held fixed (categorical).

    ``Var = (1/(n²k)) Σᵢ Var_y(sᵢ)``, the label variance of each input's squared score norm
    computed by enumerating the classes.
    """
    params = list(model.parameters())
    total = 0.0
    for i in range(len(x)):
        o = model(x[i : i + 1])[0]
        p = torch.softmax(o, 0).detach()
        logp = torch.log_softmax(o, 0)
        grads = [torch.autograd.grad(logp[c], params, retain_graph=True) for c in range(len(o))]
        s = torch.stack([sum(t.pow(2).sum() for t in g) for g in grads])
        total += float((p * s * s).sum() - (p * s).sum() ** 2)
    return math.sqrt(total / (len(x) ** 2 * k))


# ----------------------------------------------------------------- the estimate
@pytest.mark.parametrize("k", [1, 4])
def test_record_matches_brute_force_formulas(k: int) -> None:
    """trace = mean of per-sample squared score norms; stderr = std of per-input means / √n."""
    model, x = tanh_mlp(3, seed=1), mlp_inputs(16, seed=2)
    mon = FisherTraceMonitor(model, x, n_samples=k, every=1, generator=torch.Generator().manual_seed(7))
    rec = mon.step(0)
    with torch.no_grad():
        y = get_family("categorical").sample(model(x), k, torch.Generator().manual_seed(7))
    s = score_sq_norms(model, x, y)
    assert math.isclose(rec.trace, float(s.mean()), rel_tol=1e-10)
    assert math.isclose(rec.stderr, float(s.mean(1).std() / math.sqrt(len(x))), rel_tol=1e-10)
    assert (rec.step, rec.n_inputs, rec.n_samples) == (0, 16, k) and rec.seconds >= 0


@pytest.mark.parametrize("k", [1, 4])
def test_one_record_agrees_with_exact_trace(k: int) -> None:
    model, x = tanh_mlp(3, seed=3), mlp_inputs(64, seed=4)
    exact = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    rec = FisherTraceMonitor(model, x, n_samples=k, generator=torch.Generator().manual_seed(0)).step(0)
    assert abs(rec.trace - exact) < 4 * rec.stderr, (rec, exact)
    assert rec.stderr < 0.2 * exact  # informative: a batch-mean gradient norm (≈ exact/64) fails the band


def test_repeated_measurements_spread_as_reported() -> None:
    """Over R = 200 measurements of the same 64 inputs with fresh labels from one generator:

    * their mean is within 4 standard errors of the exact Tr(F) (unbiased);
    * their std matches the exact label-only std (enumerated over classes), and is not larger
      than the reported stderr, which also counts the spread between inputs (≥ in expectation);
    * with fresh inputs *and* labels each time, the std of the traces matches the RMS of the
      reported stderr, which is what the stderr claims to be.

    Tolerance [0.8, 1.25] on std ratios: the sample std of R = 200 near-normal values has a
    relative standard error of about 1/√(2R) = 0.05 (0.06 allowing for the skew of a mean of
    64 squared norms), while the RMS of 200 reported stderrs is much tighter; the band is about
    4σ wide in each direction, and the seeds are fixed, so the test is deterministic.
    """
    reps, n = 200, 64
    model, x = tanh_mlp(3, seed=5), mlp_inputs(n, seed=6)
    exact = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    mon = FisherTraceMonitor(model, x, every=1, generator=torch.Generator().manual_seed(1))
    recs = [mon.step(s) for s in range(reps)]
    assert len(mon.history) == reps and len({r.trace for r in recs}) == reps
    traces = torch.tensor([r.trace for r in recs], dtype=torch.float64)
    rms_stderr = float(torch.tensor([r.stderr for r in recs]).pow(2).mean().sqrt())
    spread = float(traces.std())
    assert abs(float(traces.mean()) - exact) < 4 * spread / math.sqrt(reps)
    assert 0.8 < spread / conditional_std(model, x, 1) < 1.25
    assert spread / rms_stderr < 1.25

    fresh, stderrs = [], []
    for r in range(reps):
        generator = torch.Generator().manual_seed(r)
        rec = FisherTraceMonitor(model, mlp_inputs(n, seed=1000 + r), generator=generator).step(0)
        fresh.append(rec.trace)
        stderrs.append(rec.stderr)
    ratio = float(torch.tensor(fresh).std() / torch.tensor(stderrs).pow(2).mean().sqrt())
    assert 0.8 < ratio < 1.25, ratio


def test_iterable_inputs_are_held() -> None:
    model, x = tanh_mlp(3, seed=8), mlp_inputs(48, seed=9)
    batches = [(x[i : i + 20], torch.zeros(len(x[i : i + 20]))) for i in range(0, 48, 20)]
    mon = FisherTraceMonitor(model, iter(batches), generator=torch.Generator().manual_seed(0))  # read once
    exact = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    rec1, rec2 = mon.step(0), mon.step(10)
    assert rec1.n_inputs == 48 and rec2.n_inputs == 48
    assert abs(rec1.trace - exact) < 4 * rec1.stderr


# ------------------------------------------------------------- schedule, output
def test_every_skips_steps_and_history_keeps_records() -> None:
    mon = FisherTraceMonitor(tanh_mlp(3), mlp_inputs(8), every=5, generator=torch.Generator().manual_seed(0))
    results = [mon.step(s) for s in range(13)]
    assert [s for s, r in enumerate(results) if r is not None] == [0, 5, 10]
    assert [r.step for r in mon.history] == [0, 5, 10]
    assert all(isinstance(r, TraceRecord) for r in mon.history)
    rows = mon.to_rows()
    assert rows == mon.as_dicts() and [row["step"] for row in rows] == [0, 5, 10]
    assert set(rows[0]) == {"step", "trace", "stderr", "n_inputs", "n_samples", "seconds"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        mon.history[0].trace = 1.0


def test_csv_rows_written_flushed_and_appended(tmp_path) -> None:
    path = tmp_path / "runs" / "trace.csv"
    model, x = tanh_mlp(3), mlp_inputs(8)
    mon = FisherTraceMonitor(model, x, every=2, csv_path=path, generator=torch.Generator().manual_seed(0))
    mon.step(0)
    # already on disk after the first record (an interrupted run keeps it)
    assert path.read_text().splitlines()[0] == "step,trace,stderr,n_inputs,n_samples,seconds"
    assert len(path.read_text().splitlines()) == 2
    for s in range(1, 6):
        mon.step(s)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    for row, rec in zip(rows, mon.history):
        assert float(row["trace"]) == rec.trace and float(row["stderr"]) == rec.stderr  # exact round trip
        assert int(row["n_inputs"]) == 8 and int(row["n_samples"]) == 1
    # a second monitor (e.g. a resumed run) appends below the same header
    FisherTraceMonitor(model, x, csv_path=path).measure(6)
    lines = path.read_text().splitlines()
    assert len(lines) == 5 and sum(line.startswith("step,") for line in lines) == 1
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(torchfim.TorchfimError, match="header"):
        FisherTraceMonitor(model, x, csv_path=other)


def test_an_incomplete_last_line_is_dropped_before_appending(tmp_path) -> None:
    """A run stopped while writing a record left a partial line, to which the next record was glued: one malformed
    line that no reader took (plot-trace refused the whole file). It is cut back, with a warning."""
    from torchfim.train.trace_plot import read_trace_csv

    path, model, x = tmp_path / "trace.csv", tanh_mlp(3), mlp_inputs(8)
    mon = FisherTraceMonitor(model, x, every=1, csv_path=path, generator=torch.Generator().manual_seed(0))
    for s in range(3):
        mon.step(s)
    path.write_bytes(path.read_bytes()[:-20])  # the third record cut mid-line
    with pytest.warns(RuntimeWarning, match="ended in an incomplete line"):
        later = FisherTraceMonitor(model, x, every=1, csv_path=path, generator=torch.Generator().manual_seed(1))
    later.step(3)
    assert [r.step for r in read_trace_csv(path)] == [0, 1, 3]


@pytest.mark.parametrize("blank", ["\n", "\n\n", "  \n", "\r\n", " \t"], ids=["line", "lines", "spaces", "crlf", "unended"])
def test_blank_lines_after_the_last_record_are_cut_silently_before_appending(tmp_path, blank: str) -> None:
    """An editor's blank line after the last record was left in place (the next record came after it, and every
    reader stopped there: 'line 5 is not a record of numbers'), or, without its line end, cut with a warning of an
    incomplete record. It holds no record: cut without a word, every record kept."""
    from torchfim.train.trace_plot import read_trace_csv

    path, model, x = tmp_path / "trace.csv", tanh_mlp(3), mlp_inputs(8)
    mon = FisherTraceMonitor(model, x, every=1, csv_path=path, generator=torch.Generator().manual_seed(0))
    for s in range(3):
        mon.step(s)
    whole = path.read_bytes()
    path.write_bytes(whole + blank.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        later = FisherTraceMonitor(model, x, every=1, csv_path=path, generator=torch.Generator().manual_seed(1))
    assert path.read_bytes() == whole
    later.step(3)
    assert [r.step for r in read_trace_csv(path)] == [0, 1, 2, 3]


@pytest.mark.parametrize("cut", [1, 10, 43], ids=["s", "step,trace", "header-1"])
def test_a_header_cut_while_written_is_dropped_before_appending(tmp_path, cut: int) -> None:
    """A run stopped while writing its first record (the header and the record are one write) left the header cut
    short; the next run on that path, fresh or resumed, was refused ("exists with header 'step,trace', not ...;
    delete the file"). Such a file holds no record: it is cut back, with the warning of an incomplete line."""
    from torchfim.train.trace_plot import read_trace_csv

    path, model, x = tmp_path / "trace.csv", tanh_mlp(3), mlp_inputs(8)
    mon = FisherTraceMonitor(model, x, every=1, csv_path=path, generator=torch.Generator().manual_seed(0))
    mon.step(0)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.warns(RuntimeWarning, match="ended in an incomplete line"):
        later = FisherTraceMonitor(model, x, every=1, csv_path=path, generator=torch.Generator().manual_seed(0))
    later.step(0)
    assert read_trace_csv(path) == later.history and later.history[0].trace == mon.history[0].trace
    other = tmp_path / "other.csv"  # a file of other data, one line without its end, is still refused
    other.write_text("step,loss")
    with pytest.raises(torchfim.TorchfimError, match="header"):
        FisherTraceMonitor(model, x, csv_path=other)


def test_a_csv_file_that_cannot_be_written_is_refused_when_the_monitor_is_built(tmp_path, monkeypatch) -> None:
    """It was taken, and the first record raised a bare PermissionError mid-training (the record in history, not in
    the file)."""
    import pathlib

    path = tmp_path / "trace.csv"
    path.write_text("step,trace,stderr,n_inputs,n_samples,seconds\n")
    opened = pathlib.Path.open

    def read_only(self, mode="r", *args, **kwargs):
        if self == path and "a" in mode:
            raise PermissionError(1, "Operation not permitted")
        return opened(self, mode, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "open", read_only)
    with pytest.raises(torchfim.TorchfimError, match="csv_path .* cannot be written \\(Operation not permitted\\)"):
        FisherTraceMonitor(tanh_mlp(3), mlp_inputs(8), csv_path=path)


def test_tensorboard_missing_warns_once(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(sinks_module, "_load_summary_writer", lambda: None)
    with pytest.warns(RuntimeWarning, match="tensorboard") as caught:
        mon = FisherTraceMonitor(tanh_mlp(3), mlp_inputs(8), every=1, tensorboard_dir=tmp_path / "tb")
        for s in range(3):
            mon.step(s)
    assert len([w for w in caught if "tensorboard" in str(w.message)]) == 1
    assert len(mon.history) == 3


def test_tensorboard_logs_scalars(monkeypatch, tmp_path) -> None:
    calls = []

    class FakeWriter:
        def __init__(self, log_dir: str) -> None:
            calls.append(("init", log_dir))

        def add_scalar(self, tag: str, value: float, step: int) -> None:
            calls.append((tag, value, step))

        def flush(self) -> None:
            pass

        def close(self) -> None:
            calls.append(("close",))

    monkeypatch.setattr(sinks_module, "_load_summary_writer", lambda: FakeWriter)
    with FisherTraceMonitor(tanh_mlp(3), mlp_inputs(8), every=2, tensorboard_dir=tmp_path / "tb") as mon:
        for s in range(4):
            mon.step(s)
    recs = mon.history
    assert calls == [
        ("init", str(tmp_path / "tb")),
        ("fisher/trace", recs[0].trace, 0),
        ("fisher/trace_stderr", recs[0].stderr, 0),
        ("fisher/trace", recs[1].trace, 2),
        ("fisher/trace_stderr", recs[1].stderr, 2),
        ("close",),
    ]


# --------------------------------------------------------------- side effects
def bn_dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)
    ).double()


def test_measures_in_eval_mode_and_restores_each_module_mode() -> None:
    model, x = bn_dropout_model(), mlp_inputs(32)
    model.train()
    model(mlp_inputs(32, seed=3))  # non-trivial running statistics
    model[3].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    stats = [b.clone() for b in model.buffers()]
    rec = FisherTraceMonitor(model, x, generator=torch.Generator().manual_seed(0)).step(0)
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(a, b) for a, b in zip(stats, model.buffers()))  # BN stats untouched
    # the same as measuring the model in eval mode (deterministic: Dropout off, BN running stats)
    model.eval()
    ref = FisherTraceMonitor(model, x, generator=torch.Generator().manual_seed(0)).step(0)
    assert rec.trace == ref.trace and rec.stderr == ref.stderr
    model.train()
    assert FisherTraceMonitor(model, x, generator=torch.Generator().manual_seed(0)).step(0).trace == ref.trace
    assert model.training and model[1].training
    # restored even when the measurement fails
    with pytest.raises(torchfim.TorchfimError):
        FisherTraceMonitor(model, x, family="bernoulli").step(0)
    assert all(m.training for m in model.modules())


def test_grads_and_global_rng_untouched() -> None:
    model, x = tanh_mlp(3), mlp_inputs(16)
    params = list(model.parameters())
    params[0].grad = torch.full_like(params[0], 3.0)
    before = params[0].grad
    rng = torch.get_rng_state()
    mon = FisherTraceMonitor(model, x, every=1)  # generator=None: a private, seeded generator
    recs = [mon.step(s) for s in range(3)]
    assert torch.equal(torch.get_rng_state(), rng)
    assert params[0].grad is before and bool((before == 3.0).all())
    assert all(p.grad is None for p in params[1:])
    # reproducible without a generator, and the labels differ between measurements
    again = FisherTraceMonitor(model, x, every=1)
    assert [again.step(s).trace for s in range(3)] == [r.trace for r in recs]
    assert len({r.trace for r in recs}) == 3


# --------------------------------------------------------------- validation
def test_bad_arguments_raise() -> None:
    model, x = tanh_mlp(3), mlp_inputs(4)
    with pytest.raises(torchfim.TorchfimError, match="every"):
        FisherTraceMonitor(model, x, every=0)
    with pytest.raises(torchfim.TorchfimError, match="n_samples"):
        FisherTraceMonitor(model, x, n_samples=0)
    with pytest.raises(torchfim.TorchfimError, match="empty"):
        FisherTraceMonitor(model, x[:0])
    with pytest.raises(torchfim.TorchfimError, match="generator"):
        FisherTraceMonitor(model, x, generator=0)
    with pytest.raises(torchfim.TorchfimError, match="family"):
        FisherTraceMonitor(model, x, family="nope")
    with pytest.raises(torchfim.TorchfimError, match="requires_grad"):
        FisherTraceMonitor(tanh_mlp(3).requires_grad_(False), x)
    mon = FisherTraceMonitor(model, x)
    with pytest.raises(torchfim.TorchfimError, match="step"):
        mon.step(-1)
    with pytest.raises(torchfim.TorchfimError, match="step"):
        mon.step(1.5)
    with pytest.warns(RuntimeWarning, match="1 input per measurement"):
        single = FisherTraceMonitor(model, x[:1]).step(0)
    assert math.isnan(single.stderr) and math.isfinite(single.trace)


# ------------------------------------------------- parameters read afresh (issue 11 item 3)
def replayed_trace(models: list[nn.Module], x: torch.Tensor, seed: int) -> float:
    """The last of len(models) measurements' traces, replaying the label draws model after model."""
    generator = torch.Generator().manual_seed(seed)
    for model in models:
        with torch.no_grad():
            y = get_family("categorical").sample(model(x.to(next(model.parameters()).dtype)), 1, generator)
    return float(score_sq_norms(models[-1], x.to(next(models[-1].parameters()).dtype), y).mean())


def test_parameters_replaced_with_data_assignment_are_measured() -> None:
    """After ``p.data = new`` the monitor measures the new weights (it cached the old storage)."""
    model, x = tanh_mlp(3, seed=50), mlp_inputs(12, seed=51)
    before = copy.deepcopy(model)
    mon = FisherTraceMonitor(model, x, every=1, generator=torch.Generator().manual_seed(5))
    mon.step(0)
    new = torch.Generator().manual_seed(52)
    for p in model.parameters():
        p.data = 2.0 * torch.randn(p.shape, generator=new, dtype=p.dtype)
    rec = mon.step(1)
    assert math.isclose(rec.trace, replayed_trace([before, model], x, 5), rel_tol=1e-10)
    assert not math.isclose(rec.trace, replayed_trace([before, before], x, 5), rel_tol=1e-3)


def test_model_double_is_measured_in_float64() -> None:
    """After ``model.double()`` the monitor works (no dtype mismatch) and measures the float64 model."""
    model, x = tanh_mlp(3, seed=53).float(), mlp_inputs(12, seed=54).float()
    before = copy.deepcopy(model)
    mon = FisherTraceMonitor(model, x, every=1, generator=torch.Generator().manual_seed(6))
    first = mon.step(0)
    assert math.isclose(first.trace, replayed_trace([before], x, 6), rel_tol=1e-5)
    model.double()
    rec = mon.step(1)
    assert math.isclose(rec.trace, replayed_trace([before, model], x, 6), rel_tol=1e-10)


def test_reassigned_buffers_are_measured() -> None:
    """A BatchNorm running statistic replaced by a new tensor (not updated in place) is read afresh."""
    torch.manual_seed(55)
    model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    x = mlp_inputs(12, seed=56)
    before = copy.deepcopy(model)
    mon = FisherTraceMonitor(model, x, every=1, generator=torch.Generator().manual_seed(7))
    mon.step(0)
    model[1].running_var = torch.full((5,), 0.05, dtype=torch.float64)
    model[1].running_mean = torch.full((5,), 0.3, dtype=torch.float64)
    rec = mon.step(1)
    assert math.isclose(rec.trace, replayed_trace([before, model], x, 7), rel_tol=1e-10)
