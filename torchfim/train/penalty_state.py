"""What :class:`~torchfim.train.FisherPenalty` keeps from call to call, saved and restored: its checkpoint
(``state_dict``, ``load_state_dict``: the generator, the last value and step, the cached gradient by name) and the
state an evaluation call (gradients off) leaves as it found it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from .arguments import trainable
from .checkpoint import VERSION, checked, generator_state, gradients_on, named_gradients, restored_generator
from .kept_gradient import KeptGradient
from .penalty_schedule import Schedule
from .step_draws import StepDraws


class PenaltyState:
    """The state of :class:`~torchfim.train.FisherPenalty` across calls (a base class of it, which sets the
    attributes below in its constructor)."""

    model: nn.Module
    kind: str
    generator: torch.Generator | None
    last_value: Tensor | None
    last_step: int | None
    _kept: KeptGradient
    _draws: StepDraws
    _schedule: Schedule
    _evaluating: bool

    def state_dict(self) -> dict[str, object]:
        """What resuming needs (:mod:`torchfim.train.checkpoint`): the generator's state (None for torch's
        global one, which the caller saves), ``last_value``, ``last_step``, the cached gradient by name, and the
        largest mini-batch a computed step has taken (against which a small one is named)."""
        kept = self._kept
        cache = None if kept.grads is None else named_gradients(self.model, kept.params, kept.grads)
        return {"version": VERSION, "settings": {"kind": self.kind}, "generator": generator_state(self.generator),
                "last_value": self.last_value, "last_step": self.last_step, "cache": cache,
                "largest_batch": self._schedule.largest}

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Go on from a saved :meth:`state_dict` as the saved run would: the steps up to the next computed
        one reuse the saved gradient, put on this model's parameters of the same names (a prefix a wrapper puts
        on every name read away: a state saved on the model in DDP or ``nn.DataParallel`` loads into the bare
        model's penalty, and the other way round); the generator passed at construction, if any, is set to
        the saved state."""
        state = checked(state, "FisherPenalty", {"kind": self.kind}, ("generator", "last_value", "last_step", "cache"))
        self.generator = restored_generator(self.generator, state["generator"], "FisherPenalty")
        self.last_step, first = state["last_step"], trainable(self.model)[1][0]
        self.last_value = None if state["last_value"] is None else state["last_value"].to(first.device, first.dtype)
        params, grads = (None, None) if state["cache"] is None else gradients_on(self.model, state["cache"])
        self._kept.restore(params, grads, self.last_value, self.last_step)
        self._schedule.largest = int(state.get("largest_batch", 0))  # absent from states saved before it was kept
        self._draws = StepDraws()  # a run rolled back in this process draws as the saved one went on

    @contextmanager
    def _kept_unless_training(self) -> Iterator[None]:
        """A call with gradients off (``torch.no_grad()``, ``torch.inference_mode()``: no training step can
        back-propagate it) is an evaluation, on a validation batch say: it leaves the kept gradient, the step's
        draws, ``last_value``, ``last_step`` and the penalty's own generator as it found them."""
        if torch.is_grad_enabled():
            yield
            return
        kept, draws = replace(self._kept), replace(self._draws, starts=list(self._draws.starts))
        last, off = (self.last_value, self.last_step), set(self._schedule.off)
        state = None if self.generator is None else self.generator.get_state()
        self._evaluating = True  # the computing passes turn gradients on: the caller's mode is read here
        try:
            yield
        finally:
            self._evaluating = False
            self._kept, self._draws, self._schedule.off = kept, draws, off
            self.last_value, self.last_step = last
            if state is not None:
                self.generator.set_state(state)
