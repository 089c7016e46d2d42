"""An interrupted report, run again, reads its finished steps back and gives the report an uninterrupted run gives.

The steps are kept in ``--out``'s folder :data:`~torchfim.report.kept_steps.FOLDER` as they finish
(:mod:`torchfim.report.kept_steps`); the folder is removed once the report is written. Anything the results
depend on that changed (the weights, the forward, the data, an option) makes the report start over. The oracle
is the report of an uninterrupted run: every number of report.json equal, timings aside.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import torchfim
import torchfim.report as report_mod
from torchfim import TorchfimError
from torchfim.families import Gaussian
from torchfim.report import kept_steps
from torchfim.report.measure import Steps
from torchfim.report.publish import PUBLISHING
from torchfim.report.settings import REPORT_FILES


class _ScaledBackward(torch.autograd.Function):
    """The identity forward, whose backward scales the gradient by ``scale`` (a straight-through estimator's
    kind of edit: the outputs stay, the gradients change)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(h: torch.Tensor, scale: float) -> torch.Tensor:
        return h.clone()

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.scale = inputs[1]

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        return g * ctx.scale, None


class _Scaled(nn.Module):
    """An MLP whose logits are divided by ``temperature`` and whose hidden layer's gradient is scaled by
    ``backward_scale``, two attributes outside the state dict, and whose inputs equal to ``odd`` (None: none)
    are scaled by 1.5; ``projection``, a sparse buffer (as a graph model's adjacency), is the identity."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        self.temperature, self.backward_scale, self.odd = 1.0, 1.0, None
        self.register_buffer("projection", torch.eye(4).to_sparse())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.odd is not None:
            x = torch.where((x == self.odd).all(-1, keepdim=True), 1.5 * x, x)
        h = _ScaledBackward.apply(self.net[1](self.net[0](x @ self.projection.to_dense())), self.backward_scale)
        return self.net[2](h) / self.temperature


def _setup() -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    return _Scaled().double(), (torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 3, (32,)))


def _interrupt_at(monkeypatch, step: str) -> list[str]:
    """Make the step named ``step`` raise KeyboardInterrupt before it computes; the names of the steps run."""
    ran, original = [], Steps.run

    def run(self, desc, compute):
        ran.append(desc)
        if desc == step:
            raise KeyboardInterrupt
        return original(self, desc, compute)

    monkeypatch.setattr(Steps, "run", run)
    return ran


def _numbers(out) -> dict:
    """report.json without what differs between runs of the same report: timings, and the steps read back."""
    results = json.loads((out / "report.json").read_text())
    return {k: v for k, v in results.items() if k not in ("timings", "resumed_steps")}


def _report(model, data, out, **kw) -> dict:
    return report_mod.run_report(model, data, out=out, progress=False, emit=None, **kw)["results"]


@pytest.mark.parametrize("score_only", [False, True], ids=["full", "score-only"])
def test_an_interrupted_report_goes_on_where_it_stopped(tmp_path, monkeypatch, score_only: bool) -> None:
    model, data = _setup()
    want = _report(model, data, tmp_path / "whole", score_only=score_only)
    assert want["resumed_steps"] == 0 and not (tmp_path / "whole" / kept_steps.FOLDER).exists()

    with monkeypatch.context() as patch:
        ran = _interrupt_at(patch, "empirical Fisher")
        with pytest.raises(KeyboardInterrupt):
            _report(model, data, tmp_path / "r", score_only=score_only)
    finished = len(ran) - 1
    # full: 5 (the rounding check one of them) + 3 + 1 (Î2) + 4 spectra, the empirical Fisher left
    assert finished == (1 if score_only else 13)
    assert not (tmp_path / "r" / "report.json").exists()
    assert len(list((tmp_path / "r" / kept_steps.FOLDER).glob("*.pt"))) == finished

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _report(model, data, tmp_path / "r", score_only=score_only)
    assert not [w for w in caught if "finished steps kept in" in str(w.message)]
    assert got["resumed_steps"] == finished
    said = f"the time of {finished} step{'' if finished == 1 else 's'} read back from an interrupted run"
    assert said in (tmp_path / "r" / "report.md").read_text()
    assert _numbers(tmp_path / "r") == _numbers(tmp_path / "whole")
    assert not (tmp_path / "r" / kept_steps.FOLDER).exists()


def test_a_score_only_report_resumes_across_options_it_does_not_use(tmp_path, monkeypatch) -> None:
    """``--variance-inputs`` and ``--max-block`` size the full report's subset and spectra, which a score-only report
    asked for does not compute: restarted with other values, it started over (a report helper); it reads its steps
    back, with the same numbers as an uninterrupted run."""
    model, data = _setup()
    want = _report(model, data, tmp_path / "whole", score_only=True)
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "empirical Fisher")
        with pytest.raises(KeyboardInterrupt):
            _report(model, data, tmp_path / "r", score_only=True, variance_inputs=8, max_block=4)
    got = _report(model, data, tmp_path / "r", score_only=True, variance_inputs=16, max_block=8)
    assert got["resumed_steps"] == 1 == want["resumed_steps"] + 1
    assert {k: v for k, v in _numbers(tmp_path / "r").items() if k != "unused_options"} == \
        {k: v for k, v in _numbers(tmp_path / "whole").items() if k != "unused_options"}


def test_a_resumed_report_keeps_the_warnings_of_the_steps_it_reads_back(tmp_path, monkeypatch) -> None:
    """A library warning raised by a step finished before the interruption is in the resumed report as in the
    uninterrupted one (before: the step was read back and its warning lost). Here the exact trace warns."""
    model, data = _setup()
    fisher = torchfim.fisher

    def warning_fisher(*args, **kw):
        if kw.get("structure") == "trace" and kw.get("estimator", "exact") == "exact":
            warnings.warn("torchfim: a warning of the exact trace", RuntimeWarning, stacklevel=2)
        return fisher(*args, **kw)

    monkeypatch.setattr(torchfim, "fisher", warning_fisher)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        want = _report(model, data, tmp_path / "whole")
        with monkeypatch.context() as patch:
            _interrupt_at(patch, "empirical Fisher")
            with pytest.raises(KeyboardInterrupt), pytest.warns(RuntimeWarning, match="exact trace"):
                _report(model, data, tmp_path / "r")  # no report will hold it: warned on the terminal
        got = _report(model, data, tmp_path / "r")
    assert want["warnings"] == ["a warning of the exact trace"]
    assert got["resumed_steps"] == 13 and got["warnings"] == want["warnings"]
    assert "a warning of the exact trace" in (tmp_path / "r" / "report.md").read_text()


def _interrupted(tmp_path, monkeypatch, model, data, **kw) -> None:
    with monkeypatch.context() as patch:
        _interrupt_at(patch, "eigenvalues net.2.bias")  # the last step before the empirical Fisher
        with pytest.raises(KeyboardInterrupt):
            _report(model, data, tmp_path / "r", **kw)


@pytest.mark.parametrize("change", ["weights", "forward", "backward", "data", "last-input", "option", "family",
                                    "no-resume"])
def test_a_report_of_anything_else_starts_over(tmp_path, monkeypatch, change: str) -> None:
    model, (x, y) = _setup()
    kw = {"family": Gaussian(sigma=2.0)} if change == "family" else {}
    _interrupted(tmp_path, monkeypatch, model, (x, y), **({"family": Gaussian(sigma=1.0)} if kw else {}))
    if change == "weights":
        with torch.no_grad():
            model.net[0].weight[0, 0] += 1e-12
    elif change == "forward":
        model.temperature = 2.0
    elif change == "backward":
        model.backward_scale = 0.5
    elif change == "data":
        x = x.clone()
        x[-1, -1] += 1e-12
    elif change == "last-input":  # the forward changes on the last input alone: the first 8 outputs as before
        model.odd = x[-1].clone()
    elif change == "option":
        kw = {"seed": 1}
    elif change == "no-resume":
        kw = {"resume": False}
    kept = len(list((tmp_path / "r" / kept_steps.FOLDER).glob("*.pt")))
    # the kept steps of the interrupted report are removed with a word (they went silently, a review); resume=False
    # asks for it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _report(model, (x, y), tmp_path / "r", **kw)
    said = [str(w.message) for w in caught if "finished steps kept in" in str(w.message)]
    assert kept > 1 and said == ([] if change == "no-resume" else [
        (f"torchfim report: the {kept} finished steps kept in {tmp_path / 'r' / kept_steps.FOLDER} were of another "
         "report (other options, weights or data than this one's): they are removed, and this report computes every "
         "step")])
    assert got["resumed_steps"] == 0
    assert _numbers(tmp_path / "r") == _numbers(_whole(tmp_path, model, (x, y), kw))


def _whole(tmp_path, model, data, kw) -> object:
    _report(model, data, tmp_path / "whole", **kw)
    return tmp_path / "whole"


def test_a_step_cut_short_is_computed_again(tmp_path, monkeypatch) -> None:
    model, data = _setup()
    _interrupted(tmp_path, monkeypatch, model, data)
    kept = sorted((tmp_path / "r" / kept_steps.FOLDER).glob("*.pt"))
    kept[0].write_bytes(kept[0].read_bytes()[:20])  # a crash while the file was written
    got = _report(model, data, tmp_path / "r")
    assert got["resumed_steps"] == len(kept) - 1
    assert _numbers(tmp_path / "r") == _numbers(_whole(tmp_path, model, data, {}))


def test_steps_are_read_back_only_under_their_report_s_key(tmp_path) -> None:
    """A report of another model started into the same ``--out`` while one runs relabels the folder; the first
    report's later files are not read as the second's."""
    first = kept_steps.KeptSteps(tmp_path / "steps", "first")
    second = kept_steps.KeptSteps(tmp_path / "steps", "second")
    first.put("Tr(F) exact", torch.tensor(111.0), [])
    assert second.get("Tr(F) exact") == (False, None, []) and second.resumed == 0
    assert first.get("Tr(F) exact")[0] and first.resumed == 1


def test_a_disk_that_refuses_the_steps_leaves_the_report_whole(tmp_path, monkeypatch) -> None:
    """Keeping is an aid: where the disk refuses a kept step (full, read-only), the report warns once and ends
    as it would without keeping."""
    import torchfim._io as io_mod

    model, data = _setup()
    want = _numbers(_whole(tmp_path, model, data, {}))
    real = io_mod.atomic_write

    def refusing(path, *args, **kw):
        if path.parent.name == kept_steps.FOLDER and path.suffix == ".pt":
            raise OSError(28, "No space left on device")
        return real(path, *args, **kw)

    monkeypatch.setattr(io_mod, "atomic_write", refusing)
    with pytest.warns(RuntimeWarning, match="no longer kept") as caught:
        got = _report(model, data, tmp_path / "r")
    assert len([w for w in caught if "no longer kept" in str(w.message)]) == 1
    assert got["resumed_steps"] == 0 and _numbers(tmp_path / "r") == want


def _interrupt_publishing(patch, out, after: int) -> list[str]:
    """Make the report raise KeyboardInterrupt once ``after`` of its files are renamed into ``out``; their names."""
    import torchfim._io as io_mod

    renamed, real = [], os.replace

    def replace(src, dst):
        real(src, dst)
        if Path(dst).parent == out and Path(dst).name in REPORT_FILES:
            renamed.append(Path(dst).name)
            if len(renamed) == after:
                raise KeyboardInterrupt

    patch.setattr(io_mod.os, "replace", replace)
    return renamed


def test_a_report_interrupted_while_it_publishes_goes_on(tmp_path, monkeypatch) -> None:
    """Ctrl-C after 3 of the report's files are in place, before report.json: the same run again reads the kept
    steps back and writes the uninterrupted report. Before, the rerun was refused: --out held files "no earlier
    torchfim report there wrote", since only report.json (renamed last) said which files were the report's."""
    model, data = _setup()
    want = _numbers(_whole(tmp_path, model, data, {}))
    out = tmp_path / "r"
    with monkeypatch.context() as patch:
        renamed = _interrupt_publishing(patch, out, 3)
        with pytest.raises(KeyboardInterrupt):
            _report(model, data, out)
    assert len(renamed) == 3 and "report.json" not in renamed and not (out / "report.json").exists()
    kept = len(list((out / kept_steps.FOLDER).glob("*.pt")))
    got = _report(model, data, out)
    assert got["resumed_steps"] == kept > 0 and _numbers(out) == want
    assert not (out / kept_steps.FOLDER).exists() and not (out / PUBLISHING).exists()


