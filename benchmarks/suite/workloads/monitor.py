"""The monitoring workload: SGD training with ``torchfim.train.FisherTraceMonitor(every=10)`` against plain training."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

import torchfim
import torchfim.families

from ..by_hand import MONITOR_BY_HAND_NOTE, monitor_by_hand
from ..config import Config
from ..models import model_for, num_params
from ..workload import Contender, Runner, Workload

__all__ = ["MONITOR_CONTENDERS", "build_monitor"]

#: Contender name -> keyword arguments of ``FisherTraceMonitor`` (None: plain training, the reference).
MONITOR_CONTENDERS: dict[str, dict | None] = {
    "plain": None,
    "torchfim": {},  # all held inputs
    "torchfim-subset32": {"subset": 32},
    "torchfim-subset32-cv": {"subset": 32, "control_variate": True},
}


def _training_contender(name: str, monitor: dict | None, base, data, held, cfg: Config) -> Contender:
    """10 consecutive SGD steps per timed call, so each call holds exactly one measurement."""
    steps = 10

    def make() -> Runner:
        model = copy.deepcopy(base)
        opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
        mon = None if monitor is None else torchfim.train.FisherTraceMonitor(
            model, held, family="categorical", every=10, generator=torch.Generator().manual_seed(cfg.seed), **monitor)
        state = {"step": 0}

        def run() -> None:
            for _ in range(steps):
                step = state["step"]
                x = data.batches[step % len(data.batches)]
                y = data.targets[step % len(data.targets)]
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
                if mon is not None:
                    mon.step(step)
                state["step"] = step + 1

        return run

    return Contender(name, make, compare=False, per_call=steps)


def build_monitor(cfg: Config, status: dict) -> Workload:
    """``monitor-every10-mlp``: seconds per SGD step with a Tr(F) monitor measuring every 10 steps."""
    import torchfim.train  # raises ImportError when the training side is not there yet

    base, data, desc = model_for(cfg, "mlp")
    held = torch.cat(data.batches)  # the monitor holds the whole data set; subset= measures a window of it

    def check(_result) -> tuple[float, str]:
        # One subset measurement against per-sample gradients by autograd on the same window and labels
        # (the permutation and the labels replayed from an identically seeded generator).
        model = copy.deepcopy(base)
        mon = torchfim.train.FisherTraceMonitor(model, held, subset=32, generator=torch.Generator().manual_seed(cfg.seed))
        rec = mon.measure(0)
        replay = torch.Generator().manual_seed(cfg.seed)
        rows = torch.randperm(len(held), generator=replay)[:32]
        x = held[rows]
        with torch.no_grad():
            y = torchfim.families.Categorical().sample(model(x), 1, replay).reshape(-1)
        params = [p for p in model.parameters() if p.requires_grad]
        norms = []
        for i in range(len(x)):
            grads = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), params)
            norms.append(sum(float((g.double() ** 2).sum()) for g in grads))
        ref = sum(norms) / len(norms)
        return abs(rec.trace - ref) / ref, ("one subset=32 measurement against the mean of ‖∇θ log p(ŷ|x)‖² by "
                                            "autograd, one input at a time, on the same window and labels")

    return Workload("monitor-every10-mlp", desc, num_params(base),
                    [*(_training_contender(name, kw, base, data, held, cfg) for name, kw in MONITOR_CONTENDERS.items()),
                     monitor_by_hand(base, data, held, cfg)],
                    ratio_to="plain", check=check,
                    notes=[(f"SGD training (lr {cfg.lr}, mini-batches of {cfg.batch_size}) with FisherTraceMonitor("
                            f"every=10) holding all {len(held)} inputs; seconds per step as the mean over 10 consecutive "
                            "steps (one measurement each); torchfim: every held input, torchfim-subset32: subset=32 "
                            "(a rotating window), -cv: with control_variate=True; ratios are to 'plain'"), MONITOR_BY_HAND_NOTE])
