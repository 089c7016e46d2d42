"""The training-step workload: one SGD step with ``torchfim.train.FisherPenalty`` against a plain step."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import torchfim
import torchfim.families

from ..agreement import rel_error
from ..arithmetic import PENALTY_NOTE, PenaltyPasses
from ..by_hand import BY_HAND_NOTE, fd_penalty_by_hand
from ..config import Config
from ..models import model_for, num_params
from ..workload import Contender, Runner, Workload

__all__ = ["PENALTY_CONTENDERS", "build_penalty"]


#: The contenders of the penalty step: name -> keyword arguments of ``torchfim.train.FisherPenalty``
#: (None: a plain SGD step, the reference of the ratios). A new variant of the step is one entry
#: here (and its name in :data:`~suite.workloads.CONTENDERS`, which orders the report's columns).
PENALTY_CONTENDERS: dict[str, dict | None] = {
    "plain": None,
    "torchfim": {"every": 1},
    "torchfim-every10": {"every": 10},
    "torchfim-fd": {"every": 1, "grad_method": "finite_difference"},
    "torchfim-fd-every10": {"every": 10, "grad_method": "finite_difference"},
    "torchfim-fd-term": {"every": 1, "grad_method": "finite_difference"},
}

#: Contenders whose step is ``pen.penalised_loss(x, task_loss, step=step)`` (one shared forward pass);
#: the others add the separate term, ``task_loss(model(x)) + pen(x, step=step)``.
SHARED_FORWARD = frozenset({"torchfim-fd", "torchfim-fd-every10"})


def _step_contender(name: str, penalty: dict | None, base, data, cfg: Config) -> Contender:
    """``cfg.penalty_steps`` consecutive SGD steps (cycling through the mini-batches) per timed call."""
    steps = cfg.penalty_steps
    shared = name in SHARED_FORWARD

    def make() -> Runner:
        model = copy.deepcopy(base)
        pen = None if penalty is None else torchfim.train.FisherPenalty(
            model, family="categorical", alpha=cfg.alpha,
            generator=torch.Generator().manual_seed(cfg.seed), **penalty)
        return sgd_steps(model, pen, data, cfg, shared)

    return Contender(name, make, compare=False, per_call=steps)


def _passes_contender(every: int, base, data, cfg: Config) -> Contender:
    """``arithmetic`` (every=1) or ``arithmetic-every<every>``: the same SGD steps with the
    finite-difference penalty's passes alone (:class:`~suite.arithmetic.PenaltyPasses`)."""

    def make() -> Runner:
        model = copy.deepcopy(base)
        return sgd_steps(model, PenaltyPasses(model, every), data, cfg, shared=True)

    name = "arithmetic" if every == 1 else f"arithmetic-every{every}"
    return Contender(name, make, compare=False, per_call=cfg.penalty_steps)


def sgd_steps(model: torch.nn.Module, pen, data, cfg: Config, shared: bool = False) -> Runner:
    """``cfg.penalty_steps`` SGD steps on ``model`` (cycling through the mini-batches) per call, with the
    penalty ``pen`` added (``loss + pen(x, step)``, or ``pen.penalised_loss`` when ``shared``; none if None)."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    state = {"step": 0}

    def run() -> None:
        for _ in range(cfg.penalty_steps):
            step = state["step"]
            x = data.batches[step % len(data.batches)]
            y = data.targets[step % len(data.targets)]
            opt.zero_grad(set_to_none=True)
            if shared:
                loss = pen.penalised_loss(x, lambda out, y=y: F.cross_entropy(out, y), step=step)
            else:
                loss = F.cross_entropy(model(x), y)
                if pen is not None:
                    loss = loss + pen(x, step=step)
            loss.backward()
            opt.step()
            state["step"] = step + 1

    return run


def build_penalty(cfg: Config, status: dict) -> Workload:
    """``penalty-step-mlp``: seconds per SGD step with each of :data:`PENALTY_CONTENDERS`."""
    import torchfim.train  # raises ImportError when the training side is not there yet

    base, data, desc = model_for(cfg, "mlp")

    def check(_result) -> tuple[float, str]:
        model = copy.deepcopy(base)
        x = data.batches[0]
        pen = torchfim.train.FisherPenalty(model, family="categorical", alpha=cfg.alpha, every=1,
                                           generator=torch.Generator().manual_seed(cfg.seed))
        value = pen(x, step=0)
        params = [p for p in model.parameters() if p.requires_grad]
        o = model(x)
        labels = torchfim.families.Categorical().sample(o, 1, torch.Generator().manual_seed(cfg.seed)).reshape(-1)
        grads = torch.autograd.grad(F.cross_entropy(o, labels), params)
        ref = cfg.alpha * sum((g * g).sum() for g in grads)
        return rel_error(value, ref), ("value at step 0 against α‖∇θ mean NLL(ŷ)‖² by autograd, with the "
                                       "labels drawn from the same seeded generator")

    return Workload("penalty-step-mlp", desc, num_params(base),
                    [*(_step_contender(name, kw, base, data, cfg) for name, kw in PENALTY_CONTENDERS.items()),
                     *(_passes_contender(every, base, data, cfg) for every in (1, 10)),
                     fd_penalty_by_hand(base, data, cfg)],
                    ratio_to="plain", check=check,
                    notes=[(f"one SGD step (lr {cfg.lr}) on a mini-batch of {cfg.batch_size}, seconds per step as the "
                            f"mean over {cfg.penalty_steps} consecutive steps (cycling through the mini-batches); "
                            f"torchfim: FisherPenalty(alpha={cfg.alpha}, every=1) as "
                            "cross_entropy(model(x), y) + pen(x), "
                            "torchfim-every10: every=10 (one computed step and nine reusing its gradient per 10 "
                            "steps); torchfim-fd and torchfim-fd-every10: grad_method='finite_difference' through "
                            "pen.penalised_loss(x, task_loss) (the task loss and the penalty share the forward at "
                            "θ + εĝ: two forwards and two backwards per computed step), torchfim-fd-term: the same "
                            "penalty as a separate term, cross_entropy(model(x), y) + pen(x); ratios are to 'plain'"),
                           PENALTY_NOTE, BY_HAND_NOTE])
