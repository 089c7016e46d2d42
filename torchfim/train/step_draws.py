"""The random numbers of one step of :class:`~torchfim.train.FisherPenalty`, drawn again where an optimiser evaluates
the step again at moved parameters.

An optimiser that evaluates its closure several times per step (L-BFGS, in its line search) calls the penalty at the
same step number at new parameters, written in place, with no optimiser step between. Each call drew new labels
``ŷ ~ p(y|x, θ)``, so the line search compared values of a different random function at each point. Here the calls of
a step's first evaluation (one, or one per chunk of data a closure loops over) each keep the state of the random
numbers they start from: the penalty's generator and torch's global one (CPU, and the parameters' CUDA device), which
Dropout draws from. Once the parameters move without an optimiser step, the calls of the new evaluation start, in
order, from those states again (common random numbers: the same uniforms, the labels of the new θ), each leaving the
generators as it found them; calls beyond the first evaluation's number draw from the stream. Within one step the
penalty is then one function of θ. A call that raises (or is interrupted, Ctrl-C) is undone: the generators go back to
the states it started from and the next call takes its place, drawing what it drew.

A new step number, or an optimiser step taken since the last call (a step counter that does not advance), starts a
new first evaluation; so do calls at unmoved parameters (the micro-batches of gradient accumulation: they draw from
the stream, one state kept each). Generators of other accelerators (MPS, XPU) and of the other GPUs of a model split
over several are not replayed; other threads that draw while a replayed call runs see the rewound global stream.
Optimiser steps are seen through torch's post-step hooks (:mod:`.parameter_stamp`), which torch 2.2's dynamo strips
from every optimiser once it has compiled something: there a step counter that does not advance replays the step's
first numbers after each optimiser step.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .parameter_stamp import Stamp, stamp

__all__ = ["StepDraws", "set_torch_rng_state", "torch_rng_state"]

TorchState = tuple[Tensor, Tensor | None]  # torch's CPU generator's state, the CUDA device's
State = tuple[Tensor | None, TorchState]  # the penalty's generator's, torch's


def torch_rng_state(device: torch.device) -> TorchState:
    """The states of torch's global generators that a pass on ``device`` draws from (CPU, and ``device``'s on CUDA)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def set_torch_rng_state(device: torch.device, state: TorchState) -> None:
    """Set torch's global generators to ``state`` (from :func:`torch_rng_state`)."""
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _state(generator: torch.Generator | None, device: torch.device) -> State:
    return (None if generator is None else generator.get_state()), torch_rng_state(device)


def _set_state(generator: torch.Generator | None, device: torch.device, state: State) -> None:
    if generator is not None:
        generator.set_state(state[0])
    set_torch_rng_state(device, state[1])


@dataclass
class StepDraws:
    """The step whose draws are kept, the states its first evaluation's calls started from, the call of the current
    evaluation, whether that is the first, and the parameters' stamp at the last call."""

    step: int | None = None
    starts: list[State] = field(default_factory=list)
    call: int = 0
    first: bool = True
    stamped: Stamp | None = None

    @contextmanager
    def replayed(self, step: int, params: list[Tensor], generator: torch.Generator | None) -> Iterator[None]:
        """The block draws from the state its counterpart in the step's first evaluation started from, where this
        call belongs to a later evaluation of ``step`` (the module docstring); otherwise from the stream."""
        now, device = stamp(params), params[0].device
        if step != self.step or self.stamped is None or now.steps != self.stamped.steps:
            self.step, self.starts, self.call, self.first = step, [], 0, True
        elif not self.stamped.same_as(now):  # moved in place since the last call: the step evaluated again
            self.call, self.first = 0, False
        self.stamped = now
        start = _state(generator, device)
        if self.first:
            self.starts.append(start)
        replay = not self.first and self.call < len(self.starts)
        self.call += 1
        if replay:
            _set_state(generator, device, self.starts[self.call - 1])
        try:
            yield
        except BaseException:
            # Undone: a later evaluation would replay numbers the retried call did not draw
            self.call -= 1
            if self.first:
                self.starts.pop()
            _set_state(generator, device, start)
            raise
        if replay:
            _set_state(generator, device, start)
