"""Progress bars on a stream that is not a terminal write whole lines, at most one every LOG_SECONDS and one at the
end (a user trial: piped into a log, tqdm's redraws, forced by every new description or postfix, wrote a line per
update); on a terminal they are tqdm's; ``--no-progress`` writes nothing."""

from __future__ import annotations

import io

import pytest

from torchfim import _progress, cli
from torchfim._progress import ProgressBar


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _updates(stream: io.StringIO, n: int = 200, **kwargs) -> str:
    bar = ProgressBar(total=n, desc="work", unit="step", file=stream, **kwargs)
    for i in range(n):
        bar.update(1)
        bar.set_postfix(step=i)  # each forced a redraw
        bar.set_description(f"work {i}")
    bar.close()
    bar.close()  # tqdm closes again when collected: no second last line
    return stream.getvalue()


def test_a_bar_on_a_pipe_writes_one_line_at_the_end() -> None:
    text = _updates(io.StringIO())
    assert "\r" not in text and text.count("\n") == 1, text
    assert text.startswith("work 199: 100%") and "200/200" in text and "step=199" in text


def test_a_long_bar_on_a_pipe_writes_a_line_every_log_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(_progress, "_now", lambda: now[0])
    stream = io.StringIO()
    bar = ProgressBar(total=100, desc="work", unit="step", file=stream)
    for i in range(100):
        now[0] += 1.0  # a second per step
        bar.update(1)
        bar.set_postfix(step=i)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert [line.split("|")[2].split()[0] for line in lines] == ["30/100", "60/100", "90/100", "100/100"], lines


def test_a_bar_on_a_terminal_is_tqdms_and_a_disabled_bar_is_silent() -> None:
    assert _updates(_Terminal()).count("\r") > 100  # redrawn in place, as before
    assert _updates(io.StringIO(), disable=True) == ""


def test_the_commands_bars_in_a_log(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """A report with its stderr captured (not a terminal) writes each bar's last line only (before: 30 and more
    redraws separated by carriage returns); ``--no-progress`` none."""
    base = ["report", "--hidden", "4", "--epochs", "3", "--mode", "score-only", "--n-samples", "2"]
    assert cli.main([*base, "--out", str(tmp_path / "a")]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err and 1 <= err.count("\n") <= 4, err
    assert "training the default MLP: 100%" in err and "3/3" in err
    assert cli.main([*base, "--no-progress", "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().err == ""
