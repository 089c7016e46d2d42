"""The report of models whose outputs have positions (language models): its numbers against float64
oracles that sum over the observed positions, the mask and class-dim options, and their errors."""

from __future__ import annotations

import re
import warnings
from contextlib import nullcontext

import pytest
import torch
from oracles import flat_function
from torch import Tensor, nn
from torch.func import jacrev

import torchfim
from torchfim import cli
from torchfim import report as report_mod
from torchfim.report.wording import on_command_line

V, T, N = 5, 4, 12


class TinyLM(nn.Module):
    """Token ids ``(B, T)`` to logits ``(B, T, V)``; a position's logits see earlier tokens (a running
    mean), so positions share parameters and inputs as in a language model."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Embedding(V, 3), nn.Linear(3, 3), nn.Linear(3, V)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1).unsqueeze(-1)
        return self.head(torch.tanh(self.mix(h)))


def _lm_and_data() -> tuple[nn.Module, dict[str, Tensor]]:
    torch.manual_seed(0)
    model = TinyLM().double()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (N, T), generator=g)
    mask = (torch.arange(T) < torch.randint(1, T + 1, (N, 1), generator=g)).long()
    labels = torch.randint(0, V, (N, T), generator=g).masked_fill(mask == 0, -100)
    return model, {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _oracle(model: nn.Module, batch: dict[str, Tensor]) -> tuple[float, float]:
    """``(Tr F, Tr F_emp)`` by brute force: ``(1/n) Σᵢ Σₜ tr(Jᵢₜᵀ Λᵢₜ Jᵢₜ)`` over observed positions, and
    the mean squared norm of each input's score ``Σₜ ∇ log p(yᵢₜ|xᵢ)`` over its labelled positions."""
    f, theta = flat_function(model)
    trace = empirical = 0.0
    for ids, keep, y in zip(batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]):
        jac = jacrev(lambda th, ids=ids: f(th, ids[None])[0])(theta).reshape(T, V, -1)
        p = torch.softmax(f(theta, ids[None])[0].reshape(T, V).detach(), -1)
        lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        trace += float(torch.einsum("tap,tab,tbp->t", jac, lam, jac)[keep].sum())
        score = sum((torch.nn.functional.one_hot(y[t], V) - p[t]) @ jac[t] for t in range(T) if y[t] >= 0)
        empirical += float(score @ score)
    return trace / N, empirical / N


def test_a_language_models_report_sums_its_observed_positions_as_the_float64_oracle():
    """Outputs (batch, tokens, vocabulary) with padding (before: refused, "expects (batch, num_classes)")."""
    model, batch = _lm_and_data()
    R = report_mod.compute_report(model, report_mod.as_data(batch, "test"), mask="attention_mask", progress=False)
    trace, empirical = _oracle(model, batch)
    assert R["trace"]["exact"] == pytest.approx(trace, rel=1e-10)
    assert R["empirical"]["trace"] == pytest.approx(empirical, rel=1e-10)
    observed = float(batch["attention_mask"].sum()) / N
    assert R["outputs"] == {"positions": [T], "mask": "attention_mask", "class_dim": -1,
                            "observed_positions_per_input": pytest.approx(observed), "note": None}
    # Without the mask, the labels' -100 leave the padding out all the same, as the library reads them.
    kw = {"variance_inputs": 2, "max_block": 0, "progress": False}
    labelled = report_mod.compute_report(model, report_mod.as_data(batch, "test"), **kw)
    assert labelled["trace"]["exact"] == pytest.approx(trace, rel=1e-10)
    assert labelled["outputs"]["note"] is None
    # Without the mask and the labels the padding counts: a different Fisher, so the mask is what made it agree;
    # the report says so and names the option (the library's own warning of it is not warned again).
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        unmasked = report_mod.compute_report(model, report_mod.as_data(inputs, "test"), **kw)
    assert unmasked["trace"]["exact"] > trace * 1.05
    padded = int((batch["attention_mask"] == 0).sum())
    assert unmasked["outputs"]["note"] == (
        f"the data's attention_mask marks {padded} padded positions, counted here as observed; pass "
        "mask='attention_mask' to leave them out")  # the API's keyword (before: the flag, --mask attention_mask)
    assert not [w for w in caught if "padding" in str(w.message)] and unmasked["warnings"] == []


