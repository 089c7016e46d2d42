"""Which output-space vectors each estimator back-propagates (docs/math.md §2).

For a batch with flat outputs ``o`` and output family ``fam`` (``Λ``, scores ``u``):

* ``exact``: the columns of ``S`` with ``S Sᵀ = Λ`` (``Σ_r (Jᵀs_r)(Jᵀs_r)ᵀ = JᵀΛJ``), scale 1;
* ``score`` (Î1): ``k`` sampled scores ``u_ij``, scale ``1/k``;
* ``hessian`` (Î2): the columns of ``S``, plus the term ``−(1/k) ∇²_θ Σᵢ (Σⱼ u_ij)ᵀ o(xᵢ)``;
* ``empirical``: the score of the true target, scale 1 (per position: each position's part alone);
* ``combined``: Î1 and Î2 from ONE set of ``k`` labels per input (:func:`add_shared_label_estimates`),
  weighted per entry by :mod:`torchfim.combined` (docs/math.md §8).
"""

from __future__ import annotations

import time

import torch
from torch import Tensor

from ._progress import ProgressBar
from .engine import Backend, Recording
from .engine.backend import second_order_support
from .engine.labels import ignored_labels
from .errors import TorchfimError, check_label_memory, warn_user
from .families import Family
from .families.positions import Positions
from .structures import Structure

ESTIMATORS = ("exact", "score", "hessian", "empirical", "combined")
#: Seconds the exact Fisher of one mini-batch may be projected to take before it warns (:func:`_add_exact`).
LONG_EXACT_S = 60.0
#: Seconds left in one mini-batch's exact Fisher past which ``progress=True`` shows a bar over its columns.
COLUMN_BAR_S = 5.0


def add_estimate(
    estimator: str,
    backend: Backend,
    rec: Recording,
    fam: Family,
    structure: Structure,
    k: int,
    generator: torch.Generator | None,
    progress: bool = False,
    per_position: bool = False,
) -> None:
    """Add one mini-batch's sum over inputs of ``estimator`` to ``structure``.

    ``combined`` needs two structures: use :func:`add_shared_label_estimates`. For ``score`` and
    ``empirical`` this is ``rec``'s last use: the backend may free it on the way. ``progress``: a bar over
    the exact Fisher's columns where they take long (:class:`_ColumnPace`). ``per_position``: the empirical
    Fisher of each position's true label, ``Σₜ (Jₜᵀuₜ)(Jₜᵀuₜ)ᵀ``, instead of the input's summed score
    ``(Σₜ Jₜᵀuₜ)(Σₜ Jₜᵀuₜ)ᵀ`` (the same where the outputs have no positions).
    """
    o = rec.values
    if estimator in ("exact", "hessian"):
        _add_exact(backend, rec, fam, structure, progress)
    elif estimator == "score":
        backend.add_products(rec, sampled_scores(fam, o, k, generator).to(o.dtype), structure, 1.0 / k, last=True)
    elif estimator == "empirical" and per_position and isinstance(fam, Positions):
        for block in fam.placed_columns(o, _true_scores(fam, rec, o)[:, 0].to(o.dtype)):
            backend.add_products(rec, block.transpose(-1, -2), structure)
    elif estimator == "empirical":
        backend.add_products(rec, _true_scores(fam, rec, o).to(o.dtype), structure, last=True)
    else:
        raise TorchfimError(f"internal: estimator {estimator!r} needs add_shared_label_estimates")
    if estimator == "hessian":
        _add_hessian_correction(backend, rec, sampled_scores(fam, o, k, generator), structure, k)


def add_shared_label_estimates(
    backend: Backend,
    rec: Recording,
    fam: Family,
    score: Structure,
    hessian: Structure,
    k: int,
    generator: torch.Generator | None,
) -> None:
    """Add one mini-batch's sums of Î1 (to ``score``) and Î2 (to ``hessian``) from the SAME labels.

    One draw of ``k`` labels per input serves both, so ``Cov(Î1, Î2)`` is the shared-label
    covariance of docs/math.md §8.2 (:mod:`torchfim.covariance`). With the same generator state
    the draw is the one ``estimator="score"`` (and ``"hessian"``) would make.
    """
    o = rec.values
    scores = sampled_scores(fam, o, k, generator)
    backend.add_products(rec, scores.to(o.dtype), score, 1.0 / k)
    _add_exact(backend, rec, fam, hessian)
    _add_hessian_correction(backend, rec, scores, hessian, k)


