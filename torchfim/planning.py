"""Choosing an estimator and a number of labels from the closed-form variances."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from ._batches import Inputs
from ._processes import announced, says_shared
from .engine import ModelView
from .engine.view import Mask
from .errors import TorchfimError, check_choice, check_n_samples, real_number, warn_user
from .families import Family
from .keyword_hints import explains_keywords
from .layout import Layout
from .one_pass import summed_parts
from .process_rows import FAILED_BEFORE
from .variance import VARIANCE_ESTIMATORS


@announced(FAILED_BEFORE)
@explains_keywords
def samples_needed(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    estimator: str = "score",
    structure: str = "trace",
    rel_error: float = 0.1,
    *,
    backend: str = "auto",
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
    across_processes: bool = False,
    progress: bool = False,
) -> int:
    """Labels per input ``k`` so that the estimate's standard error is at most ``rel_error`` × its value
    (a fraction: 0.1 for 10%; a value above 1 is warned of as a likely percentage).

    A one-σ target: about two estimates in three fall within ``rel_error`` of the value (for a normal estimate).

    The variance with ``k`` labels is ``V₁/k`` (``V₁`` = :func:`fisher_variance`
    with one label), so ``k = ⌈V₁ / (ε·I)²⌉`` for ``structure="trace"`` (``I`` =
    Tr of the exact Fisher) and the largest such ``k`` over the diagonal entries whose exact Fisher is
    non-zero for ``structure="diag"`` (the worst entry; an entry with Fisher 0 whose estimate still varies
    has no relative error to reach, and a warning names how many there are). At least 1. Where the worst entry needs
    at least ten times the labels of the median entry (a small Fisher entry with a large variance), a warning names
    it (parameter and index), its ``k``, the median entry's and the 90th percentile's, so that a target on the entries
    that matter can be chosen.
    ``estimator="combined"`` takes ``V₁`` from :func:`torchfim.combined.combined_variance` (its weights
    do not depend on ``k``, so its variance too is ``V₁/k``; one process). ``family`` (output family name or
    :class:`~torchfim.families.Family`), ``backend``, ``mask``, ``output``, ``class_dim``, ``across_processes`` (every process gets the ``k`` of all the inputs) and ``progress`` (a bar
    over the mini-batches, and the sweeps' bars) as in :func:`torchfim.fisher`. ``V₁`` and ``I`` are both sums of
    per-input terms, added in one pass over ``inputs``: a loader or generator is read once and no mini-batch is held.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> k = torchfim.samples_needed(model, torch.randn(64, 4), rel_error=0.1)
        >>> k >= 1
        True
    """
    check_choice("estimator", estimator, (*VARIANCE_ESTIMATORS, "combined"))
    check_choice("structure", structure, ("trace", "diag"))
    if estimator == "combined" and across_processes:
        raise TorchfimError("samples_needed(estimator='combined') runs in one process (combined_variance has no "
                            "across_processes); call it on one process, or ask for 'score' or 'hessian'")
    rel = real_number(rel_error)
    if rel is None or not (0 < rel and math.isfinite(rel)):
        raise TorchfimError(f"rel_error must be a positive number such as 0.1 (10%), got {rel_error!r}")
    if rel > 1 and says_shared(across_processes):  # likely a percentage: rel_error=10 asks for 1000% of the value
        warn_user(f"torchfim: samples_needed(rel_error={rel_error!r}) asks for a standard error of {100 * rel:g}% of the "
                  f"value; rel_error is a fraction of it: for {rel:g}%, pass rel_error={rel / 100:g}")
    rel_error = rel
    # The variance and the exact Fisher, both sums of per-input terms, in one pass: a loader is read once and none of
    # its mini-batches is held. In each mini-batch the variance comes first: where an input's Jacobian would not fit
    # it refuses at once, before the exact Fisher's one pull-back per output number (hours for a language model's
    # vocabulary).
    parts, _ = summed_parts(model, inputs, family, structure, (estimator, "exact"), 1, what="samples_needed",
                            backend=backend, mask=mask, output=output, class_dim=class_dim,
                            across_processes=across_processes, progress=progress)
    var1, value = parts[estimator], parts["exact"]
    value, var1 = value.reshape(-1).double(), var1.reshape(-1).double()
    informative = value.abs() > 1e-12 * value.abs().max().clamp_min(1e-300)
    if not bool(informative.any()):
        raise TorchfimError(
            "the exact Fisher is zero here, so a relative error is undefined: no position is observed (a mask, or "
            "labels of -100, leaves out every one: pass inputs with observed positions), or the outputs are "
            "saturated (every probability 0 or 1, where the Fisher is 0: check the model's outputs)")
    said = says_shared(across_processes)  # the same k, and the same reasons, on every process of a shared call
    if said:
        _name_uninformative(var1[~informative], estimator, var1[informative].max())
    where = informative.nonzero().reshape(-1)
    var1, value = var1[informative].clamp_min(0), value[informative]
    labels = float((var1 / (rel_error * value) ** 2).max())
    if structure == "diag" and math.isfinite(labels) and said:
        _name_worst_entry(var1 / (rel_error * value) ** 2, rel_error, where, model, estimator)
    if not math.isfinite(labels):  # (ε·I)² underflowed (tiny ε): the same ratio as ((σ₁/|I|)/ε)²
        labels = float(((var1.sqrt() / value.abs()).max() / rel_error) ** 2)
    if not math.isfinite(labels):
        raise TorchfimError(
            f"rel_error={rel_error!r} would need more than 1e308 labels per input (the relative standard "
            f"error with one label is {float((var1.sqrt() / value.abs()).max()):.3g}); ask for a larger rel_error"
        )
    return max(1, math.ceil(labels * (1 - 1e-12)))


def _name_uninformative(var1: Tensor, estimator: str, scale: Tensor) -> None:
    """Warn where entries left out (exact Fisher 0) still vary: no number of labels reaches a relative error there,
    and the ``k`` returned does not cover them; their absolute error is ``σ₁/√k``. A variance below ``1e-12`` of the
    other entries' largest, ``scale``, is round-off (3.5e-33 was named as varying, a trial)."""
    varying = var1 > 1e-12 * scale
    if bool(varying.any()):
        warn_user(
            f"torchfim: {int(varying.sum())} diagonal entr{'y has' if int(varying.sum()) == 1 else 'ies have'} an exact "
            f"Fisher of 0 (below 1e-12 of the largest entry) but a {estimator} estimate that varies (largest standard deviation with one label "
            f"{float(var1.max().sqrt()):.3g}): no number of labels reaches a relative error there, so the k "
            "returned covers the other entries only; with k labels their absolute error is that deviation over √k"
        )


def _name_worst_entry(labels: Tensor, rel_error: float, where: Tensor, model: nn.Module, estimator: str) -> None:
    """Warn where the diagonal's ``k`` (the largest of the entries' ``labels`` for ``rel_error``, at flat indices
    ``where`` of the trainable parameters) is at least ten times the median entry's: name that entry, its relative
    standard error with one label, and the median's and the 90th percentile's ``k``."""
    worst = int(labels.argmax())
    needed = [_whole_labels(labels.max()), _whole_labels(labels.median())]
    if needed[0] < 10 * needed[1]:
        return
    # kthvalue, not quantile: torch's quantile refuses more than 2**24 entries
    needed.append(_whole_labels(labels.kthvalue(max(1, math.ceil(0.9 * len(labels)))).values))
    name, index = Layout.of([(n, p) for n, p in model.named_parameters() if p.requires_grad]).locate(int(where[worst]))
    warn_user(
        f"torchfim: samples_needed(estimator={estimator!r}, structure='diag') = {needed[0]} is set by entry {index} of "
        f"{name!r}, whose relative standard error with one label is {math.sqrt(float(labels[worst])) * rel_error:.3g} "
        f"(a small Fisher entry, or a large variance); the median entry needs {needed[1]} labels per input and 90% of "
        f"the entries {needed[2]}: a target on the entries you use, or on the trace (structure='trace'), may need far "
        "fewer"
    )


def _whole_labels(ratio: Tensor) -> int:
    """Labels per input for the ratio ``V₁/(ε·I)²``, rounded up as :func:`samples_needed` rounds it (at least 1)."""
    return max(1, math.ceil(float(ratio) * (1 - 1e-12)))


@dataclass(frozen=True)
class EstimatorRow:
    """One parameter tensor: summed diagonal variances of Î1 and Î2 with ``n_samples`` labels (Î2's NaN where
    the model has no forward-mode derivative for it: :attr:`EstimatorComparison.hessian_unavailable`)."""

    name: str
    size: int
    fisher_diag_sum: float
    score_variance: float
    hessian_variance: float

    @property
    def better(self) -> str:
        """``"hessian"`` or ``"score"``: the estimator with the smaller variance (ties go to hessian; a NaN
        variance of Î2, which cannot be computed, to score)."""
        return "hessian" if self.hessian_variance <= self.score_variance else "score"


@dataclass(frozen=True)
class EstimatorComparison:
    """Per-parameter comparison of Î1 (``score``) and Î2 (``hessian``) for one model and data set.

    Each row is one parameter tensor's entries ``p``: ``fisher_diag_sum = Σ_p F_pp``, ``score_variance =
    Σ_p Var(Î1)_pp`` and ``hessian_variance = Σ_p Var(Î2)_pp`` with ``n_samples`` labels per input (the diagonal
    of :func:`torchfim.fisher_variance` summed: means over the inputs, conditional on them), and ``better`` the
    estimator of the smaller sum.

    Example:
        >>> import torch, torchfim
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> x = torch.randn(32, 4, dtype=torch.float64)
        >>> comparison = torchfim.compare_estimators(model, x)
        >>> first = comparison.rows[0]
        >>> first.name, abs(first.score_variance - float(torchfim.fisher_variance(model, x)[:32].sum())) < 1e-15
        ('0.weight', True)
        >>> [(row.name, row.hessian_variance, row.better) for row in comparison.rows[2:]]  # Î2 exact in the last layer
        [('2.weight', 0.0, 'hessian'), ('2.bias', 0.0, 'hessian')]
    """

    rows: tuple[EstimatorRow, ...]
    n_samples: int
    hessian_unavailable: str | None = None  # why Î2's variances could not be computed, where they could not

    def __str__(self) -> str:
        width = max([24, *(len(r.name) for r in self.rows)])  # long names (parametrizations) keep the columns
        head = f"{'parameter':<{width}} {'size':>7} {'Σ diag F':>11} {'Σ Var Î1':>11} {'Σ Var Î2':>11}  better"
        lines = [head, "-" * len(head)]
        for r in self.rows:
            lines.append(
                f"{r.name:<{width}} {r.size:>7} {r.fisher_diag_sum:>11.4g} {r.score_variance:>11.4g} "
                f"{r.hessian_variance:>11.4g}  {r.better}"
            )
        if self.hessian_unavailable is not None:
            lines.append(f"Î2 unavailable: {self.hessian_unavailable}")
        return "\n".join(lines)


@announced(FAILED_BEFORE)
@explains_keywords
def compare_estimators(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    n_samples: int = 1,
    *,
    backend: str = "auto",
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
    across_processes: bool = False,
    progress: bool = False,
) -> EstimatorComparison:
    """For every parameter tensor, which of Î1 and Î2 estimates its diagonal Fisher with less variance.

    By variance alone: Î2's entries can be negative (one label's Hessian is not positive semi-definite), so
    where the weights must be non-negative (EWC, merging, pruning saliencies) Î1 or the exact diagonal is the
    choice whatever the comparison says.

    Compares ``Σ_p Var(Î)_pp`` over the parameter's entries (the expected squared
    error of its diagonal) from :func:`fisher_variance`. ``n_samples`` is the labels per input ``k`` of both
    estimators: the rows give their variances for that ``k``, and since both scale as ``1/k`` the choice does not
    depend on it. ``family`` (output family name or :class:`~torchfim.families.Family`), ``backend``, ``mask``,
    ``output``, ``class_dim``, ``across_processes`` (every process gets the comparison over all the inputs) and ``progress``
    (a bar over the mini-batches, and the Hessian estimator's sweep) as in :func:`torchfim.fisher`. The two variances
    and the diagonal are sums of per-input terms, added in one pass over ``inputs``: a loader or generator is read
    once and no mini-batch is held.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> cmp = torchfim.compare_estimators(model, torch.randn(32, 4))
        >>> [r.better for r in cmp.rows]  # ReLU: Î2 is exact on every diagonal entry
        ['hessian', 'hessian', 'hessian', 'hessian']
    """
    if not isinstance(model, nn.Module):
        raise TorchfimError(
            f"model must be a torch.nn.Module, got {type(model).__name__}; wrap a function in an nn.Module "
            "whose parameters are the ones to compare"
        )
    # Î1's variance, the exact diagonal and Î2's variance, each a sum of per-input terms, in one pass: a loader is
    # read once and none of its mini-batches is held. Where the model has no forward-mode derivative for Î2, the
    # comparison still stands: Î1 is the estimator there is.
    parts, unavailable = summed_parts(model, inputs, family, "diag", ("score", "exact", "hessian"),
                                      check_n_samples(n_samples), what="compare_estimators", optional=("hessian",),
                                      backend=backend, mask=mask, output=output, class_dim=class_dim,
                                      across_processes=across_processes, progress=progress)
    score, diag, hess = parts["score"], parts["exact"], parts["hessian"]
    layout = ModelView(model, output, class_dim).layout  # the engine's names: a wrapper's prefix dropped
    rows, start = [], 0
    for name, size in zip(layout.names, layout.sizes):
        part = slice(start, start + size)
        rows.append(
            EstimatorRow(  # summed in float64: a half-precision sum over a large layer overflows
                name, size, float(diag[part].double().sum()), float(score[part].double().sum()),
                float(hess[part].double().sum()),
            )
        )
        start += size
    return EstimatorComparison(tuple(rows), n_samples, unavailable)
