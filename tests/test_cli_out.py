"""Command-line mistakes found before the work: an ``--out`` folder that cannot be written or holds a user's
files (report and both reproductions, one check), out-of-range seeds, threads and widths, errors naming the
subcommand, and interruptions that say how to go on. Each command's work is replaced by a stand-in that fails
the test if it is reached."""

from __future__ import annotations

import dataclasses
import errno
import json
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")
pytest.importorskip("mnist1d")

from torchfim import _memory, cli, demo, toy
from torchfim.errors import TorchfimError
from torchfim.experiments.explosion import command as explosion_command
from torchfim.experiments.explosion.settings import PRESETS
from torchfim.experiments.soen_sun import command as soen_sun_command
from torchfim.report import command as report_command

#: Each command, and the name in its module of the function that does its work.
COMMANDS = {
    ("report",): (report_command, "run_report"),
    ("reproduce", "soen-sun", "--quick"): (soen_sun_command, "run"),
    ("reproduce", "explosion", "--tiny"): (explosion_command, "run"),
}


#: The committed full study, whose results.json the --from-results refusals edit.
COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "explosion"


@pytest.fixture
def no_work(monkeypatch):
    """The commands' work replaced by a failure: a refusal must come before it."""
    def work(*args, **kwargs):
        raise AssertionError("the command started its work before refusing --out")

    for module, name in [*COMMANDS.values(), (demo, "_train")]:
        monkeypatch.setattr(module, name, work)


def _error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err
    return err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unwritable_out_is_refused_before_the_work(command, tmp_path, monkeypatch, capsys, no_work):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)  # root writes into a chmod-ed folder anyway
    err = _error(capsys, [*command, "--out", str(tmp_path / "new" / "out")])
    assert "cannot write into the folder" in err and "Read-only file system" in err
    assert "choose a folder you can write to" in err
    assert not (tmp_path / "new").exists()  # the folders made for the check are removed


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_file_as_out_or_in_its_path_is_refused(command, tmp_path, capsys, no_work):
    file = tmp_path / "somefile"
    file.write_text("mine")
    err = _error(capsys, [*command, "--out", str(file)])
    assert "is an existing file; choose a directory name" in err
    err = _error(capsys, [*command, "--out", str(file / "sub")])
    assert f"{file} is a file, not a folder" in err and "choose another --out" in err
    err = _error(capsys, [*command, "--out", ""])
    assert "--out is empty; name a folder" in err
    assert file.read_text() == "mine"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c[0] == "reproduce"])
def test_a_users_files_in_out_are_not_overwritten(command, tmp_path, capsys, no_work):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    (out / "results.json").write_text('{"mine": 1}')
    err = _error(capsys, [*command, "--out", str(out)])
    assert "holds results.json, summary.md" in err and "no earlier torchfim" in err
    assert (out / "summary.md").read_text() == "my notes"


def test_an_earlier_study_in_out_is_the_studys_own(tmp_path, capsys, monkeypatch):
    out = tmp_path / "study"
    out.mkdir()
    (out / "summary.md").write_text("an earlier run's")
    (out / "results.json").write_text(json.dumps({"meta": {"experiment": "soen-sun"}}))
    monkeypatch.setattr(soen_sun_command, "run", lambda *a, **k: {"meta": {"complete": True}})
    assert cli.main(["reproduce", "soen-sun", "--quick", "--out", str(out)]) == 0


def test_explosion_from_results_does_not_overwrite_a_users_summary(tmp_path, capsys, no_work):
    results = tmp_path / "results.json"
    settings = dataclasses.asdict(PRESETS["tiny"])
    results.write_text(json.dumps({"experiment": "explosion", "settings": settings, "master_seed": 0, "runs": {}}))
    out = tmp_path / "mine"
    out.mkdir()
    (out / "summary.md").write_text("my notes")
    err = _error(capsys, ["reproduce", "explosion", "--from-results", str(results), "--out", str(out)])
    assert "holds summary.md" in err
    assert (out / "summary.md").read_text() == "my notes" and not (out / "runs").exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda r: r["runs"].pop(sorted(r["runs"])[-1]), "not every run of the study its settings describe"),
    (lambda r: r.pop("runs"), "(no 'runs' in it)"),
    (lambda r: r.pop("master_seed"), "(no 'master_seed' in it)"),
    (lambda r: r.update(master_seed=-3), "its master_seed, -3, is not a whole number ≥ 0"),
    (lambda r: next(iter(r["runs"].values())).pop("result"), "each with a 'spec' and a 'result'"),
], ids=["a run missing", "no runs", "no master seed", "negative master seed", "a run without its result"])
def test_from_results_of_a_study_cut_short_or_edited_is_refused_before_any_training(edit, needle, tmp_path, capsys,
                                                                                   no_work):
    """--from-results promises no training, yet a results.json missing runs had them trained (all 216 of the full study
    for one with no runs) and then said "rebuilt ... from 5 run files"; one missing its runs or master seed ended in a
    KeyError traceback, a negative master seed in numpy's "expected non-negative integer" (a review). Each is now one
    line naming the file and what it lacks, with nothing written to --out."""
    results = json.loads((COMMITTED / "results.json").read_text())
    edit(results)
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    out = tmp_path / "rebuilt"
    err = _error(capsys, ["reproduce", "explosion", "--from-results", str(path), "--out", str(out)])
    assert str(path) in err and needle in err, err
    assert not (out / "runs").exists()