def test_a_users_file_in_place_of_an_interrupted_reports_file_is_refused(tmp_path, monkeypatch) -> None:
    """The interrupted report owns the files it put there with the content it wrote, not whatever holds their
    names later."""
    model, data = _setup()
    out = tmp_path / "r"
    with monkeypatch.context() as patch:
        renamed = _interrupt_publishing(patch, out, 2)
        with pytest.raises(KeyboardInterrupt):
            _report(model, data, out)
    (out / renamed[0]).write_text("the user's own file")
    with pytest.raises(TorchfimError, match=rf"holds {renamed[0]}, which the report would overwrite"):
        _report(model, data, out)
    assert (out / renamed[0]).read_text() == "the user's own file"


def test_the_warnings_of_a_step_that_fails_are_warned(monkeypatch) -> None:
    """A step that warns and then fails (here interrupted): its warnings, the library's and others', reach the terminal,
    as every warning of a report that ends in an error does (before the review's mend: lost with the step)."""
    model, data = _setup()
    fisher = torchfim.fisher

    def warning_then_interrupted(*args, **kw):
        if kw.get("structure") == "diag" and kw.get("estimator", "exact") == "exact":
            warnings.warn("torchfim: a warning of the exact diagonal", RuntimeWarning, stacklevel=2)
            warnings.warn("a user's warning", UserWarning, stacklevel=2)
            raise KeyboardInterrupt
        return fisher(*args, **kw)

    monkeypatch.setattr(torchfim, "fisher", warning_then_interrupted)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(KeyboardInterrupt):
        warnings.simplefilter("always")
        report_mod.run_report(model, data, out=None, progress=False, emit=None)
    shown = [str(w.message) for w in caught]
    assert "torchfim: a warning of the exact diagonal" in shown and "a user's warning" in shown
