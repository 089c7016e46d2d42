"""The registry of workloads: every workload the benchmark can run, in the report's order.

A workload is a function ``build(cfg, status) -> Workload`` (``status``: the peers' import status
from :func:`suite.peers.peer_status`) that makes the model and data, the contenders (each a setup,
untimed, that returns the call to time) and, where no peer computes the quantity, an independent
check. Adding a workload is one builder (in the module of its kind: ``fisher``, ``variance``,
``penalty``, or a new one) and one line in :data:`WORKLOADS`; a contender that is not torchfim,
the floor or a peer also needs its name in :data:`CONTENDERS`, the order of the report's columns.
"""

from __future__ import annotations

from collections.abc import Callable

from ..config import Config
from ..workload import Workload
from .bound import build_bound_c100
from .fisher import build_diag_score, build_exact, build_floor
from .monitor import build_monitor
from .penalty import build_penalty
from .reach import build_reach
from .variance import build_variance_hessian, build_variance_score

__all__ = ["WORKLOADS", "CONTENDERS", "Builder"]

Builder = Callable[[Config, dict], Workload]

#: Workload name -> its builder, in the order of the report's tables.
WORKLOADS: dict[str, Builder] = {
    "floor": build_floor,
    "diag-score-mlp": lambda c, s: build_diag_score(c, s, "mlp"),
    "diag-score-cnn": lambda c, s: build_diag_score(c, s, "cnn"),
    "diag-exact-mlp": lambda c, s: build_exact(c, s, "diag-exact", "mlp"),
    "diag-exact-cnn": lambda c, s: build_exact(c, s, "diag-exact", "cnn"),
    "full-exact-mlps": lambda c, s: build_exact(c, s, "full-exact", "mlps"),
    "trace-exact-mlp": lambda c, s: build_exact(c, s, "trace-exact", "mlp"),
    "variance-score-diag-mlp": build_variance_score,
    "variance-hessian-diag-mlp": build_variance_hessian,
    "penalty-step-mlp": build_penalty,
    "diag-score-transformer": lambda c, s: build_reach(c, s, "score", "transformer"),
    "diag-exact-transformer": lambda c, s: build_reach(c, s, "exact", "transformer"),
    "diag-score-resnet": lambda c, s: build_reach(c, s, "score", "resnet"),
    "diag-exact-resnet": lambda c, s: build_reach(c, s, "exact", "resnet"),
    "diag-score-lm": lambda c, s: build_reach(c, s, "score", "lm"),
    "diag-score-lstm": lambda c, s: build_reach(c, s, "score", "lstm"),
    "diag-exact-lstm": lambda c, s: build_reach(c, s, "exact", "lstm"),
    "monitor-every10-mlp": build_monitor,
    "bound-score-c100": build_bound_c100,
}

#: Every contender's name, in the order of the report's columns.
CONTENDERS = ("floor", "torchfim", "backpack", "nngeometry", "curvlinops", "plain", "torchfim-every10",
              "torchfim-fd", "torchfim-fd-every10", "torchfim-fd-term", "torchfim-subset32", "torchfim-subset32-cv",
              "torchfim-diag", "arithmetic", "arithmetic-every10", "by-hand")
