"""``torchfim report --out`` folders that hold other files (issue 11): the user's files are never touched, an
earlier or copied report is replaced whole, files with a report's names are refused before computing, and at
every point a kill could hit (SIGKILL while publishing included) the folder holds whole files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import report_fixtures
import torch
from report_fixtures import PNG_MAGIC, ROOT, _leftovers

from torchfim import cli
from torchfim import report as report_mod
from torchfim.report import run as run_mod
from torchfim.report import settings as report_settings
from torchfim.report.publish import PUBLISHING

fast_figures = report_fixtures.fast_figures  # a fixture the tests take
user_dir = report_fixtures.user_dir  # a fixture the tests take


# ----------------------------------------------- --out holds other files (issue 11): never touched
SMALL = ["--model", "umod:make", "--variance-inputs", "8", "--max-block", "0", "--no-progress"]
USER_FILES = {"notes.txt": b"keep me\n", "thesis.tex": b"\\documentclass{article}\n", "runs/a.json": b"{}\n"}
# The files of a full report of data with targets: every name of REPORT_FILES but the score-only figure.
REPORT_NAMES = set(report_settings.FILES) | {report_settings.EMPIRICAL_FIGURE}
assert REPORT_NAMES == set(report_settings.REPORT_FILES) - {report_settings.SCORE_ONLY_FIGURE}


def _add_user_files(folder: Path) -> None:
    for name, data in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _user_files_intact(folder: Path) -> bool:
    return all((folder / name).read_bytes() == data for name, data in USER_FILES.items())


def _report_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.name in REPORT_NAMES}


def test_user_files_beside_an_earlier_report_are_kept(user_dir, fast_figures):
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    _add_user_files(user_dir / "rep")
    earlier = _report_bytes(user_dir / "rep")
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]) == 0
    assert _user_files_intact(user_dir / "rep")
    now = _report_bytes(user_dir / "rep")
    assert set(now) == set(earlier) == REPORT_NAMES
    assert json.loads(now["report.json"])["seed"] == 1 and now["report.md"] != earlier["report.md"]
    assert {p.name for p in (user_dir / "rep").iterdir()} == REPORT_NAMES | {"notes.txt", "thesis.tex", "runs"}


def test_a_copied_report_is_replaced_and_its_stale_figure_removed(user_dir, fast_figures):
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    (user_dir / "mine").mkdir()
    for p in (user_dir / "rep").iterdir():  # a copied report, in a folder of the user's files
        (user_dir / "mine" / p.name).write_bytes(p.read_bytes())
    _add_user_files(user_dir / "mine")
    # data without targets: no empirical figure in the new report, so the copied one goes
    assert cli.main(["report", *SMALL, "--data", "umod:inputs", "--out", "mine"]) == 0
    assert _user_files_intact(user_dir / "mine")
    assert set(_report_bytes(user_dir / "mine")) == set(report_mod.FILES)
    assert json.loads((user_dir / "mine" / "report.json").read_text())["empirical"] is None


def test_a_folder_of_other_files_gets_the_report_beside_them(user_dir, fast_figures):
    (user_dir / "mine").mkdir()
    _add_user_files(user_dir / "mine")
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "mine"]) == 0
    assert _user_files_intact(user_dir / "mine") and set(_report_bytes(user_dir / "mine")) == REPORT_NAMES


@pytest.mark.parametrize("foreign", ["model.pt", "report.json", "overview.png"])
def test_files_with_a_reports_names_are_refused_before_computing(user_dir, capsys, monkeypatch, foreign):
    from torchfim.report import run as run_mod

    def never(*args, **kwargs):
        raise AssertionError("the report was computed although --out was refused")

    monkeypatch.setattr(run_mod, "compute_report", never)
    (user_dir / "mine").mkdir()
    _add_user_files(user_dir / "mine")
    (user_dir / "mine" / foreign).write_bytes(b"the user's own file")
    status = cli.main(["report", *SMALL, "--data", "umod:data", "--out", "mine"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in err and err.startswith("torchfim report: error: --out mine holds " + foreign)
    assert (user_dir / "mine" / foreign).read_bytes() == b"the user's own file"
    assert _user_files_intact(user_dir / "mine")
    assert {p.name for p in (user_dir / "mine").iterdir()} == {foreign, "notes.txt", "thesis.tex", "runs"}


def test_out_dot_writes_into_the_working_directory(user_dir, fast_figures):
    _add_user_files(user_dir)
    module = (user_dir / "umod.py").read_bytes()
    for seed in ("0", "1"):  # a report, then a new one over it
        assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", seed, "--out", "."]) == 0
        assert json.loads((user_dir / "report.json").read_text())["seed"] == int(seed)
    assert _user_files_intact(user_dir) and (user_dir / "umod.py").read_bytes() == module
    assert set(_report_bytes(user_dir)) == REPORT_NAMES and not _leftovers(user_dir)


def test_the_folder_written_is_printed_with_one_slash(user_dir, fast_figures, capsys):
    """``--out /`` printed "wrote // (...)"; a folder given with a trailing slash is printed with one, the root as
    ``/`` (checked on the printing, so as not to write into ``/``)."""
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", f"{user_dir / 'rep'}/"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {user_dir / 'rep'}/ (" in out and "//" not in out
    lines: list[str] = []
    run_mod._summarise(lines.append, "", {"files": ["report.md"], "timings": {"total": 1.0}}, Path("/"))
    assert lines[-1].startswith("wrote / (report.md) in 1.0 s; read /report.md")


def test_at_every_point_a_kill_could_hit_the_folder_is_complete(user_dir, monkeypatch, fast_figures):
    """A kill only ever sees the file system as it is between two renames: check each such state."""
    import torchfim._io as io_mod

    rep = user_dir / "rep"
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    _add_user_files(rep)
    earlier = _report_bytes(rep)
    states: list[dict[str, bytes]] = []
    real_replace = io_mod.os.replace

    def replace(src, dst):
        if Path(dst).resolve().parent == rep and Path(dst).name != PUBLISHING:  # between two of the report's files
            assert rep.is_dir() and _user_files_intact(rep)
            states.append(_report_bytes(rep))
        return real_replace(src, dst)

    monkeypatch.setattr(io_mod.os, "replace", replace)
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]) == 0
    monkeypatch.undo()
    final = _report_bytes(rep)
    states.append(final)
    assert len(states) == len(REPORT_NAMES) + 1 and states[0] == earlier
    for state in states:
        assert set(state) == REPORT_NAMES  # no report file is ever missing ...
        for name, data in state.items():  # ... or anything but the earlier or the new one, complete
            assert data in (earlier[name], final[name]), name
    assert all(state["report.json"] == earlier["report.json"] for state in states[:-1])  # written last
    assert _user_files_intact(rep)


KILL_SCRIPT = """
import os, signal, sys
from pathlib import Path
import torchfim.report.figures as figures
from torchfim import cli

