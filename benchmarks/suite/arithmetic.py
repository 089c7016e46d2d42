"""Contenders that time a method's passes alone, at the floor's speed: what a target leaves for the rest.

A target such as "the exact diagonal within 7× the floor" is only reachable if the passes that the
method cannot do without fit in it. These contenders run exactly those passes with plain autograd
calls in the same run, so the report shows next to each such target how much of its limit the
passes already take (the cost model of ``benchmarks/README.md``, measured instead of estimated):

* ``arithmetic`` in the exact diagonals (CNN, transformer, ResNet): per mini-batch one forward and
  ``C − 1`` backward passes of the summed NLL, the graph kept between them. The exact diagonal
  pulls ``C − 1`` output vectors back through the network (Λ of a softmax has rank ``C − 1``) and
  forms each vector's per-sample weight gradients, whose multiply-adds are those of the batch
  weight gradient; so this is the method at the floor's speed per multiply-add, before any square.
* ``arithmetic`` and ``arithmetic-every10`` in ``penalty-step-mlp``: the finite-difference penalty's
  passes without the penalty. Every step: a forward and a backward for ``g``, then the forward and
  the backward of the step (``2F + 2B``). With ``every=10``: once in ten steps the same plus one more
  backward through the second pass (the penalty's own gradient, to reuse), and a plain step
  otherwise.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import Data
from .reach_models import ReachData
from .workload import Contender, Runner

__all__ = ["backward_passes", "exact_flop_limit", "PenaltyPasses", "EXACT_NOTE", "PENALTY_NOTE"]

#: The report's notes on the two kinds of reference.
EXACT_NOTE = ("arithmetic: one forward and C − 1 = 9 backward passes of the summed NLL per mini-batch (graph "
              "kept): the exact diagonal's pull-backs and per-sample weight gradients at the floor's speed")
PENALTY_NOTE = ("arithmetic: the finite-difference penalty's passes alone, two forwards and two backwards per "
                "step; arithmetic-every10: two forwards and three backwards once in ten steps, plain steps between")


def _nll(out: Tensor, y: Tensor) -> Tensor:
    """Summed cross-entropy of outputs ``(B, C)`` or ``(B, T, C)`` (one label per position)."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum")


def backward_passes(model: nn.Module, data: Data | ReachData) -> Contender:
    """``arithmetic``: per mini-batch one forward and ``C − 1`` backward passes of the summed NLL
    (gradients of every trainable parameter, graph kept until the last), ``C`` the model's outputs."""

    def make() -> Runner:
        params = [p for p in model.parameters() if p.requires_grad]
        with torch.no_grad():
            passes = model(data.batches[0]).shape[-1] - 1

        def run() -> None:
            for x, y in zip(data.batches, data.targets):
                loss = _nll(model(x), y)
                for k in range(passes):
                    torch.autograd.grad(loss, params, retain_graph=k < passes - 1)

        return run

    return Contender("arithmetic", make, compare=False)


def exact_flop_limit(model: nn.Module, data: Data | ReachData) -> str:
    """The report's note on the least work of an exact diagonal, counted on the first mini-batch by torch's
    ``FlopCounterMode`` (matrix products and convolutions): ``F`` of the floor's forward and ``B`` of its
    backward. The method's ``C − 1`` pull-backs and per-sample weight gradients are the contractions of
    ``C − 1`` backward passes, so it needs ``F + (C − 1)·B`` against the floor's ``F + B``: the ratio a
    target below it can meet only by running faster per multiply-add than the floor's own kernels."""
    from torch.utils.flop_counter import FlopCounterMode

    if any(isinstance(m, nn.RNNBase) for m in model.modules()):
        return "least work of the exact diagonal: not counted (torch's FlopCounterMode has no formula for recurrent layers)"
    x, y = data.batches[0], data.targets[0]
    params = [p for p in model.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as forward:
        out = model(x)
        loss = _nll(out, y)
    with FlopCounterMode(display=False) as backward:
        torch.autograd.grad(loss, params)
    f, b, vectors = forward.get_total_flops(), backward.get_total_flops(), out.shape[-1] - 1
    return (f"least work of the exact diagonal (torch's FlopCounterMode, first mini-batch): forward F = {f / 1e9:.2f} "
            f"GFLOP, backward B = {b / 1e9:.2f} GFLOP; F + {vectors}·B over the floor's F + B = "
            f"{(f + vectors * b) / (f + b):.2f}× floor at the floor's FLOP rate")


class PenaltyPasses:
    """Stands in for ``FisherPenalty`` in the SGD loop of ``penalty-step-mlp`` (its ``penalised_loss``):
    the finite-difference penalty's passes on the task loss, and none of the penalty's other work.

    On a step ``step % every == 0``: a forward and a backward for ``g`` (no graph kept), then the
    step's forward, whose loss the loop back-propagates; with ``every > 1`` also one backward through
    that forward for the penalty's own gradient (cached by the real penalty). Other steps: plain.
    """

    def __init__(self, model: nn.Module, every: int) -> None:
        self.model, self.every = model, every
        self.params = [p for p in model.parameters() if p.requires_grad]

    def penalised_loss(self, x: Tensor, task_loss: Callable[[Tensor], Tensor], step: int) -> Tensor:
        if step % self.every:
            return task_loss(self.model(x))
        torch.autograd.grad(task_loss(self.model(x)), self.params)  # g
        loss = task_loss(self.model(x))
        if self.every > 1:
            torch.autograd.grad(loss, self.params, retain_graph=True)
        return loss
