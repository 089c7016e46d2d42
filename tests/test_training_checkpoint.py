"""Saving and resuming the training tools: ``state_dict()`` / ``load_state_dict()`` of the monitor and penalty.

The oracle is the uninterrupted run: a run that saves model, optimiser and the tool's state at a step, is
rebuilt from scratch (new model object, new tool) and resumes from the saved files must record, step for
step, exactly what the uninterrupted run records. Each test also shows that resuming without the tool's
state gives something else, so it would fail if loading did nothing.
"""

from __future__ import annotations

import csv
import io

import clients
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfim
from torchfim import _settings_digest
from torchfim.train import FisherPenalty, FisherTraceMonitor

STEPS, SAVE_AT = 10, 4


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def _data() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 5, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 4, (32,), generator=g), torch.randn(40, 5, generator=g, dtype=torch.float64)


def _saved(obj: object) -> object:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint file would take it."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _fields(mon: FisherTraceMonitor) -> list[tuple]:
    return [(r.step, r.trace, r.stderr, r.n_inputs, r.variance_ratio) for r in mon.history]


def _train(model, opt, x, y, steps, tool=None) -> None:
    for step in steps:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if tool is not None:
            tool.step(step)


def _monitored(options: dict, resume: str | None, wrapped: str | None = None, **paths) -> FisherTraceMonitor:
    """The monitor of a run of STEPS steps: uninterrupted (None), or rebuilt after step SAVE_AT with its
    saved state ("state") or without it ("fresh"); ``wrapped``: the run ("saved" or "resumed") whose monitor is
    built on the model in ``nn.DataParallel``."""
    x, y, held = _data()
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    own = options.pop("own_generator", False)  # a generator of the caller's, set to the saved state on loading
    mon = FisherTraceMonitor(nn.DataParallel(model) if wrapped == "saved" else model, held, every=1, n_samples=2,
                             **options, **paths, generator=torch.Generator().manual_seed(5) if own else None)
    if resume is None:
        _train(model, opt, x, y, range(STEPS), mon)
        return mon
    _train(model, opt, x, y, range(SAVE_AT + 1), mon)
    saved = _saved({"model": model.state_dict(), "opt": opt.state_dict(), "mon": mon.state_dict()})
    _train(model, opt, x, y, range(SAVE_AT + 1, STEPS - 2), mon)  # a run that goes on, then dies
    model = _model()
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.load_state_dict(saved["opt"])
    mon = FisherTraceMonitor(nn.DataParallel(model) if wrapped == "resumed" else model, held, every=1, n_samples=2,
                             **options, **paths, generator=torch.Generator().manual_seed(99) if own else None)
    if resume == "state":
        mon.load_state_dict(saved["mon"])
    _train(model, opt, x, y, range(SAVE_AT + 1, STEPS), mon)
    return mon


OPTIONS = [{}, {"subset": 12}, {"control_variate": True}, {"subset": 12, "control_variate": True},
           {"subset": 12, "control_variate": True, "own_generator": True}]


@pytest.mark.parametrize("options", OPTIONS, ids=["plain", "subset", "cv", "subset-cv", "subset-cv-own-generator"])
def test_a_resumed_monitor_records_what_the_uninterrupted_one_does(options: dict) -> None:
    whole = _fields(_monitored(dict(options), None))
    assert len(whole) == STEPS
    assert _fields(_monitored(dict(options), "state")) == whole
    restarted = _fields(_monitored(dict(options), "fresh"))
    assert restarted[SAVE_AT + 1 :] != whole[SAVE_AT + 1 :] and restarted[0] != whole[0]


def _rows(path) -> list[list[str]]:
    with open(path, newline="") as f:
        return [row[:5] + row[6:] for row in csv.reader(f)]  # without the seconds column


def test_the_csv_of_a_resumed_run_holds_the_uninterrupted_rows(tmp_path) -> None:
    options = {"subset": 12, "control_variate": True}
    _monitored(options, None, csv_path=tmp_path / "whole.csv")
    _monitored(options, "state", csv_path=tmp_path / "resumed.csv")
    whole = _rows(tmp_path / "whole.csv")
    assert len(whole) == STEPS + 1 and whole[0][:2] == ["step", "trace"]
    assert _rows(tmp_path / "resumed.csv") == whole
    _monitored(options, "fresh", csv_path=tmp_path / "appended.csv")  # without the state: the dead run's rows stay
    assert len(_rows(tmp_path / "appended.csv")) == STEPS + 1 + (STEPS - 2 - SAVE_AT - 1)


