"""Workloads of ``torchfim.fisher``: the floor, the score diagonal, the exact diagonal, full and trace."""

from __future__ import annotations

import torch
from torch import nn

import torchfim

from ..arithmetic import EXACT_NOTE, backward_passes, exact_flop_limit
from ..config import Config
from ..labels import torchfim_labels
from ..models import Data, arch, load_data, make_mlp, model_for, num_params
from ..workload import Contender, Runner, Workload, floor_contender, peer_contenders

__all__ = ["build_floor", "build_diag_score", "build_exact"]


def build_floor(cfg: Config, status: dict) -> Workload:
    """``floor``: one training pass over MLP-A, the reference of the ratios."""
    model, data = make_mlp(cfg.mlp_a, cfg.seed), load_data(cfg)
    return Workload("floor", f"MLP {arch(cfg.mlp_a)}", num_params(model), [floor_contender(model, data)],
                    notes=[("one forward + backward of the summed NLL (true labels) over all mini-batches "
                            "of MLP-A; every other workload carries the floor of its own model")])


def build_diag_score(cfg: Config, status: dict, which: str) -> Workload:
    """``diag-score-<which>``: the score estimator's diagonal, one label per input, the peers on its labels."""
    model, data, desc = model_for(cfg, which)
    seed = cfg.seed + 1
    labels, note, reference = torchfim_labels(model, data, seed, cfg.tol)

    def make_torchfim() -> Runner:
        return lambda: torchfim.fisher(model, data.batches, estimator="score", structure="diag", n_samples=1,
                                       generator=torch.Generator().manual_seed(seed))

    others, left_out = peer_contenders("diag-score", model, data, labels, status)
    notes = [note,
             ("BackPACK: SumGradSquared of CrossEntropyLoss(reduction='sum') at those labels, divided by n; "
              "nngeometry: PMatDiag of the one-output function log p(ŷ|x) at those labels (what its "
              "FIM_MonteCarlo(trials=1) builds, which draws its own labels)")]
    return Workload(f"diag-score-{which}", desc, num_params(model),
                    [floor_contender(model, data), Contender("torchfim", make_torchfim), *others],
                    notes=notes, left_out=left_out, reference_value=reference)


def _torchfim_contender(model: nn.Module, data: Data, **kw) -> Contender:
    """``torchfim.fisher(model, batches, **kw)`` as the timed call."""
    return Contender("torchfim", lambda: (lambda: torchfim.fisher(model, data.batches, **kw)))


def build_exact(cfg: Config, status: dict, kind: str, which: str) -> Workload:
    """``<kind>-<which>``: the exact Fisher's diagonal, full matrix or trace (``kind``: diag-exact, ...)."""
    model, data, desc = model_for(cfg, which)
    structure = kind.split("-")[0]
    others, left_out = peer_contenders(kind, model, data, data.targets, status)
    notes, reference = [], []
    if kind == "full-exact":
        notes.append("curvlinops: GGNLinearOperator(check_deterministic=False, num_data=n) @ eye(P), the "
                     "operator built inside the timed call; BackPACK: SqrtGGNExact factors S, Σ SᵀS / n; "
                     "nngeometry: FIM(variant='classif_logits') in PMatDense")
    elif kind == "diag-exact":
        notes.append("BackPACK: DiagGGNExact; nngeometry: FIM(variant='classif_logits') in PMatDiag")
        if which == "cnn":  # a dense layer needs no per-sample product, so the MLP's has no such reference
            notes += [EXACT_NOTE, exact_flop_limit(model, data)]
            reference.append(backward_passes(model, data))
    else:
        notes.append("BackPACK: sum of DiagGGNExact; nngeometry: FIM(variant='classif_logits') in "
                     "PMatDiag, .trace()")
    suffix = {"mlp": "mlp", "cnn": "cnn", "mlps": "mlps"}[which]
    return Workload(f"{kind}-{suffix}", desc, num_params(model),
                    [floor_contender(model, data),
                     _torchfim_contender(model, data, estimator="exact", structure=structure),
                     *reference,
                     *others],
                    notes=notes, left_out=left_out)
