"""``torchfim.train.plot_trace``, ``read_trace_csv`` and ``torchfim plot-trace``: the figure holds the
monitor's records (line = estimates, band = estimate ± k standard errors, cut at 0), and the CSV file reads
back exactly the records the monitor wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfim
from torchfim import cli
from torchfim.train import FisherTraceMonitor, plot_trace, read_trace_csv, trace_plot
from torchfim.train.monitor import COLUMNS


def _run(tmp_path, name: str, lr: float, **options) -> FisherTraceMonitor:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x, y = torch.randn(48, 4, dtype=torch.float64), torch.randint(0, 3, (48,))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = FisherTraceMonitor(model, x, every=2, n_samples=2, csv_path=tmp_path / f"{name}.csv", **options)
    for step in range(12):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        mon.step(step)
    return mon


def _band(collection) -> tuple[np.ndarray, np.ndarray]:
    """The lower and upper edges of a ``fill_between`` band, by x."""
    xy = collection.get_paths()[0].vertices
    lower, upper = {}, {}
    for x, y in xy:
        lower[x] = min(lower.get(x, np.inf), y)
        upper[x] = max(upper.get(x, -np.inf), y)
    xs = sorted(lower)
    return np.array([lower[x] for x in xs]), np.array([upper[x] for x in xs])


@pytest.mark.parametrize("options", [{}, {"subset": 16, "control_variate": True}], ids=["plain", "cv"])
def test_the_csv_reads_back_the_monitors_records(tmp_path, options) -> None:
    mon = _run(tmp_path, "run", 0.5, **options)
    assert read_trace_csv(tmp_path / "run.csv") == mon.history  # floats written with repr: exact


def test_the_figure_holds_each_runs_estimates_and_band(tmp_path) -> None:
    runs = {"slow": _run(tmp_path, "slow", 0.05), "fast": _run(tmp_path, "fast", 2.0)}
    fig = plot_trace({"slow": runs["slow"], "fast": tmp_path / "fast.csv"}, band=1.5)
    ax = fig.axes[0]
    spread = max(r.trace for m in runs.values() for r in m.history) / min(r.trace for m in runs.values()
                                                                         for r in m.history)
    log = spread > 10
    assert ax.get_yscale() == ("log" if log else "linear")
    assert [line.get_label() for line in ax.get_lines()] == ["slow", "fast"]
    for line, band, mon in zip(ax.get_lines(), ax.collections, runs.values()):
        steps = [r.step for r in mon.history]
        trace = np.array([r.trace for r in mon.history])
        se = np.array([r.stderr for r in mon.history])
        np.testing.assert_array_equal(line.get_xdata(), steps)
        np.testing.assert_array_equal(line.get_ydata(), trace)
        lower, upper = _band(band)
        np.testing.assert_allclose(upper, trace + 1.5 * se, rtol=1e-12)
        np.testing.assert_allclose(lower, np.maximum(trace - 1.5 * se, 1e-3 * trace if log else 0.0), rtol=1e-12)
    assert plot_trace(runs["slow"], log=True).axes[0].get_yscale() == "log"
    assert plot_trace(runs["slow"], log=False).axes[0].get_yscale() == "linear"
    assert len(plot_trace(runs["slow"], band=0).axes[0].collections) == 0
    assert len(plot_trace(runs["slow"], band=np.float32(0)).axes[0].collections) == 0  # refused before


def test_the_command_line_writes_the_figure(tmp_path, capsys) -> None:
    _run(tmp_path, "a", 0.1)
    _run(tmp_path, "b", 1.0)
    out = tmp_path / "fig" / "trace.png"
    assert cli.main(["plot-trace", str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for argv, message in [
        ([str(tmp_path / "missing.csv")], "no such CSV file"),
        ([str(tmp_path / "other.csv")], "is not a FisherTraceMonitor CSV file: its header is 'a,b'"),
        ([str(tmp_path / "a.csv"), "--labels", "x", "y"], "--labels gives 2 labels for 1 CSV file;"),
        ([str(tmp_path / "a.csv"), str(tmp_path / "b.csv"), "--labels", "x", "x"], "repeat"),
        ([str(tmp_path / "a.csv"), "--band", "-1"], "--band: expected a number of standard errors from 0 to 100"),
    ]:
        capsys.readouterr()
        assert cli.main(["plot-trace", *argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1


def _plot_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert cli.main(["plot-trace", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    return err


def test_a_binary_file_a_huge_field_and_a_figure_format_matplotlib_lacks_are_one_line_naming_them(tmp_path, capsys,
                                                                                                    monkeypatch) -> None:
    """A checkpoint passed as the CSV said only "'utf-8' codec can't decode byte 0x80 ...", naming no file; a line of
    128 KB without a comma ended in csv's traceback; --out trace.csv was refused by matplotlib once the figure was
    drawn, naming no option (a review). Each now names the file or --out, and the format is checked before any CSV is
    read."""
    _run(tmp_path, "a", 0.1)
    (tmp_path / "model.pt").write_bytes(b"PK\x03\x04\x80\xff" * 20)
    (tmp_path / "blob.csv").write_text("x" * 200_000)
    for name in ("model.pt", "blob.csv"):
        err = _plot_error(capsys, [str(tmp_path / name), "--out", str(tmp_path / "t.png")])
        assert f"{str(tmp_path / name)!r} is not a FisherTraceMonitor CSV file (" in err and "csv_path" in err
    read = []
    monkeypatch.setattr(trace_plot, "read_trace_csv", lambda path: read.append(path))
    err = _plot_error(capsys, [str(tmp_path / "a.csv"), "--out", str(tmp_path / "a.svg.csv")])
    assert f"--out {tmp_path / 'a.svg.csv'}: matplotlib writes no 'csv' figures; end the file name in .png" in err
    assert read == [] and (tmp_path / "a.csv").read_text().startswith("step,")


def test_files_that_are_not_whole_runs_are_refused_or_warned_about(tmp_path, capsys) -> None:
    _run(tmp_path, "a", 0.1)
    lines = (tmp_path / "a.csv").read_text().splitlines(keepends=True)
    out = str(tmp_path / "t.png")
    (tmp_path / "header.csv").write_text(lines[0])
    assert "header.csv holds no records, only its header" in _plot_error(capsys, [str(tmp_path / "header.csv"), "--out", out])
    assert not (tmp_path / "t.png").exists()
    # a killed run's file: its last line cut off, left out with a warning
    (tmp_path / "cut.csv").write_text("".join(lines[:-1]) + lines[-1][:7])
    with pytest.warns(RuntimeWarning, match=f"its last line, {len(lines)}, is incomplete"):
        assert cli.main(["plot-trace", str(tmp_path / "cut.csv"), "--out", out]) == 0
    assert len(read_trace_csv(tmp_path / "a.csv")) == len(lines) - 1
    # a cut line that is not the last is an error naming it
    (tmp_path / "mid.csv").write_text("".join(lines[:2]) + lines[2][:7] + "\n" + "".join(lines[3:]))
    assert "line 3 is not a record of numbers" in _plot_error(capsys, [str(tmp_path / "mid.csv"), "--out", out])
    # two runs in one file: drawn, with a warning naming where the step goes back
    (tmp_path / "two.csv").write_text("".join(lines) + "".join(lines[1:]))
    with pytest.warns(RuntimeWarning, match=f"the step goes back from 10 to 0 at line {len(lines) + 1}"):
        assert cli.main(["plot-trace", str(tmp_path / "two.csv"), "--out", out]) == 0
    # not a CSV file: the header quoted is cut short
    (tmp_path / "results.json").write_text('{"runs": "' + "x" * 100_000 + '"}')
    err = _plot_error(capsys, [str(tmp_path / "results.json"), "--out", out])
    assert "is not a FisherTraceMonitor CSV file" in err and len(err) < 400


@pytest.mark.parametrize("blank", ["\n", "\n\n", "  \n", "\r\n"], ids=["line", "lines", "spaces", "crlf"])
def test_blank_lines_after_the_last_record_are_read_without_a_word(tmp_path, blank: str) -> None:
    """A blank line after the last record was read as an incomplete record, with a warning; it holds no record."""
    _run(tmp_path, "a", 0.1)
    whole = read_trace_csv(tmp_path / "a.csv")
    with open(tmp_path / "a.csv", "a", newline="") as f:
        f.write(blank)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_trace_csv(tmp_path / "a.csv") == whole


def test_the_command_prints_its_warnings_in_its_own_words(tmp_path) -> None:
    """Under ``python -m torchfim`` a warning names the command, not ``<frozen runpy>``, and ``-W error`` still
    applies to it."""
    _run(tmp_path, "a", 0.1)
    lines = (tmp_path / "a.csv").read_text().splitlines(keepends=True)
    (tmp_path / "cut.csv").write_text("".join(lines[:-1]) + lines[-1][:7])
    argv = ["-m", "torchfim", "plot-trace", str(tmp_path / "cut.csv"), "--out", str(tmp_path / "t.png")]
    env = {**os.environ, "TORCHFIM_DEBUG": ""}
    done = subprocess.run([sys.executable, *argv], check=False, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    said = (f"torchfim plot-trace: warning: {str(tmp_path / 'cut.csv')!r}: its last line, {len(lines)}, is incomplete "
            "(a run stopped while writing it?) and is left out")
    assert done.stderr.splitlines() == [said], done.stderr
    refused = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", *argv], check=False, capture_output=True,
                             text=True, env=env, timeout=300)
    assert refused.returncode != 0 and "is incomplete" in refused.stderr


def test_an_out_that_cannot_be_the_figure_and_a_huge_band_are_refused(tmp_path, capsys) -> None:
    _run(tmp_path, "a", 0.1)
    csv = str(tmp_path / "a.csv")
    assert "is a folder, not a file; name the figure file" in _plot_error(capsys, [csv, "--out", str(tmp_path)])
    (tmp_path / "file").write_text("")
    err = _plot_error(capsys, [csv, "--out", str(tmp_path / "file" / "x.png")])
    assert f"{tmp_path / 'file'} is a file, not a folder" in err
    err = _plot_error(capsys, [csv, "--band", "1e308", "--out", str(tmp_path / "t.png")])
    assert "--band: expected a number of standard errors from 0 to 100, got '1e308'" in err


def test_a_run_that_is_not_records_is_refused(tmp_path) -> None:
    with pytest.raises(torchfim.TorchfimError, match=r"a run must be a FisherTraceMonitor.*dict \{label: run\}"):
        plot_trace([1.0, 2.0])
    with pytest.raises(torchfim.TorchfimError, match="no run"):
        plot_trace({})
    with pytest.raises(torchfim.TorchfimError, match="no CSV file at .*missing.csv"):
        plot_trace({"a": tmp_path / "missing.csv"})
    with pytest.raises(torchfim.TorchfimError, match=r"no CSV file at .*\(a folder\)"):
        read_trace_csv(tmp_path)


def test_record_files_that_cannot_be_written_are_refused_at_construction(tmp_path) -> None:
    model, x = nn.Sequential(nn.Linear(4, 3)), torch.randn(8, 4)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(torchfim.TorchfimError, match="csv_path: .*is a file, not a folder"):
        FisherTraceMonitor(model, x, csv_path=blocker / "trace.csv")
    with pytest.raises(torchfim.TorchfimError, match="csv_path .* is a folder; name the CSV file"):
        FisherTraceMonitor(model, x, csv_path=tmp_path)
    with pytest.raises(torchfim.TorchfimError, match="tensorboard_dir: .*is a file, not a folder"):
        FisherTraceMonitor(model, x, tensorboard_dir=blocker / "events")
    # Checked by making the folder and a file in it, at once in two processes: the folder is kept (removing it
    # again pulled it from under the other process's check).
    FisherTraceMonitor(model, x, csv_path=tmp_path / "new" / "trace.csv")
    assert (tmp_path / "new").is_dir() and not list((tmp_path / "new").iterdir())


def test_an_explosion_is_drawn_on_a_log_axis_and_the_band_stops_above_zero() -> None:
    """Estimates spanning more than a factor of 10 get a log axis; Tr(F) ≥ 0, so the band's lower edge is cut
    at 0 on a linear axis and at a thousandth of the estimate on a log one."""
    from torchfim.train import TraceRecord

    records = [TraceRecord(step, trace, se, 8, 1, 0.0) for step, trace, se in
               ((0, 1.0, 0.25), (10, 50.0, 1.0), (20, 200.0, 500.0))]
    for log, floor in ((None, 1e-3), (False, 0.0)):
        ax = plot_trace(records, log=log).axes[0]
        assert ax.get_yscale() == ("log" if floor else "linear")
        lower, upper = _band(ax.collections[0])
        np.testing.assert_allclose(lower, [0.5, 48.0, 200.0 * floor if floor else 0.0], rtol=1e-12)
        np.testing.assert_allclose(upper, [1.5, 52.0, 1200.0], rtol=1e-12)
        assert ax.get_legend() is None  # one unlabelled run


def test_records_that_are_not_finite_are_named_where_they_are_not_drawn() -> None:
    """matplotlib drops a NaN point or an infinite band without a word (a trial's CSV file drew with rc 0): the
    steps are named in a warning; finite records draw without one."""
    from torchfim.train import TraceRecord

    records = [TraceRecord(step, trace, se, 8, 1, 0.0) for step, trace, se in
               ((0, 1.0, 0.25), (10, float("nan"), 1.0), (20, 2.0, float("inf")))]
    with pytest.warns(RuntimeWarning, match=r"run 'diverged': 2 records with a non-finite Tr\(F\) or standard error "
                                         r"\(step 10, 20;"):
        plot_trace({"diverged": records})

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plot_trace(records[:1])


def test_an_empty_run_is_refused_and_one_record_gets_an_error_bar(tmp_path) -> None:
    """An empty history drew an empty figure without a word (the command line refuses it), and one record drew no
    band at all (a band needs two points) under an axis that says ± 2 standard errors (a review)."""
    mon = FisherTraceMonitor(nn.Sequential(nn.Linear(4, 3)), torch.randn(16, 4), every=10,
                             generator=torch.Generator().manual_seed(0))
    with pytest.raises(torchfim.TorchfimError, match="'idle' holds no record; plot once the monitor has measured"):
        plot_trace({"idle": mon})
    (tmp_path / "header.csv").write_text(",".join(COLUMNS) + "\n")  # named by its path, as the command line names it
    with pytest.raises(torchfim.TorchfimError, match=f"{str(tmp_path / 'header.csv')!r} holds no record"):
        plot_trace(tmp_path / "header.csv")
    record = mon.measure(0)
    ax = plot_trace(mon, band=2).axes[0]
    (bar,) = [c for c in ax.collections if c.get_segments()]
    (segment,) = bar.get_segments()
    np.testing.assert_allclose(segment[:, 1], [max(record.trace - 2 * record.stderr, 0.0),
                                               record.trace + 2 * record.stderr], rtol=1e-12)


@pytest.mark.parametrize("options", [{}, {"subset": 16, "control_variate": True}], ids=["plain", "cv"])
def test_a_file_cut_at_any_byte_reads_back_its_complete_records_exactly(tmp_path, options) -> None:
    """A run killed while writing a record leaves its line cut at some byte. Where the cut fell in the last field
    (``seconds``, or ``variance_ratio`` with ``control_variate``), what was left still parsed and was read as a record
    with that field cut short (0.4567 read as 0.4: 58 of 378 cuts of a control-variate file, in a review), and the
    Trainer callback that resumes without a state rewrote it so. Oracle: the monitor's own records, those whose line
    was complete."""
    mon = _run(tmp_path, "run", 0.5, **options)
    whole = (tmp_path / "run.csv").read_bytes()
    header = whole.index(b"\n") + 1
    for cut in range(header, len(whole)):
        (tmp_path / "cut.csv").write_bytes(whole[:cut])
        complete = whole[:cut].count(b"\n") - 1  # the records whose line end was written
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert read_trace_csv(tmp_path / "cut.csv") == mon.history[:complete], cut
