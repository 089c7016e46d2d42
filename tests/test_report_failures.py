"""``torchfim report``'s failures: bad input is one line and leaves no report, a failure while writing leaves the
earlier report (and the steps kept), what would not fit (the closed forms, a max_block's block) is refused
before any work, and data mistakes are named as the library names them.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import pytest
import report_fixtures
import torch
from report_fixtures import _leftovers
from torch import nn

import torchfim
from torchfim import cli
from torchfim import report as report_mod
from torchfim.errors import TorchfimError
from torchfim.report import kept_steps
from torchfim.report.wording import on_command_line

fast_figures = report_fixtures.fast_figures  # a fixture the tests take
user_dir = report_fixtures.user_dir  # a fixture the tests take


# ------------------------------------------------------------------- bad input: one line, nothing left
def _bad_checkpoint(tmp: Path) -> str:
    torch.save(nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).state_dict(), tmp / "other.pt")
    return "other.pt"


BAD = {
    "unimportable module": (["--model", "nosuchmodule:make", "--data", "umod:data"], "cannot import module"),
    "missing factory": (["--model", "umod:nope", "--data", "umod:data"], "has no attribute"),
    "not MODULE:FACTORY": (["--model", "umod", "--data", "umod:data"], "MODULE:FACTORY"),
    "factory raises": (["--model", "umod:make", "--data", "umod:broken"], "no data today"),
    "not a module": (["--model", "umod:not_a_model", "--data", "umod:data"], "not a torch.nn.Module"),
    "checkpoint mismatch": (["--model", "umod:make", "--data", "umod:data", "--checkpoint", _bad_checkpoint],
                            "does not match the model"),
    "missing checkpoint": (["--model", "umod:make", "--data", "umod:data", "--checkpoint", "none.pt"],
                           "no such file"),
    "family mismatch": (["--model", "umod:make", "--data", "umod:data", "--family", "bernoulli"],
                        "do not fit --family bernoulli"),
    # the command line's words and every family (before: "use family='categorical'", 4 of the 7 listed)
    "family mismatch, the fix": (["--model", "umod:make", "--data", "umod:data", "--family", "bernoulli"],
                                 (("use --family categorical for 3 exclusive classes, or, for 3 independent binary "
                                   "labels per input, return the outputs as (batch, 3, 1)"),
                                  ("(or pass the --family that matches the outputs, one of bernoulli, categorical, "
                                   "gamma, gaussian, heteroscedastic_gaussian, matrix_fisher, poisson;"))),
    # before: "inputs of shape [] (... mat1 and mat2 shapes cannot be multiplied ...)"
    "list of lists": (["--model", "umod:make", "--data", "umod:rows"],
                      "the factory returned a list of lists of numbers (10 items); return a tensor"),
    "1-D tensor": (["--model", "umod:make", "--data", "umod:flat"],
                   "40 inputs, each one number (a 1-D tensor of 40 values"),
    "1-D tensor, the fix": (["--model", "umod:make", "--data", "umod:flat"], "pass x.unsqueeze(1)"),
    # a user trial: 8 inputs of 5 features as a list read as mini-batches of 40 one-number inputs, told to unsqueeze
    "list of 1-D rows": (["--model", "umod:make", "--data", "umod:per_input_rows"],
                         "a list of 1-D tensors is read as mini-batches of such inputs, and torch.stack(rows)"),
    # before: torch's dtype error alone
    "integer inputs": (["--model", "umod:make", "--data", "umod:integers"],
                       "failed on integer inputs ((8, 5) torch.int64) with torch.float32 parameters; pass x.float()"),
    "empty data": (["--model", "umod:make", "--data", "umod:empty"], "empty"),
    "model without data": (["--model", "umod:make"], "--data"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_and_leaves_no_report(case, user_dir, capsys):
    args, expected = BAD[case]
    args = [a(user_dir) if callable(a) else a for a in args]
    status = cli.main(["report", *args, "--no-progress", "--out", "rep"])
    captured = capsys.readouterr()
    assert status == 2
    err = captured.err.strip()
    assert err.startswith("torchfim report: error:") and "\n" not in err, err
    assert all(part in err for part in ((expected,) if isinstance(expected, str) else expected)), err
    assert "Traceback" not in captured.err
    assert not (user_dir / "rep").exists()
    assert not _leftovers(user_dir)


def test_a_failure_while_writing_leaves_the_earlier_report(user_dir, capsys, monkeypatch, fast_figures):
    import torchfim._io as io_mod

    assert cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                     "--max-block", "0", "--no-progress", "--out", "rep"]) == 0
    before = {p.name: p.read_bytes() for p in (user_dir / "rep").iterdir()}
    calls = []
    real = io_mod._write_temporary

    def failing(path, write, binary):
        if Path(path).parent.name != kept_steps.FOLDER:  # a report file (the steps are kept as they finish)
            calls.append(path)
            if len(calls) == 3:
                raise OSError(28, "No space left on device")
        return real(path, write, binary)

    monkeypatch.setattr(io_mod, "_write_temporary", failing)
    status = cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                       "--max-block", "0", "--seed", "1", "--no-progress", "--out", "rep"])
    assert status == 2 and "No space left" in capsys.readouterr().err
    assert len(calls) == 3
    # no temporary file left; the finished steps stay kept for the next run
    assert {p.name: p.read_bytes() for p in (user_dir / "rep").iterdir() if p.name != kept_steps.FOLDER} == before
    assert (user_dir / "rep" / kept_steps.FOLDER).is_dir()
    # and a fresh --out gets no file of the report, only its kept steps
    calls.clear()
    assert cli.main(["report", "--model", "umod:make", "--data", "umod:data", "--variance-inputs", "8",
                     "--max-block", "0", "--no-progress", "--out", "fresh/sub"]) == 2
    assert [p.name for p in (user_dir / "fresh" / "sub").iterdir()] == [kept_steps.FOLDER]
    assert not _leftovers(user_dir) and not _leftovers(user_dir / "fresh" / "sub" / kept_steps.FOLDER)


def test_a_model_whose_closed_forms_would_not_fit_is_refused_before_computing(monkeypatch):
    """10,000 classes: the closed forms pull back the 10,000 output numbers of an input together. With 256
    MiB or 1 GiB free, ``score_only=False`` (``--mode full``) refuses before its first measurement (the
    library is never called), naming the size and the score-only mode; with the memory it needs, the same
    check lets it through to the library."""
    from torchfim import _memory

    model = nn.Linear(4, 10_000)
    X = torch.randn(8, 4)
    called = []

    def first_measurement(*args, **kwargs):
        called.append(True)
        raise RuntimeError("the report's first measurement")

    monkeypatch.setattr(torchfim, "fisher", first_measurement)
    # One input: the 10⁴ × 10⁴ unit vectors and 10⁴ pull-backs of the layer's 10⁴ outputs, 2·10⁸ numbers
    # (1.49 GiB in float32 with a working copy), as the library counts them. With 1 GiB free, the unit
    # vectors alone (0.745 GiB) would pass, and the library would refuse only after the exact parts.
    for free, shown in ((2**28, "0\\.2"), (2**30, "1\\.0")):
        monkeypatch.setattr(_memory, "available_bytes", lambda device, free=free: free)
        with pytest.raises(TorchfimError, match=rf"beyond the full report's reach.*all 10,000 output numbers of "
                                                rf"an input together, about 1\.49 GiB per input with {shown} GiB.*"
                                                r"pass score_only=True \(or score_only=None"):
            report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, score_only=False)
    assert not called
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 8 * 2**30)
    with pytest.raises(RuntimeError, match="first measurement"):  # full whatever it takes: no test of time
        report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, score_only=False)
    assert called


def test_a_max_block_whose_block_would_not_fit_is_refused_before_any_work(monkeypatch):
    """It failed after minutes of work, with the Python API's advice (structure='diag', requires_grad_)."""
    from torchfim.report import compute

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    monkeypatch.setattr(compute, "fits_in_memory", lambda n, dtype, device: (n <= 15**2, n * 16 / 2**30, 1.0))
    monkeypatch.setattr(compute, "measure_trace", lambda *a, **k: pytest.fail("measured before the refusal"))
    for words, (said, other) in ((on_command_line, ("--max-block", "max_block=")), (nullcontext, ("max_block", "--"))):
        # the command line's flag or the API's keyword, not both (before: "--max-block 1,000 (max_block=)")
        with pytest.raises(TorchfimError, match=rf"^{said}[ =]1000 lets in layer '0.weight' of 20 parameters.*pass a "
                                                rf"{said} below 20") as refused, words():
            report_mod.compute_report(model, report_mod.Data(torch.randn(8, 4), None, "test"), max_block=1000,
                                      progress=False, score_only=False)
        assert other not in str(refused.value)


def test_data_mistakes_are_named_as_the_library_names_them():
    """One input given 1-D was blamed on --family (its outputs read as (3, 1)); a tuple of columns (inputs, targets,
    weights) on the items' shapes. Mini-batches in a tuple are still read as mini-batches."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(TorchfimError, match=r"outputs of shape \(3,\) for 1-D inputs.*x\.unsqueeze\(0\)"):
        report_mod.compute_report(model, report_mod.as_data(torch.randn(8), "test"), progress=False)
    triple = (torch.randn(16, 8), torch.randint(0, 3, (16,)), torch.ones(16))
    with pytest.raises(TorchfimError, match=r"a tuple of 3 tensors of 16 rows each; return the inputs, or an "
                                            r"\(inputs, targets\) pair"):
        report_mod.as_data(triple, "test")
    batches = tuple(torch.randn(4, 8) for _ in range(3))
    assert report_mod.as_data(batches, "test").n == 12