class _TokensAsTensor(nn.Module):
    """:class:`TinyLM` called on the token ids as one tensor (no dict)."""

    def __init__(self, lm: TinyLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, ids: Tensor) -> Tensor:
        return self.lm(ids)


def test_tensor_inputs_whose_targets_hold_minus_100_are_reported_over_the_labelled_positions():
    """Tensor inputs with (inputs, targets) whose -100 mark the padding: every number of the report, not the empirical
    Fisher's alone, covers the labelled positions, as the library reads an (inputs, targets) mini-batch. Before: the
    exact Fisher, the score estimate and the variances covered every position, so the empirical/true ratio compared
    two Fishers of different positions (0.49 where like-for-like is 0.99 on a model of this kind)."""
    lm, batch = _lm_and_data()
    model = _TokensAsTensor(lm)
    trace, empirical = _oracle(lm, batch)
    keep = batch["labels"] != -100
    R = report_mod.compute_report(model, report_mod.as_data((batch["input_ids"], batch["labels"]), "test"),
                                  variance_inputs=N, max_block=0, progress=False)
    assert R["trace"]["exact"] == pytest.approx(trace, rel=1e-10)
    assert R["empirical"]["trace"] == pytest.approx(empirical, rel=1e-10)
    assert R["empirical"]["trace_ratio"] == pytest.approx(empirical / trace, rel=1e-10)
    variance = torchfim.fisher_variance(model, batch["input_ids"], mask=keep, structure="trace")
    assert R["trace"]["subset"]["var_score"] == pytest.approx(float(variance), rel=1e-10)
    assert R["outputs"]["observed_positions_per_input"] == pytest.approx(float(keep.sum()) / N)


def test_class_dim_1_reads_outputs_with_the_classes_in_dim_1():
    """(batch, C, *positions) outputs, as F.cross_entropy takes them, give the report of the same outputs
    with the classes last."""

    class ClassesFirst(nn.Module):
        def __init__(self, lm: nn.Module) -> None:
            super().__init__()
            self.lm = lm

        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return self.lm(input_ids).movedim(-1, 1)

    model, batch = _lm_and_data()
    data = report_mod.as_data(batch, "test")
    kw = {"mask": "attention_mask", "variance_inputs": 4, "max_block": 0, "progress": False}
    first = report_mod.compute_report(ClassesFirst(model), data, class_dim=1, **kw)
    last = report_mod.compute_report(model, data, **kw)
    assert first["trace"]["exact"] == pytest.approx(last["trace"]["exact"], rel=1e-12)
    assert first["trace"]["subset"]["var_hessian"] == pytest.approx(last["trace"]["subset"]["var_hessian"], rel=1e-10)
    assert first["empirical"]["trace"] == pytest.approx(last["empirical"]["trace"], rel=1e-12)


#: The refusal's words from the API, and on the command line (before: the flags' both ways).
MASK_ERRORS = {
    "no such key": (lambda b: b, "padding_mask",
                    ("mask='padding_mask': the data has no entry 'padding_mask'", "e.g. mask='attention_mask'"),
                    ("--mask padding_mask: the data has no entry 'padding_mask'", "e.g. --mask attention_mask")),
    "tensor inputs": (lambda b: (b["input_ids"], b["labels"]), "attention_mask",
                      ("mask='attention_mask' names an entry", "; pass a dict, e.g."),
                      ("--mask attention_mask names an entry", "; make --data return a dict")),
    "wrong shape": (lambda b: {**b, "attention_mask": b["attention_mask"][:, :2]}, "attention_mask",
                    ("mask='attention_mask': the mask must hold", "shape (12, 4)"),
                    ("--mask attention_mask: the mask must hold", "shape (12, 4)")),
}