def test_tensorboard_drops_the_events_after_the_saved_step(tmp_path) -> None:
    clients.need("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def logged(run: str, resume: str | None) -> list[tuple[int, float]]:
        mon = _monitored({"subset": 12}, resume, tensorboard_dir=tmp_path / run)
        mon.close()
        events = EventAccumulator(str(tmp_path / run))
        events.Reload()
        return [(e.step, e.value) for e in events.Scalars("fisher/trace")]

    whole = logged("whole", None)
    assert [step for step, _ in whole] == list(range(STEPS))
    resumed = logged("resumed", "state")
    assert [step for step, _ in resumed] == list(range(STEPS))
    assert resumed == whole
    assert len(logged("restarted", "fresh")) > STEPS  # without the state the dead run's events stay


def test_a_monitor_refuses_the_state_of_another_set_up(monkeypatch: pytest.MonkeyPatch) -> None:
    _, _, held = _data()
    model = _model()
    mon = FisherTraceMonitor(model, held, subset=12, control_variate=True)
    mon.measure(0)
    state = _saved(mon.state_dict())
    for other, named in [({"subset": 10, "control_variate": True}, "subset=12"),
                         ({"subset": 12}, "control_variate=True"),
                         ({"subset": 12, "control_variate": True, "n_samples": 3}, "n_samples=1")]:
        with pytest.raises(torchfim.TorchfimError, match=named):
            FisherTraceMonitor(model, held, **other).load_state_dict(state)
    with pytest.raises(torchfim.TorchfimError, match="inputs_checksum"):  # the same inputs in another order
        FisherTraceMonitor(model, held.flip(0), subset=12, control_variate=True).load_state_dict(state)
    with pytest.raises(torchfim.TorchfimError, match="state_dict"):
        mon.load_state_dict({"history": []})
    monkeypatch.setattr(_settings_digest, "DIGEST_CHUNK", 7)  # the held inputs digested a row at a time: the same inputs
    FisherTraceMonitor(model, held, subset=12, control_variate=True).load_state_dict(state)


def test_a_monitor_refuses_held_inputs_its_earlier_checksum_could_not_tell_apart() -> None:
    """The held inputs were checked by Σ (row index + 1)·(row sum): the same rows cut into other mini-batches, a
    row's entries reversed, or rows of equal sums swapped were resumed as the saved run's (other labels per input);
    a digest of every mini-batch now tells them apart (with subset=, of the pool windows are drawn from, which no
    cut changes). A state saved with that checksum is refused naming why."""
    _, _, held = _data()
    held = held / held.sum(1, keepdim=True)  # every row sums to 1
    model = _model()
    mon = FisherTraceMonitor(model, [held[:20], held[20:]])
    mon.measure(0)
    state = _saved(mon.state_dict())
    reversed_row = held.clone()
    reversed_row[3] = reversed_row[3].flip(0)
    swapped = torch.cat([held[[1, 0]], held[2:]])
    for other in ([held[:16], held[16:]], [reversed_row[:20], reversed_row[20:]], [swapped[:20], swapped[20:]]):
        with pytest.raises(torchfim.TorchfimError, match="inputs_checksum.*the same held inputs, in the same order "
                                                         "and mini-batches"):
            FisherTraceMonitor(model, other).load_state_dict(state)
    FisherTraceMonitor(model, [held[:20], held[20:]]).load_state_dict(state)
    state["settings"]["inputs_checksum"] = 820.0
    with pytest.raises(torchfim.TorchfimError, match="saved by an earlier torchfim, which checked the held inputs by a "
                                                     "weighted sum of their rows .* resume the run with the torchfim "
                                                     "that saved it, or start this FisherTraceMonitor afresh"):
        FisherTraceMonitor(model, [held[:20], held[20:]]).load_state_dict(state)


def _penalised(pen_options: dict, resume: str | None, method: str, wrapped: str | None = None) -> list[torch.Tensor]:
    """The parameters after each step of a run with a penalty every 3 steps, saved after step SAVE_AT (between
    two computed steps) and resumed as in :func:`_monitored`; ``wrapped``: the run ("saved" or "resumed") whose
    penalty is built on the model in ``nn.DataParallel`` (its parameters' names prefixed ``module.``)."""
    x, y, _ = _data()
    torch.manual_seed(0)
    model, after = _model(), []

    def run(model, opt, pen, steps):
        for step in steps:
            opt.zero_grad()
            pen.penalised_loss(x, lambda out: F.cross_entropy(out, y), step=step).backward()
            opt.step()
            after.append(torch.cat([p.detach().flatten() for p in model.parameters()]))

    def made(model):
        generator = torch.Generator().manual_seed(7)
        return FisherPenalty(model, alpha=0.5, every=3, grad_method=method, generator=generator, **pen_options)

    opt, pen = torch.optim.SGD(model.parameters(), lr=0.5), made(nn.DataParallel(model) if wrapped == "saved" else model)
    if resume is None:
        run(model, opt, pen, range(STEPS))
        return after
    run(model, opt, pen, range(SAVE_AT + 1))
    saved = _saved({"model": model.state_dict(), "opt": opt.state_dict(), "pen": pen.state_dict()})
    model = _model()
    model.load_state_dict(saved["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    opt.load_state_dict(saved["opt"])
    pen = made(nn.DataParallel(model) if wrapped == "resumed" else model)
    if resume == "state":
        pen.load_state_dict(saved["pen"])
    run(model, opt, pen, range(SAVE_AT + 1, STEPS))
    return after


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_a_resumed_penalty_trains_as_the_uninterrupted_one(kind: str, method: str) -> None:
    whole = _penalised({"kind": kind}, None, method)
    resumed = _penalised({"kind": kind}, "state", method)
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole)) and len(resumed) == STEPS
    restarted = _penalised({"kind": kind}, "fresh", method)  # step 5 reuses nothing, step 6 draws other labels
    assert not torch.equal(restarted[SAVE_AT + 1], whole[SAVE_AT + 1])


@pytest.mark.parametrize("wrapped", ["saved", "resumed"])
def test_a_penalty_resumes_from_the_state_of_the_same_model_wrapped_or_not(wrapped: str) -> None:
    """A state saved on the model in DDP or ``nn.DataParallel`` (names ``module.0.weight``, ...) goes on in the bare
    model's penalty, and the other way round. Before, it was refused as the state of another model."""
    whole = _penalised({}, None, "exact")
    resumed = _penalised({}, "state", "exact", wrapped)
    assert all(torch.equal(a, b) for a, b in zip(resumed, whole, strict=True))


@pytest.mark.parametrize("wrapped", ["saved", "resumed"])
def test_a_monitor_resumes_from_the_state_of_the_same_model_wrapped_or_not(wrapped: str) -> None:
    """The monitor's state names no parameter: it goes on alike (a guard beside the penalty's test)."""
    options = {"subset": 12, "control_variate": True}
    assert _fields(_monitored(dict(options), "state", wrapped=wrapped)) == _fields(_monitored(dict(options), None))


def test_a_penalty_refuses_the_state_of_another_model() -> None:
    x, _, _ = _data()
    model = _model()
    pen = FisherPenalty(model, every=3)
    pen(x, step=0).backward()
    state = _saved(pen.state_dict())
    assert set(state["cache"]) == {n for n, _ in model.named_parameters()}
    other = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 3)).double()
    with pytest.raises(torchfim.TorchfimError, match=r"\['2.weight', '2.bias'\]"):
        FisherPenalty(other, every=3).load_state_dict(state)
    with pytest.raises(torchfim.TorchfimError, match="kind='batch_gradient'") as refused:
        FisherPenalty(model, every=3, kind="trace").load_state_dict(state)
    assert "held inputs" not in str(refused.value)  # a penalty has none: that advice is the monitor's


