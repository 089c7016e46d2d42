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

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import Config
from .models import Data
from .reach_models import ReachData
from .workload import Contender, Runner

__all__ = ["backward_passes", "penalty_passes", "EXACT_NOTE", "PENALTY_NOTE"]

#: The report's notes on the two kinds of reference.
EXACT_NOTE = ("arithmetic: one forward and C − 1 = 9 backward passes of the summed NLL per mini-batch (graph "
              "kept): the exact diagonal's pull-backs and per-sample weight gradients at the floor's speed")
PENALTY_NOTE = ("arithmetic: the finite-difference penalty's passes alone, two forwards and two backwards per "
                "step; arithmetic-every10: two forwards and three backwards once in ten steps, plain steps between")


def _nll(out: Tensor, y: Tensor, reduction: str = "sum") -> Tensor:
    """Cross-entropy of outputs ``(B, C)`` or ``(B, T, C)`` (one label per position)."""
    return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction=reduction)


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


def penalty_passes(base: nn.Module, data: Data, cfg: Config, every: int) -> Contender:
    """``arithmetic`` (``every=1``) or ``arithmetic-every<every>``: ``cfg.penalty_steps`` SGD steps
    per call with the finite-difference penalty's passes and none of its other work (see above)."""

    def make() -> Runner:
        model = copy.deepcopy(base)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=cfg.lr)
        state = {"step": 0}

        def run() -> None:
            for _ in range(cfg.penalty_steps):
                step = state["step"]
                x = data.batches[step % len(data.batches)]
                y = data.targets[step % len(data.targets)]
                opt.zero_grad(set_to_none=True)
                if step % every == 0:
                    torch.autograd.grad(_nll(model(x), y, "mean"), params)  # g, no graph kept
                    loss = _nll(model(x), y, "mean")
                    if every > 1:  # the penalty's own gradient, cached for the steps between
                        torch.autograd.grad(loss, params, retain_graph=True)
                else:
                    loss = _nll(model(x), y, "mean")
                loss.backward()
                opt.step()
                state["step"] = step + 1

        return run

    name = "arithmetic" if every == 1 else f"arithmetic-every{every}"
    return Contender(name, make, compare=False, per_call=cfg.penalty_steps)
