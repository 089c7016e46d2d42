"""``bound-score-c100``: the score variance bound on a 100-class head, against the exact diagonal.

Issue 11, item 11: the bound once built a B×C⁴ moment tensor. The bound's constant now comes from a
C×C problem per input, so its time stays within a small multiple of ``fisher(structure="diag")``.
"""

from __future__ import annotations

import torch
from torch import nn

import torchfim

from ..config import Config
from ..models import num_params
from ..workload import Contender, Runner, Workload

__all__ = ["build_bound_c100"]


def build_bound_c100(cfg: Config, status: dict) -> Workload:
    """MLP 64-256-100 tanh on 256 digits (one mini-batch); ratio to the exact diagonal of the same data."""
    from torchfim.datasets import load_digits

    classes, n = (100, 256) if not cfg.quick else (20, 32)
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, classes))
    x = load_digits(torch.float32)[0][:n]

    def diag() -> Runner:
        return lambda: torchfim.fisher(model, x, structure="diag")

    def bound() -> Runner:
        return lambda: torchfim.variance_bound(model, x, estimator="score", structure="diag")

    def check(result) -> tuple[float, str]:
        exact = torchfim.fisher_variance(model, x, estimator="score", structure="diag")
        shortfall = float((exact - result).clamp_min(0).norm() / max(float(exact.norm()), 1e-30))
        return shortfall, "the bound is at least the exact variance (relative shortfall)"

    return Workload("bound-score-c100", f"MLP 64-256-{classes} tanh, {n} inputs", num_params(model),
                    [Contender("torchfim-diag", diag, compare=False), Contender("torchfim", bound)],
                    ratio_to="torchfim-diag", check=check,
                    notes=[("torchfim.variance_bound(estimator='score', structure='diag') against "
                            "torchfim.fisher(structure='diag') on the same inputs")])