@pytest.mark.parametrize("case", list(MASK_ERRORS))
def test_a_mask_that_does_not_fit_is_refused_with_the_fix(case):
    make, key, api, command_line = MASK_ERRORS[case]
    model, batch = _lm_and_data()
    for words, expected in ((nullcontext, api), (on_command_line, command_line)):
        with words(), pytest.raises(torchfim.TorchfimError) as err:
            report_mod.compute_report(model, report_mod.as_data(make(batch), "test"), mask=key, progress=False)
        assert all(part in str(err.value) for part in expected), str(err.value)


def test_a_mask_for_outputs_without_positions_is_refused():
    model = nn.Sequential(nn.Embedding(V, 3), nn.Flatten(), nn.Linear(3 * T, 2))
    _, batch = _lm_and_data()

    class Keywords(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = model

        def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
            return self.net(input_ids)

    data = report_mod.as_data({k: v for k, v in batch.items() if k != "labels"}, "test")
    with pytest.raises(torchfim.TorchfimError, match="^mask='attention_mask': the model's outputs have no positions "
                                                     ".* drop mask$"):
        report_mod.compute_report(Keywords(), data, mask="attention_mask", progress=False)
    with on_command_line(), pytest.raises(torchfim.TorchfimError, match="^--mask attention_mask: .* drop --mask$"):
        report_mod.compute_report(Keywords(), data, mask="attention_mask", progress=False)


def test_class_dim_on_outputs_without_positions_is_refused_as_mask_is() -> None:
    """A CLI trial: --class-dim 1 on a classifier's (B, C) outputs was taken silently where --mask is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    data = report_mod.as_data(torch.randn(8, 4), "test")
    with pytest.raises(torchfim.TorchfimError, match=r"^class_dim=1: the model's outputs \(8, 3\) have no positions"
                                                     r".*drop class_dim$"):
        report_mod.compute_report(model, data, class_dim=1, progress=False)
    with on_command_line(), pytest.raises(torchfim.TorchfimError, match=r"^--class-dim 1: .*drop --class-dim$"):
        report_mod.compute_report(model, data, class_dim=1, progress=False)
    assert report_mod.compute_report(model, data, class_dim=-1, progress=False)["trace"]["exact"] > 0


LM_MODULE = '''
import torch
from test_report_positions import TinyLM, _lm_and_data

def model():
    return _lm_and_data()[0].float()

def data():
    return _lm_and_data()[1]

def unlabelled():
    return {k: v for k, v in _lm_and_data()[1].items() if k != "labels"}
'''


def test_the_command_line_takes_mask_and_class_dim(tmp_path, monkeypatch, capsys):
    (tmp_path / "lmmod.py").write_text(LM_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    args = ["report", "--model", "lmmod:model", "--data", "lmmod:data", "--mask", "attention_mask",
            "--variance-inputs", "4", "--max-block", "0", "--no-progress", "--out", "rep"]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "Outputs with 4 positions per input" in out and "mask attention_mask" in out
    text = (tmp_path / "rep" / "report.md").read_text()
    assert "**Outputs with positions:** 4 per input (those where `attention_mask` is 0 left out" in text
    assert "and those a label of -100 leaves out (for a causal language model, its last too" in text  # what else it drops
    assert "--mask attention_mask" in text  # the re-create command keeps it
    assert cli.main([*args[:4], "lmmod:unlabelled", "--variance-inputs", "4", "--max-block", "0", "--no-progress",
                     "--out", "nomask"]) == 0
    shown = capsys.readouterr()
    assert "Note: the data's attention_mask marks" in shown.out and "padding" not in shown.err
    assert "pass --mask attention_mask to leave them out." in (tmp_path / "nomask" / "report.md").read_text()
    assert cli.main([*args[:-1], "rep2", "--class-dim", "2"]) == 2  # argparse refuses other values


@pytest.mark.parametrize("class_dim", [2, 0, True])
def test_the_library_and_the_report_refuse_the_same_class_dims(class_dim):
    """One check (``engine.output_reading.check_class_dim``) serves both: -1 or 1, and not a bool."""
    model, batch = _lm_and_data()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with pytest.raises(torchfim.TorchfimError, match=r"class_dim must be -1 .* or 1 "):
        torchfim.fisher(model, inputs, class_dim=class_dim)
    with pytest.raises(torchfim.TorchfimError, match=r"class_dim must be -1 .* or 1 "):
        report_mod.compute_report(model, report_mod.as_data(inputs, "test"), class_dim=class_dim, progress=False)


def test_the_hessian_budget_counts_the_output_positions(monkeypatch):
    """A forward-over-forward pass costs in proportion to the positions it runs over: the automatic
    variance subset shrinks with them, and the note names them."""
    from torchfim.report import settings

    model, batch = _lm_and_data()
    P = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(settings, "HESSIAN_BUDGET", P * T * N - 1)  # short of all 12 inputs of T positions
    R = report_mod.compute_report(model, report_mod.as_data(batch, "test"), mask="attention_mask", progress=False)
    assert R["data"]["hessian_variances"] is False  # 11 inputs would fit, fewer than MIN_AUTO_VARIANCE_INPUTS
    assert f"and {T} output positions per input" in R["data"]["variance_inputs_note"]
    assert settings.variance_plan(None, N, P) == (N, True, None)  # without positions the budget holds all 12
    monkeypatch.setattr(settings, "HESSIAN_BUDGET", P * T * 16)
    assert settings.variance_plan(None, 64, P, T)[:2] == (16, True)  # room for 16 of 64 inputs


def test_the_library_the_penalty_and_the_report_take_the_same_masks():
    """One rule everywhere (``families.positions.is_position_mask``): a bool mask, or an integer or float one
    of 0s and 1s, is taken, and gives what the bool mask gives; a float mask of fractions is refused, and so is an
    integer one with -1 for padding (it was read as ``!= 0``: every position observed, silently)."""
    model, batch = _lm_and_data()
    keep = batch["attention_mask"]
    want = torchfim.fisher(model, batch["input_ids"], structure="trace", mask=keep.bool())
    penalty = torchfim.train.FisherPenalty(model, generator=torch.Generator().manual_seed(0))
    for mask in (keep, keep.double()):
        assert torch.equal(torchfim.fisher(model, batch["input_ids"], structure="trace", mask=mask), want)
        penalty(batch["input_ids"], step=0, mask=mask)
        data = report_mod.as_data({**batch, "attention_mask": mask}, "test")
        R = report_mod.compute_report(model, data, mask="attention_mask", variance_inputs=2, max_block=0, progress=False)
        assert R["trace"]["exact"] == pytest.approx(float(want), rel=1e-12)
    fractions = keep * 0.5
    with pytest.raises(torchfim.TorchfimError, match="0/1"):
        torchfim.fisher(model, batch["input_ids"], mask=fractions)
    with pytest.raises(torchfim.TorchfimError, match="0/1"):
        penalty(batch["input_ids"], step=0, mask=fractions)
    with pytest.raises(torchfim.TorchfimError, match="values other than 0 and 1"):
        report_mod.compute_report(model, report_mod.as_data({**batch, "attention_mask": fractions}, "test"),
                                  mask="attention_mask", progress=False)
    signed = keep * 2 - 1  # 1 observed, -1 padding
    with pytest.raises(torchfim.TorchfimError, match="torch.int64 values other than 0 and 1"):
        torchfim.fisher(model, batch["input_ids"], mask=signed)
    with pytest.raises(torchfim.TorchfimError, match="values other than 0 and 1"):
        penalty(batch["input_ids"], step=0, mask=signed)
    with pytest.raises(torchfim.TorchfimError, match="0/1"):
        torchfim.families.Positions(torchfim.families.Categorical(), signed.shape[1], mask=signed)


def test_an_unsaid_class_dim_on_image_outputs_is_noted_in_the_report():
    """Outputs (batch, C, H, W) without --class-dim are read with the classes last, as the library reads
    them, and the report says so in its outputs note, naming both choices, instead of a library warning per
    call; --class-dim -1 says it and silences the note, and --class-dim 1 reads dim 1 as the classes."""
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 3, 1)).double()
    x = torch.randn(6, 2, 3, 4, dtype=torch.float64)
    kw = {"variance_inputs": 4, "max_block": 0, "progress": False}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no CLASSES_LAST from the library's calls
        unsaid = report_mod.compute_report(model, report_mod.as_data(x, "test"), **kw)
    note = unsaid["outputs"]["note"]
    assert "(batch, 3, 3, 4) were read with the classes last, 4 classes at 3×3 positions" in note
    assert "pass class_dim=1 for" in note and "or class_dim=-1 to say" in note and "--" not in note
    with on_command_line():
        said = report_mod.compute_report(model, report_mod.as_data(x, "test"), **kw)["outputs"]["note"]
    assert "pass --class-dim 1 for" in said and "or --class-dim -1 to say" in said
    last = report_mod.compute_report(model, report_mod.as_data(x, "test"), class_dim=-1, **kw)
    assert last["outputs"]["note"] is None and last["trace"]["exact"] == unsaid["trace"]["exact"]
    first = report_mod.compute_report(model, report_mod.as_data(x, "test"), class_dim=1, **kw)
    assert first["outputs"]["note"] is None and first["outputs"]["positions"] == [3, 4]
    want = torchfim.fisher(model, x, structure="trace", class_dim=1)
    assert first["trace"]["exact"] == pytest.approx(float(want), rel=1e-10)


def test_inputs_whose_target_is_minus_100_count_with_a_fisher_of_0_and_are_said_once():
    """A classifier's targets (n,) with -100 for 6 of 24 inputs: the library observes nothing of those inputs, and now
    so does every number of the report, with one note of its own. Before: the report refused such targets ("not
    labels of the categorical family") and skipped the empirical Fisher, while the library takes them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()
    x = torch.randn(24, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.randint(0, 4, (24,), generator=torch.Generator().manual_seed(3))
    y[:6] = -100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        R = report_mod.compute_report(model, report_mod.as_data((x, y), "test"), variance_inputs=24, max_block=0,
                                      progress=False)
    labelled = float(torchfim.fisher(model, x[6:], structure="trace")) * 18 / 24
    empirical = float(torchfim.fisher(model, x[6:], targets=y[6:], estimator="empirical", structure="trace")) * 18 / 24
    assert R["trace"]["exact"] == pytest.approx(labelled, rel=1e-10)
    assert R["empirical"]["trace"] == pytest.approx(empirical, rel=1e-10)
    assert R["outputs"]["observed_positions_per_input"] == pytest.approx(0.75)
    assert R["outputs"]["note"].startswith("6 of the 24 inputs have no observed position (masked, or every target -100)")
    assert R["warnings"] == [] and not [w for w in caught if "no observed position" in str(w.message)]


def test_the_notes_library_call_gives_the_reports_trace():
    """report.md's note named ``torchfim.fisher(model, inputs, structure="trace")`` as giving ``trace.exact``, which
    it does not where the report masks positions (133.38 against 114.12 in a trial): the call now carries the mask (and
    the family), and evaluated as written it gives the report's number."""
    from torchfim.report.markdown import markdown

    model, batch = _lm_and_data()
    batch["labels"] = batch["input_ids"].clone()  # labels that do not mark the padding: only the mask leaves it out
    R = report_mod.compute_report(model, report_mod.as_data(batch, "test"), mask="attention_mask", variance_inputs=2,
                                  max_block=0, progress=False)
    assert 'empirical_per="position"' in markdown(R)  # the report's empirical Fisher is per input: said, with the other
    note = next(line for line in markdown(R).splitlines() if "gives `trace.exact`" in line)
    call = re.search(r"`(torchfim\.fisher\([^`]*\))`", note).group(1)
    assert "mask='attention_mask'" in call
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    got = eval(call, {"torchfim": torchfim, "model": model, "inputs": inputs})
    assert float(got) == pytest.approx(R["trace"]["exact"], rel=1e-12)
    assert float(torchfim.fisher(model, inputs, structure="trace")) != pytest.approx(R["trace"]["exact"], rel=1e-3)
