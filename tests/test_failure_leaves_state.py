"""A call of torchfim that fails or is interrupted part-way leaves the state it found: the user's model, torch's global
settings and torchfim's own objects, so that the next call gives what it would have given.

The failure is injected by a module of the model whose forward raises (``KeyboardInterrupt``, as Ctrl-C does) at its
k-th call. Oracle: a twin (the same model, monitor and generator, built from the same seeds) whose calls are never
interrupted, in float64 to 1e-12. Before, an interrupted ``FisherTraceMonitor.measure`` kept the subset window and the
labels it had drawn (measuring again took the next window: Tr(F) 3.82 against 2.54 on the twin) and stamped the
parameters as measured, so that ``step`` at the same step number returned the previous record, taken at other
parameters (2.736 against 2.249). An interrupted ``FisherPenalty`` call kept the random state it started from as the
step's first, though the retried call drew from the stream after it: a line search's evaluations of that step, at
the same parameters, gave 0.2207 first and 0.2736 afterwards (``kind="trace"``). And any penalty call with
``kind="trace"`` or finite differences, interrupted or not, left the ``weight`` that the older
``torch.nn.utils.spectral_norm``/``weight_norm`` hooks set on their module as a torch.func wrapper (``torch.save(model)``
then raised "Cannot access storage of TensorWrapper") or as the weight of the shifted parameters (1.6e-7 off);
oracle: torch's own ``compute_weight`` of the parameters.
"""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from torch import nn

from torchfim.train import FisherPenalty, FisherTraceMonitor


class _Interrupting(nn.Module):
    """The identity, raising ``KeyboardInterrupt`` at the ``at``-th call since :meth:`arm` of any copy of it (the
    count is the class's: torchfim calls its own copies of the user's modules)."""

    plan = {"calls": 0, "at": None}

    @classmethod
    def arm(cls, at: int | None) -> None:
        cls.plan.update(calls=0, at=at)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.plan["calls"] += 1
        if self.plan["calls"] == self.plan["at"]:
            raise KeyboardInterrupt(f"interrupted at call {self.plan['at']}")
        return x


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), _Interrupting(), nn.Tanh(), nn.Linear(5, 3)).double()


