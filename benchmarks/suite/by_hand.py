"""Contenders that do a target's whole computation by hand, for the workload's own model only.

``arithmetic`` (:mod:`.arithmetic`) times the passes a method cannot do without; these time everything the target
asks for, the same numbers as torchfim's (``tests/test_benchmark_by_hand.py`` compares them), written for the
benchmark MLP alone: its layers known in advance, no input checks, no choice of family, backend or structure. So
the report shows beside a target whether code of any kind reaches it on this machine, and what torchfim's
generality costs on top:

* ``by-hand`` in ``penalty-step-mlp``: the step of ``FisherPenalty(grad_method="finite_difference")
  .penalised_loss`` at ``every=1``. A forward at θ, labels drawn by the categorical family's own draw, ``g = ∇L(θ)``
  by autograd, the norms of ``g`` and θ in one pass, the parameters shifted to ``θ' = θ + ε ĝ``
  (``torch.func.functional_call``), the forward at θ' of ``task + c·L``, its backward, and ``−c·g`` added into
  ``.grad`` after it (``c = 2α‖g‖/ε``, ``ε = 0.1·√eps·(1 + ‖θ‖)``).
* ``by-hand`` in ``monitor-every10-mlp``: training with the ``subset=32`` measurement every 10 steps. The monitor's
  next window of held inputs, a forward that keeps each Linear layer's input and output, labels and scores by the
  categorical family's routines, one backward of the scores to the layers' outputs, and the per-input squared
  score norms from them (``‖δ‖²(‖a‖² + 1)`` per layer: weight and bias), their mean and its standard error.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchfim.families import Categorical
from torchfim.train.finite_difference import FD_STEP_SCALE
from torchfim.train.trace_stats import Windows

from .config import Config
from .models import Data
from .workload import Contender, Runner

__all__ = ["BY_HAND_NOTE", "MONITOR_BY_HAND_NOTE", "SubsetTraceByHand", "fd_penalty_by_hand", "monitor_by_hand"]

#: The report's notes on the two contenders.
BY_HAND_NOTE = ("by-hand: the finite-difference penalised step (every=1) written out for this MLP alone, the same "
                "numbers as torchfim-fd without its checks and generality (benchmarks/suite/by_hand.py)")
MONITOR_BY_HAND_NOTE = ("by-hand: the subset=32 measurement written out for this MLP alone, the same windows, "
                        "labels and numbers as torchfim-subset32 without its checks and generality "
                        "(benchmarks/suite/by_hand.py)")
#: torchfim's categorical family: the labels and scores by hand are drawn by its own routines.
CATEGORICAL = Categorical()


def fd_penalty_step(model: nn.Module, names: list[str], params: list[Tensor], x: Tensor, y: Tensor, alpha: float,
                    generator: torch.Generator) -> None:
    """Leave in ``.grad`` the gradient of the finite-difference penalised loss (see the module docstring), on the
    CPU, for a gradient ``g`` that is not 0 (torchfim's guards for other devices and for ``g = 0`` left out)."""
    o = model(x)
    labels = CATEGORICAL.sample(o.detach(), 1, generator).reshape(-1)
    g = torch.autograd.grad(F.cross_entropy(o, labels), params)
    norms = torch.stack(torch._foreach_norm([*g, *(p.detach() for p in params)])).tolist()
    g_norm, theta_norm = math.hypot(*norms[: len(g)]), math.hypot(*norms[len(g) :])
    step = FD_STEP_SCALE * math.sqrt(torch.finfo(x.dtype).eps) * (1.0 + theta_norm)
    coef = 2.0 * alpha * g_norm / step
    shifted = {n: torch.add(p, d, alpha=step / g_norm) for n, p, d in zip(names, params, g)}
    out = torch.func.functional_call(model, shifted, (x,))
    (F.cross_entropy(out, y) + coef * F.cross_entropy(out, labels)).backward()
    torch._foreach_add_([p.grad for p in params], list(g), alpha=-coef)


def fd_penalty_by_hand(base: nn.Module, data: Data, cfg: Config) -> Contender:
    """``by-hand`` in ``penalty-step-mlp``: ``cfg.penalty_steps`` SGD steps of :func:`fd_penalty_step` per call."""

    def make() -> Runner:
        model = copy.deepcopy(base)
        names, params = zip(*((n, p) for n, p in model.named_parameters() if p.requires_grad))
        opt = torch.optim.SGD(params, lr=cfg.lr)
        generator = torch.Generator().manual_seed(cfg.seed)
        state = {"step": 0}

        def run() -> None:
            for _ in range(cfg.penalty_steps):
                step = state["step"]
                opt.zero_grad(set_to_none=True)
                fd_penalty_step(model, list(names), list(params), data.batches[step % len(data.batches)],
                                data.targets[step % len(data.targets)], cfg.alpha, generator)
                opt.step()
                state["step"] = step + 1

        return run

    return Contender("by-hand", make, compare=False, per_call=cfg.penalty_steps)


class SubsetTraceByHand:
    """Tr(F) of a ``Sequential`` of Linear layers and activations on rotating windows of ``subset`` held inputs,
    with one label per input, as ``FisherTraceMonitor(subset=subset)`` measures it (the same windows and labels
    from the same generator)."""

    def __init__(self, model: nn.Sequential, held: Tensor, subset: int, generator: torch.Generator) -> None:
        self.model, self.held, self.generator = model, held, generator
        self.windows = Windows(len(held), subset)  # the monitor's windows

    def measure(self) -> tuple[float, float]:
        """The mean of the window's squared score norms and its standard error (a random subset of the held
        inputs, one label each: ``s/√m``, see ``torchfim.train.trace_stats.mean_and_variance``)."""
        h = self.held[self.windows.next(self.generator)]
        inputs, outputs = [], []
        with torch.enable_grad():
            for layer in self.model:
                if isinstance(layer, nn.Linear):
                    inputs.append(h)
                    h = layer(h)
                    outputs.append(h)
                else:
                    h = layer(h)
        scores = CATEGORICAL.sample_scores(h.detach(), 1, self.generator)[:, 0]  # one-hot(ŷ) − p
        sensitivities = torch.autograd.grad(h, outputs, scores)
        with torch.no_grad():
            norms = sum(d.square().sum(1) * (a.square().sum(1) + 1) for d, a in zip(sensitivities, inputs)).double()
        variance, mean = torch.var_mean(norms)
        return float(mean), math.sqrt(float(variance) / len(norms))


def monitor_by_hand(base: nn.Sequential, data: Data, held: Tensor, cfg: Config) -> Contender:
    """``by-hand`` in ``monitor-every10-mlp``: 10 SGD steps per call, :class:`SubsetTraceByHand` (32 inputs) on
    the first."""

    def make() -> Runner:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        monitor = SubsetTraceByHand(model, held, 32, torch.Generator().manual_seed(cfg.seed))
        state = {"step": 0}

        def run() -> None:
            for _ in range(10):
                step = state["step"]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(data.batches[step % len(data.batches)]),
                                data.targets[step % len(data.targets)]).backward()
                opt.step()
                if step % 10 == 0:
                    monitor.measure()
                state["step"] = step + 1

        return run

    return Contender("by-hand", make, compare=False, per_call=10)