def test_a_monitor_refuses_the_state_of_another_model() -> None:
    """A monitor's state saved on one model went on, without a word, in the monitor of a model of other parameters
    (a hidden layer of 12 against 24): the resumed history joined two models' Tr(F) in one curve. Refused now, naming
    the parameters; the same model, wrapped or not, and a state saved before the parameters were kept, still load."""
    _, _, held = _data()
    mon = FisherTraceMonitor(_model(), held, subset=12)
    mon.measure(0)
    state = _saved(mon.state_dict())
    wider = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), nn.Linear(24, 4)).double()
    with pytest.raises(torchfim.TorchfimError, match=r"parameters='4 tensors of 124 numbers .*' \(here '4 tensors of "
                                                     r"244 numbers .*'\).* a model of the same parameters"):
        FisherTraceMonitor(wider, held, subset=12).load_state_dict(state)
    FisherTraceMonitor(nn.DataParallel(_model()), held, subset=12).load_state_dict(state)
    del state["settings"]["parameters"]  # saved by a torchfim that kept no parameters
    FisherTraceMonitor(_model(), held, subset=12).load_state_dict(state)


def test_a_resumed_penalty_names_a_small_batch_as_the_uninterrupted_one_does() -> None:
    """The largest mini-batch a computed step took is saved: after resuming, a computed step on a much smaller one is
    named at once, as in the run that was not interrupted (before, only from the next computed step on)."""
    model, x = _model(), torch.randn(16, 5, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    pen = FisherPenalty(model, alpha=0.1, every=3, generator=torch.Generator().manual_seed(0))
    pen(x, step=0).backward()
    state = pen.state_dict()
    resumed = FisherPenalty(model, alpha=0.1, every=3, generator=torch.Generator().manual_seed(0))
    resumed.load_state_dict(state)
    with pytest.warns(RuntimeWarning, match=r"mini-batch of 2 inputs \(against 16 before\)"):
        resumed(x[:2], step=3).backward()
    older = {k: v for k, v in state.items() if k != "largest_batch"}  # a state saved before the size was kept
    FisherPenalty(model, alpha=0.1, every=3).load_state_dict(older)
