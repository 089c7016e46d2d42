"""Workloads of the engine issue: transformer, ResNet (BatchNorm in eval mode), a causal LM and an LSTM.

nngeometry computes the ResNet and BackPACK the LSTM, and they join with the agreement check; no peer
computes the transformer or the LM (see :data:`LEFT_OUT`), so every result is also checked against
torchfim's whole-model ``torch.func`` backend (the reference path), computed once outside the timing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import torchfim

from ..arithmetic import EXACT_NOTE, backward_passes, exact_flop_limit
from ..config import Config
from ..labels import torchfim_labels
from ..models import num_params
from ..reach_models import ReachData, reach_model
from ..workload import Contender, Runner, Workload, peer_contenders

__all__ = ["build_reach", "LEFT_OUT"]

#: Why each peer is absent from a model's workloads.
LEFT_OUT = {
    "transformer": {
        "backpack": "BackPACK has no rules for MultiheadAttention or LayerNorm",
        "nngeometry": "nngeometry's layer collection has no MultiheadAttention or Embedding",
        "curvlinops": "curvlinops has no exact diagonal; P products of its dense GGN (0.5 M) are out of reach",
    },
    "resnet": {
        "backpack": "BackPACK's extend() refuses the ResNet module (its residual sum and mean pooling are "
                    "not BackPACK modules; converting them with torch.fx was not attempted)",
        "curvlinops": "curvlinops has no exact diagonal; P products of its dense GGN are out of reach",
    },
}
LEFT_OUT["lm"] = dict(LEFT_OUT["transformer"])
LEFT_OUT["lstm"] = {
    "nngeometry": "nngeometry's layer collection has no LSTM",
    "curvlinops": "curvlinops has no exact diagonal; P products of its dense GGN are out of reach",
}


def _for_backpack(model: nn.Module) -> nn.Module:
    """The LSTM classifier with BackPACK's modules for reading the LSTM's output and slicing its last step
    (BackPACK's ``extend`` knows only its own modules), sharing the parameters."""
    from backpack.custom_module.reduce_tuple import ReduceTuple
    from backpack.custom_module.slicing import Slicing

    return nn.Sequential(model[0], model[1], ReduceTuple(index=0), Slicing((slice(None), -1)), model[4]).eval()


def _floor(model: nn.Module, data: ReachData) -> Contender:
    """One forward + backward of the summed NLL of the true targets (per token for the LM)."""

    def make() -> Runner:
        params = [p for p in model.parameters() if p.requires_grad]

        def run() -> None:
            for x, y in zip(data.batches, data.targets):
                out = model(x)
                loss = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="sum") if data.tokens_out \
                    else F.cross_entropy(out, y, reduction="sum")
                loss.backward()
            for p in params:
                p.grad = None

        return run

    return Contender("floor", make, compare=False)


def build_reach(cfg: Config, status: dict, kind: str, which: str) -> Workload:
    """``diag-<kind>-<which>``: the exact (``kind="exact"``) or score (one label per input, per token
    for the LM) diagonal of the model ``which``."""
    model, data, desc = reach_model(cfg, which)
    estimator = "exact" if kind == "exact" else "score"
    kw = dict(estimator=estimator, structure="diag", n_samples=1)

    def call(backend: str) -> torch.Tensor:
        return torchfim.fisher(model, data.batches, backend=backend,
                               generator=torch.Generator().manual_seed(cfg.seed + 3), **kw)

    def make() -> Runner:
        return lambda: call("modules")

    others, left_out = [], dict(LEFT_OUT[which])
    if which in ("resnet", "lstm"):
        labels = data.targets
        if estimator == "score":
            labels, _, _ = torchfim_labels(model, data, cfg.seed + 3, cfg.tol)
        peer_model = _for_backpack(model) if which == "lstm" and status["backpack"]["available"] else model
        found, missing = peer_contenders(f"diag-{kind}", peer_model, data, labels, status)
        others = [c for c in found if c.name not in left_out]
        left_out.update({k: v for k, v in missing.items() if k not in left_out})

    def check(result) -> tuple[float, str]:
        reference = call("functional")
        error = float((result - reference).norm() / max(float(reference.norm()), 1e-30))
        return error, "torchfim's whole-model torch.func backend on the same labels"

    notes = [(f"torchfim.fisher(estimator={estimator!r}, structure='diag', n_samples=1), per-module backend; "
              "checked against backend='functional' on the same labels")]
    reference = []
    if estimator == "exact":
        reference = [backward_passes(model, data)]
        notes += [EXACT_NOTE, exact_flop_limit(model, data)]
    return Workload(f"diag-{kind}-{which}", desc, num_params(model),
                    [_floor(model, data), Contender("torchfim", make), *reference, *others], check=check,
                    notes=notes, left_out=left_out)
