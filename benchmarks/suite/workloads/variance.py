"""Workloads of ``torchfim.fisher_variance``, each checked against an independent computation."""

from __future__ import annotations

import time

import torch
from torch import nn

import torchfim

from ..agreement import rel_error
from ..config import Config
from ..models import arch, model_for, num_params
from ..references import hessian_variance_reference, score_variance_reference
from ..workload import Contender, Runner, Workload, floor_contender

__all__ = ["build_variance_score", "build_variance_hessian"]


def build_variance_score(cfg: Config, status: dict) -> Workload:
    """``variance-score-diag-mlp``: Var(Î1) diagonal, checked against an enumeration over the labels."""
    model, data, desc = model_for(cfg, "mlp")

    def make() -> Runner:
        return lambda: torchfim.fisher_variance(model, data.batches, estimator="score", structure="diag", n_samples=1)

    def check(result) -> tuple[float, str]:
        ref = score_variance_reference(model, data)
        return rel_error(result, ref), "enumeration over the 10 labels with per-input gradients (torch.func, float64)"

    return Workload("variance-score-diag-mlp", desc, num_params(model),
                    [floor_contender(model, data), Contender("torchfim", make)], check=check,
                    notes=[("torchfim.fisher_variance(estimator='score', structure='diag', n_samples=1); no peer "
                            "computes it, so torchfim's result is checked against an independent enumeration")])


def build_variance_hessian(cfg: Config, status: dict) -> Workload:
    """``variance-hessian-diag-mlp``: Var(Î2) diagonal (MLP-S when MLP-A would exceed the budget),
    checked on 8 coordinates per parameter tensor by nested ``jvp``."""
    model, data, desc = model_for(cfg, "mlp")
    notes = []

    def timed(net: nn.Module, inputs) -> float:
        t0 = time.perf_counter()
        torchfim.fisher_variance(net, inputs, estimator="hessian", structure="diag")
        return time.perf_counter() - t0

    # Probe on a slice of the data first: a repetition on MLP-A may take far more than a minute.
    X = torch.cat(data.batches)
    timed(model, X[:2])  # warm-up
    projected = 0.0
    for m in (min(64, data.n), min(cfg.batch_size, data.n)):
        projected = timed(model, X[:m]) * data.n / m
        if projected > cfg.hessian_budget_s:
            break
    if projected > cfg.hessian_budget_s:
        model, data, desc = model_for(cfg, "mlps")
        notes.append(f"MLP-A ({arch(cfg.mlp_a)}) projected to {projected:.0f} s per repetition (> "
                     f"{cfg.hessian_budget_s:.0f} s, probed on a slice of the data), so this workload uses "
                     f"MLP-S ({arch(cfg.mlp_s)}) and its floor")
    else:
        notes.append(f"MLP-A projected to {projected:.1f} s per repetition (probe), within the "
                     f"{cfg.hessian_budget_s:.0f} s budget")

    def make() -> Runner:
        return lambda: torchfim.fisher_variance(model, data.batches, estimator="hessian", structure="diag", n_samples=1)

    gen = torch.Generator().manual_seed(cfg.seed)
    offsets, start = [], 0
    for p in model.parameters():
        k = min(8, p.numel())
        offsets.append(start + torch.randperm(p.numel(), generator=gen)[:k])
        start += p.numel()
    index = torch.cat(offsets).sort().values

    def check(result) -> tuple[float, str]:
        ref = hessian_variance_reference(model, data, index)
        return rel_error(result[index], ref), (
            f"{len(index)} coordinates (8 per parameter tensor) by nested torch.func.jvp of the batched "
            "forward, float64")

    notes.append("torchfim.fisher_variance(estimator='hessian', structure='diag', n_samples=1); no peer computes it")
    return Workload("variance-hessian-diag-mlp", desc, num_params(model),
                    [floor_contender(model, data), Contender("torchfim", make)], check=check, notes=notes)