def test_explosion_checks_its_learning_curves_and_reads_only_its_own_run_files(tmp_path, capsys, no_work):
    """A user's ``curves_<data>_<model>.png`` was overwritten (only the fixed names were checked), and any JSON file
    in ``runs/`` made the folder count as an unfinished study's, whose summary.md would be replaced."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "curves_digits_mlp.png").write_text("my figure")
    err = _error(capsys, ["reproduce", "explosion", "--tiny", "--out", str(out)])
    assert "holds curves_digits_mlp.png" in err and (out / "curves_digits_mlp.png").read_text() == "my figure"
    (out / "curves_digits_mlp.png").unlink()
    (out / "runs").mkdir()
    (out / "runs" / "mine.json").write_text('{"my": 1}')
    (out / "summary.md").write_text("my notes")
    err = _error(capsys, ["reproduce", "explosion", "--tiny", "--out", str(out)])
    assert "holds summary.md" in err and (out / "summary.md").read_text() == "my notes"


def test_the_check_leaves_no_folder_behind_for_an_out_that_climbs_back(tmp_path, monkeypatch, capsys, no_work):
    """``new/..`` names an existing folder through one the check creates: it crashed removing ``new/..``
    (Directory not empty) and left ``new`` behind."""
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    err = _error(capsys, ["reproduce", "soen-sun", "--quick", "--out", str(tmp_path / "new" / "..")])
    assert "cannot write into the folder" in err and not (tmp_path / "new").exists()


@pytest.mark.parametrize("argv, needle", [
    (["report", "--seed", "99999999999999999999"], "argument --seed: expected a whole number from 0 to 2**63-1"),
    (["demo", "--seed", str(2**63)], "argument --seed: expected a whole number from 0 to 2**63-1"),
    (["report", "--threads", "5000"], "argument --threads: expected a number of threads from 1 to 256"),
    (["reproduce", "soen-sun", "--threads", "100000"], "argument --threads: expected a number of threads from 1"),
    (["report", "--bogus"], "torchfim report: error: unrecognized arguments: --bogus (see torchfim report --help)"),
    # --seeds 0 was told "expected a whole number ≥ 1", and --seeds 1 then refused after the --out check (a review)
    (["reproduce", "explosion", "--seeds", "0"], "argument --seeds: expected a whole number ≥ 2 (prob_outperform"),
    (["reproduce", "explosion", "--seeds", "1"], "argument --seeds: expected a whole number ≥ 2 (prob_outperform"),
    # σ = 1e300 ended in Python's OverflowError traceback from σ⁴ in the variances (a review)
    (["report", "--family", "gaussian", "--sigma", "1e300"], "argument --sigma: expected a noise scale from 1e-75 to"),
    (["report", "--family", "gaussian", "--sigma", "1e-300"], "argument --sigma: expected a noise scale from 1e-75 to"),
    (["reproduce", "explosion", "--bogus"], "torchfim reproduce explosion: error: unrecognized arguments: --bogus"),
])
def test_out_of_range_values_and_unknown_options_name_the_option_and_command(argv, needle, capsys, no_work):
    assert needle in _error(capsys, argv)


def test_a_default_model_too_large_for_memory_is_refused_with_its_size(monkeypatch, capsys):
    def work(*args, **kwargs):
        raise AssertionError("the demo trained a model that does not fit")

    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2**20)
    monkeypatch.setattr(demo, "_train", work)
    with pytest.raises(TorchfimError, match=r"1,076,010 parameters, which needs .* choose smaller hidden"):
        toy.mlp(64, (1000, 1000), 10)
    assert "choose smaller hidden widths (the command line's --hidden)" in _error(capsys, ["demo", "--hidden", "1000,1000"])
    toy.mlp(64, (10,), 10)  # a small one fits


NONE_KEPT = "no run had finished, so none was kept; run the same command again to start over"


@pytest.mark.parametrize("argv, module, hint", [
    (["report"], report_command, "no step had finished, so nothing was kept; the same command starts again"),
    # interrupted before any run finished (the runs kept, and --resume, are said once some have: test_explosion.py)
    (["reproduce", "explosion", "--tiny"], explosion_command, NONE_KEPT),
    (["explosion", "--tiny"], explosion_command, NONE_KEPT),
])
def test_an_interruption_says_how_to_go_on(argv, module, hint, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "run_report" if module is report_command else "run", interrupted)
    assert cli.main([*argv, "--out", str(tmp_path / "out")]) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"torchfim {' '.join(a for a in argv if not a.startswith('-'))}: interrupted; ")
    assert hint in err


def test_an_interrupted_report_names_its_kept_steps_only_where_there_are_some(tmp_path, monkeypatch, capsys):
    """Interrupted before any step finished, it said the steps were kept in a folder that did not exist (a trial's
    Ctrl-C at 4 s); once one is kept, it says so and how to go on."""
    from torchfim.report.kept_steps import FOLDER

    def interrupted_after_a_step(*args, **kwargs):
        (tmp_path / "out" / FOLDER).mkdir(parents=True)
        (tmp_path / "out" / FOLDER / "step.pt").write_bytes(b"kept")
        raise KeyboardInterrupt

    monkeypatch.setattr(report_command, "run_report", interrupted_after_a_step)
    assert cli.main(["report", "--out", str(tmp_path / "out")]) == 130
    said = (f"the finished steps are kept in --out's {FOLDER}/ folder; run the same command again (without "
            "--no-resume) to go on from them")
    assert said in capsys.readouterr().err
