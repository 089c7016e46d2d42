"""Which output-space vectors each estimator back-propagates (docs/math.md §2).

For a batch with flat outputs ``o`` and output family ``fam`` (``Λ``, scores ``u``):

* ``exact``: the columns of ``S`` with ``S Sᵀ = Λ`` (``Σ_r (Jᵀs_r)(Jᵀs_r)ᵀ = JᵀΛJ``), scale 1;
* ``score`` (Î1): ``k`` sampled scores ``u_ij``, scale ``1/k``;
* ``hessian`` (Î2): the columns of ``S``, plus the term ``−(1/k) ∇²_θ Σᵢ (Σⱼ u_ij)ᵀ o(xᵢ)``;
* ``empirical``: the score of the true target, scale 1.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .engine import Backend, Recording
from .engine.backend import second_order_support
from .errors import TorchfimError
from .families import Family
from .structures import Structure

ESTIMATORS = ("exact", "score", "hessian", "empirical")


def add_estimate(
    estimator: str,
    backend: Backend,
    rec: Recording,
    fam: Family,
    structure: Structure,
    k: int,
    generator: torch.Generator | None,
) -> None:
    """Add one mini-batch's sum over inputs of ``estimator`` to ``structure``."""
    o = rec.values
    if estimator in ("exact", "hessian"):
        vectors, scale = fam.fisher_output_sqrt(o).transpose(-1, -2), 1.0
    elif estimator == "score":
        vectors, scale = fam.output_score(fam.sample(o, k, generator), o), 1.0 / k
    else:
        vectors, scale = _true_scores(fam, rec, o), 1.0
    backend.add_products(rec, vectors.to(o.dtype), structure, scale)
    if estimator == "hessian":
        # Σⱼ Σ_a u_ij,a ∇²o_a(xᵢ) = ∇²_θ (Σⱼ u_ij)ᵀ o(xᵢ) with the scores held fixed.
        weights = fam.output_score(fam.sample(o, k, generator), o).sum(1)
        with second_order_support():
            backend.add_hessian_term(rec.batch, weights.to(o.dtype), structure, -1.0 / k)


def _true_scores(fam: Family, rec: Recording, o: Tensor) -> Tensor:
    y = rec.batch.targets
    if y is None:
        raise TorchfimError(
            "estimator='empirical' uses the true labels but a mini-batch came without targets; "
            "pass targets=... or yield (inputs, targets) pairs"
        )
    if not isinstance(y, Tensor):
        y = torch.as_tensor(y)
    return fam.output_score(fam.check_targets(y.to(o.device), o), o).unsqueeze(1)