figures.draw = lambda R: {{n: {png!r} for n in {names!r}}}
rep, real, count = Path("rep").resolve(), os.replace, [0]

def replace(src, dst):
    if Path(dst).resolve().parent == rep and Path(dst).name != {publishing!r}:
        count[0] += 1
        if count[0] == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst)

os.replace = replace
sys.exit(cli.main({argv!r}))
"""


def test_sigkill_while_publishing_leaves_every_file_whole(user_dir, fast_figures):
    rep = user_dir / "rep"
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--out", "rep"]) == 0
    _add_user_files(rep)
    earlier = _report_bytes(rep)
    argv = ["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]
    new_png = PNG_MAGIC + b"new"
    script = KILL_SCRIPT.format(names=sorted(n for n in REPORT_NAMES if n.endswith(".png")), png=new_png,
                                kill_at=5, argv=argv, publishing=PUBLISHING)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], check=False, cwd=user_dir, env=env, capture_output=True, timeout=300)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert rep.is_dir() and _user_files_intact(rep)
    now = _report_bytes(rep)
    assert set(now) == REPORT_NAMES
    # killed before the 5th rename: report.md, model.pt and two figures are new, the rest as they were
    assert now["report.json"] == earlier["report.json"]
    assert now["report.md"] != earlier["report.md"] and now["report.md"].decode().endswith("\n")
    assert sum(data == new_png for data in now.values()) == 2
    assert all(now[n] in (earlier[n], new_png) for n in now if n.endswith(".png"))
    torch.load(rep / "model.pt", weights_only=True)
    # the temporary files of the killed run are removed by the next run, which completes the report
    assert [p.name for p in rep.iterdir() if p.name.endswith(".tmp")]
    assert cli.main(["report", *SMALL, "--data", "umod:data", "--seed", "1", "--out", "rep"]) == 0
    assert not [p.name for p in rep.iterdir() if p.name.endswith(".tmp")] and _user_files_intact(rep)
    assert json.loads((rep / "report.json").read_text())["seed"] == 1