def _held() -> torch.Tensor:
    return torch.randn(10, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _monitor(model: nn.Module, seeded: bool, **options: object) -> FisherTraceMonitor:
    generator = torch.Generator().manual_seed(7) if seeded else None
    return FisherTraceMonitor(model, _held(), every=1, generator=generator, **options)


def _numbers(record) -> tuple[float, float]:
    return record.trace, record.stderr


def _interrupted(at: int, call) -> None:
    _Interrupting.arm(at)
    try:
        with pytest.raises(KeyboardInterrupt):
            call()
    finally:
        _Interrupting.arm(None)


@pytest.mark.parametrize(("options", "seeded", "at"), [  # at 2: the first measurement's checks run the model too
    ({"subset": 4}, True, 1), ({"subset": 4}, False, 2), ({"subset": 4, "control_variate": True}, True, 2),
    ({"subset": 4, "control_variate": True}, False, 1), ({}, True, 2)], ids=["subset", "subset-private",
                                                                        "subset-cv", "subset-cv-private", "all"])
def test_an_interrupted_measurement_measured_again_gives_what_the_uninterrupted_one_gives(options, seeded, at):
    monitor, twin = _monitor(_model(), seeded, **options), _monitor(_model(), seeded, **options)
    for step in range(3):
        _interrupted(at if step == 0 else 1, lambda step=step: monitor.measure(step))  # later measurements: one forward
        got, want = _numbers(monitor.measure(step)), _numbers(twin.measure(step))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    assert [r.step for r in monitor.history] == [0, 1, 2]


def test_an_interrupted_measurement_does_not_stamp_the_parameters_as_measured():
    monitor, twin = _monitor(_model(), True), _monitor(_model(), True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the step measured again at moved parameters is named; not the point here
        for m in (monitor, twin):
            m.step(0)
            with torch.no_grad():
                m.model[0].weight.mul_(1.5)  # moved in place, the step counter not advanced
        _interrupted(1, lambda: monitor.step(0))
        got, want = monitor.step(0), twin.step(0)
    assert got is not monitor.history[0]  # before: the record taken at the weights before the move
    torch.testing.assert_close(_numbers(got), _numbers(want), rtol=1e-12, atol=0)


def _evaluations(penalty: FisherPenalty, x: torch.Tensor) -> list[float]:
    """The penalty at step 0 three times, as a line search evaluates it: at θ, at θ moved in place, at θ again."""
    weight, values = penalty.model[0].weight, [penalty(x, step=0).item()]
    for move in (weight.mul_, weight.div_):
        with torch.no_grad():
            move(1.1)
        values.append(penalty(x, step=0).item())
    return values


@pytest.mark.parametrize(("kind", "grad_method", "at"), [("trace", "exact", 2), ("trace", "finite_difference", 3),
                                                         ("batch_gradient", "finite_difference", 2)])
def test_an_interrupted_penalty_call_is_undone_so_the_step_stays_one_function_of_the_parameters(kind, grad_method, at):
    def penalty() -> FisherPenalty:
        return FisherPenalty(_model(), kind=kind, grad_method=grad_method, generator=torch.Generator().manual_seed(7))

    interrupted, twin, x = penalty(), penalty(), _held()
    _interrupted(at, lambda: interrupted(x, step=0))  # after the labels are drawn
    got = _evaluations(interrupted, x)
    torch.testing.assert_close(got, _evaluations(twin, x), rtol=1e-12, atol=0)
    assert got[2] == got[0]  # before: 0.2736 at θ again against 0.2207 at θ first (kind="trace")


def _reparametrised(hook: str) -> nn.Sequential:
    """A model whose first layer has the older hook-based spectral norm or weight norm, which sets ``weight`` as a
    plain attribute at each forward."""
    torch.manual_seed(0)
    wrap = nn.utils.spectral_norm if hook == "spectral_norm" else nn.utils.weight_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # weight_norm's deprecation: the hook is what is tested
        first = wrap(nn.Linear(4, 5))
    return nn.Sequential(first, _Interrupting(), nn.Tanh(), nn.Linear(5, 3)).double().eval()


@pytest.mark.parametrize("hook", ["spectral_norm", "weight_norm"])
@pytest.mark.parametrize(("kind", "grad_method", "at"), [("trace", "exact", 2), ("trace", "finite_difference", 2),
                                                         ("batch_gradient", "finite_difference", 2)])
def test_the_penalty_leaves_the_weight_an_older_reparametrising_hook_sets_as_a_plain_forward_leaves_it(
        hook, kind, grad_method, at):
    model, x = _reparametrised(hook), _held()
    model(x)  # sets model[0].weight, as a training loop's forward does
    penalty = FisherPenalty(model, kind=kind, grad_method=grad_method, generator=torch.Generator().manual_seed(7))
    _interrupted(at, lambda: penalty(x, step=0))
    penalty(x, step=1)
    layer = model[0]
    reparametrisation = next(iter(layer._forward_pre_hooks.values()))
    with torch.no_grad():  # torch's own weight of the parameters (and u, v), as a forward in eval mode computes it
        want = (reparametrisation.compute_weight(layer, do_power_iteration=False) if hook == "spectral_norm"
                else reparametrisation.compute_weight(layer))
    # before: a torch.func wrapper (kind="trace") or the weight of the shifted parameters (finite differences)
    assert not torch._C._functorch.is_functorch_wrapped_tensor(layer.weight)
    torch.testing.assert_close(layer.weight.detach(), want, rtol=1e-14, atol=0)
    torch.save(model, io.BytesIO())  # before: "Cannot access storage of TensorWrapper"