def _add_exact(backend: Backend, rec: Recording, fam: Family, structure: Structure, progress: bool = False) -> None:
    """Add ``Σᵢ Jᵢᵀ Λᵢ Jᵢ``: the columns of ``S`` (``S Sᵀ = Λ``) pulled back, a block of them at a time.

    The columns number about one per output number of an input (a language model's tokens × vocabulary),
    so one mini-batch may take long: :class:`_ColumnPace` warns, and with ``progress`` shows a bar over them.
    """
    pace = _ColumnPace(fam.fisher_output_sqrt_count(rec.values), tuple(rec.shape[1:]), progress)
    for block in fam.fisher_output_sqrt_blocks(rec.values):
        backend.add_products(rec, block.transpose(-1, -2).to(rec.values.dtype), structure)
        pace.advance(block.shape[-1])
    pace.close()


class _ColumnPace:
    """The pace of the exact Fisher's columns in one mini-batch, at the rate of the blocks after the first
    (which pays one-time costs). Where the columns left are projected past :data:`LONG_EXACT_S`, a warning
    gives the estimate and names the cheaper estimator; with ``progress``, past :data:`COLUMN_BAR_S`, a bar
    counts the columns (the bar over the inputs alone would stand still)."""

    def __init__(self, width: int, shape: tuple[int, ...], progress: bool) -> None:
        self.width, self.shape, self.progress = width, shape, progress
        self.done, self.first, self.start = 0, 0, 0.0
        self.warned = False
        self.bar: ProgressBar | None = None

    def advance(self, columns: int) -> None:
        self.done += columns
        if self.bar is not None:
            self.bar.update(columns)
        if not self.first:
            self.first, self.start = self.done, time.perf_counter()
            return
        if self.done >= self.width or (self.warned and (self.bar is not None or not self.progress)):
            return
        left = (time.perf_counter() - self.start) / (self.done - self.first) * (self.width - self.done)
        if self.progress and self.bar is None and left > COLUMN_BAR_S:
            self.bar = ProgressBar(total=self.width, initial=self.done, desc="output vectors", unit="vector", leave=False)
        if not self.warned and left > LONG_EXACT_S:
            self.warned = True
            warn_user(
                f"torchfim: the exact Fisher (and Î2's exact part) pulls back about one output vector per "
                f"output number of each input, {self.width:,} here (outputs {self.shape}), which will "
                f"take about {left:.0f} s more for this mini-batch; estimator='score' pulls back n_samples "
                "vectors per input (labels drawn at every position at once); Tr(F) with an error bar at that "
                "cost comes from torchfim.score_norms.squared_score_norms(..., n_samples=2).trace() "
                "(return_stderr=True and fisher_variance pull back every output number, as this does)"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def sampled_scores(fam: Family, o: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """``k`` output scores ``u_ij`` per input from labels drawn from the model: ``(B, k, C)``."""
    check_label_memory(o.shape[0], k, o.shape[1], o.device)
    return fam.sample_scores(o, k, generator)


def _add_hessian_correction(backend: Backend, rec: Recording, scores: Tensor, structure: Structure, k: int) -> None:
    """Add Î2's label term ``−(1/k) Σᵢ Σⱼ Σ_a u_ij,a ∇²o_a(xᵢ)`` for scores ``u`` (B, k, C)."""
    # Σⱼ Σ_a u_ij,a ∇²o_a(xᵢ) = ∇²_θ (Σⱼ u_ij)ᵀ o(xᵢ) with the scores held fixed.
    weights = scores.sum(1).to(rec.values.dtype)
    with second_order_support():
        backend.add_hessian_term(rec.batch, weights, structure, -1.0 / k)


def _true_scores(fam: Family, rec: Recording, o: Tensor) -> Tensor:
    y = rec.batch.targets
    if y is None:
        raise TorchfimError(
            "estimator='empirical' uses the true labels but a mini-batch came without targets; "
            "pass targets=... or yield (inputs, targets) pairs"
        )
    y = (y if isinstance(y, Tensor) else torch.as_tensor(y)).to(o.device)
    ignored = ignored_targets(fam, y)
    if ignored is None:
        return fam.output_score(fam.check_targets(y, o), o).unsqueeze(1)
    # A class label IGNORE_INDEX (-100) observes nothing, as in F.cross_entropy: its score is 0.
    u = fam.output_score(fam.check_targets(y.masked_fill(ignored, 0), o), o)
    rows = ignored.reshape(ignored.shape[0], -1, 1)  # (B, positions, 1)
    return u.reshape(*rows.shape[:2], -1).masked_fill(rows, 0.0).reshape(u.shape).unsqueeze(1)


def ignored_targets(fam: Family, y: Tensor) -> Tensor | None:
    """Where categorical targets hold ``IGNORE_INDEX`` (None: nowhere, or not a categorical family)."""
    base = fam.base if isinstance(fam, Positions) else fam
    return ignored_labels(y) if base.name == "categorical" else None
