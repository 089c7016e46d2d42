"""The labels torchfim's score estimator draws, recovered so that the peers can use the same ones."""

from __future__ import annotations

import torch
from torch import Tensor, nn

import torchfim
import torchfim.families

from .agreement import rel_error
from .models import Data

__all__ = ["torchfim_labels"]


def torchfim_labels(model: nn.Module, data: Data, seed: int, tol: float) -> tuple[list[Tensor], str, Tensor | None]:
    """The labels torchfim's ``score`` estimator draws with ``Generator().manual_seed(seed)``.

    Tried in turn, each verified by recomputing torchfim's ``empirical`` estimator (the same
    outer product with the labels fixed) and comparing it with the ``score`` result:

    1. recorded: the labels returned by ``Family.sample`` during a run with a recording
       subclass of the categorical family (valid when that run gives the score result);
    2. replicated: ``Categorical().sample(o, 1, generator)`` per mini-batch in order, on outputs
       from a plain forward.

    Returns the labels, a note, and (when neither matches) torchfim's ``empirical`` result on
    the replicated labels to compare peers against instead of the ``score`` result.
    """

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    score = torchfim.fisher(model, data.batches, estimator="score", structure="diag", n_samples=1,
                            generator=generator())
    sizes = [x.shape[0] for x in data.batches]
    candidates: list[tuple[str, list[Tensor]]] = []

    recorded: list[Tensor] = []

    class Recording(torchfim.families.Categorical):
        def sample(self, o, k, generator=None):
            y = super().sample(o, k, generator)
            recorded.append(y.detach().reshape(-1).clone())
            return y

    try:
        again = torchfim.fisher(model, data.batches, family=Recording(), estimator="score", structure="diag",
                                n_samples=1, generator=generator())
        if recorded and sum(r.numel() for r in recorded) == data.n and rel_error(again, score) < tol:
            candidates.append(("recorded", list(torch.cat(recorded).split(sizes))))
    except Exception:  # noqa: BLE001, S110 - a family subclass may be refused by a fast path; try the next
        pass

    replicated, g = [], generator()
    with torch.no_grad():
        for x in data.batches:
            replicated.append(torchfim.families.Categorical().sample(model(x), 1, g).reshape(-1))
    candidates.append(("replicated", replicated))

    last = None
    for how, labels in candidates:
        empirical = torchfim.fisher(model, data.batches, estimator="empirical", structure="diag", targets=labels)
        err = rel_error(empirical, score)
        last = empirical
        if err < tol:
            return labels, (
                f"labels aligned ({how}): the peers get the labels torchfim draws with seed {seed}, one "
                f"per input; torchfim's estimator='empirical' on them reproduces its 'score' result "
                f"(rel. error {err:.1e})"
            ), None
    return replicated, (
        "labels NOT aligned: torchfim's score path draws labels in a way the harness could not "
        "reproduce, so the peers were compared with torchfim's estimator='empirical' on the "
        "replicated labels (the same formula with the labels fixed); the timed 'score' result "
        "itself was not compared"
    ), last
