"""Closed-form variances of the Fisher estimators Î1 and Î2 (docs/math.md §3).

Conditional on the inputs ``x_1..x_n`` with ``k`` labels per input, entry ``(p, q)`` of each
estimator has variance

* Î1 (``score``):   ``(1/(n²k)) Σᵢ ( E[(uᵀj_p)²(uᵀj_q)²] − I(θ|xᵢ)_pq² )``
* Î2 (``hessian``): ``(1/(n²k)) Σᵢ h_pqᵀ Λᵢ h_pq``,  ``h_pq = ∂²o(xᵢ)/∂θ_p∂θ_q``

where ``j_p = ∂o(xᵢ)/∂θ_p`` is column ``p`` of ``Jᵢ``. The trace estimators have
``Var(Tr Î1) = (1/(n²k)) Σᵢ (E[(uᵀ Jᵢ Jᵢᵀ u)²] − (tr I(θ|xᵢ))²)`` and
``Var(Tr Î2) = (1/(n²k)) Σᵢ dᵢᵀ Λᵢ dᵢ`` with ``d_a = tr ∇²_θ o_a(xᵢ)``. The upper bounds on these
(:mod:`torchfim.bounds`) run through the same code with the moments replaced by their bounds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import cached_property

import torch
from torch import Tensor, nn

from . import line_bounds
from ._batches import Inputs
from ._identity import identity_like
from ._processes import announced
from ._settings_digest import family_settings
from .engine import (
    Backend,
    Recording,
    backend_name,
    check_finite_result,
)
from .engine.backend import CHUNK_ELEMENTS, is_trace, second_order_support
from .engine.fast_path_check import observed_outputs
from .engine.loop import closed_form_groups, group_recordings
from .engine.session import Pass, engine_pass
from .engine.view import Mask
from .errors import TorchfimError, check_choice, check_n_samples, warn_user
from .families import Family, Positions, get_family
from .gram_spectral_norm import kurtosis_seconds
from .keyword_hints import explains_keywords
from .process_rows import FAILED_BEFORE, row_share
from .structures import (
    STRUCTURE_NAMES,
    Blocks,
    Diag,
    Full,
    Layout,
    PublicValue,
    Structure,
    StructureVisitor,
    Trace,
    accumulation_dtype,
    check_fits,
    make_structure,
    structure_kind,
)

VARIANCE_ESTIMATORS = ("score", "hessian")
MODES = ("exact", "spectral", "kurtosis")
#: n×n matrices the ``full``/``blocks`` Î1 variances of outputs with positions hold at once, an input at a time: the
#: running sums over its positions and one position's gram, spread and products (measured 11.1 besides the result,
#: categorical with 3 and 6 positions and Bernoulli with 6, P ≈ 1550, large blocks left to the OS as they are freed).
POSITION_COPIES = 12


def squares_layout(layout: Layout) -> Layout:
    """The layout variances and covariances are summed and returned in: its accumulation dtype (a half-precision
    model's widened to float32). They are products of two numbers of the Fisher's scale, so where the Fisher's entries
    are in float16's range (6e-8 to 65504) theirs often are not: a variance of 1e-13 came back 0."""
    return replace(layout, dtype=accumulation_dtype(layout.dtype))


def widened(values: Tensor) -> Tensor:
    """A half-precision model's outputs in float32, so that the families form the per-input variance terms there
    (their products with the engine's half-precision vectors promote to float32)."""
    return values.to(accumulation_dtype(values.dtype))


def _bound_dtype(t: Tensor) -> torch.dtype:
    """float64 where the device has it (MPS has not), else ``t``'s dtype."""
    return t.dtype if t.device.type == "mps" else torch.promote_types(t.dtype, torch.float64)


def _widened_for_bounds(o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Outputs and vectors (columns, grams) in float64 for an Î1 bound, ``λ·‖v‖⁴ − (vᵀΛv)²`` or its trace form:
    where ``uᵀv`` hardly varies (near a uniform law; ‖vec R − E vec R‖² is constant on SO(3)) the two terms are far
    larger than their difference, which float32 turned negative (a matrix Fisher head at scale 1e-4: −339 times the
    variance of the trace; a one-logit Bernoulli head: −1400 times on a diagonal entry). Formed from the rounded
    numbers in float64, the difference keeps the digits float32 lost."""
    wide = _bound_dtype(v)
    return o.to(wide), v.to(wide)


class _Observed:
    """The output numbers a family observes, for the bounds' vectors: the Jacobian rows ``j``, grams ``K = JJᵀ`` and
    Hessian traces ``d`` of masked positions (a ``mask``, labels -100) enter no moment of the score (``u`` is 0
    there, ``Λ`` too), but a norm ``‖j‖²``, ``‖K‖`` or ``‖d‖²`` would count them: each bound is over the observed
    positions alone once the masked numbers are set to 0 (``torch.where``: a masked position's Jacobian may be
    anything, non-finite included)."""

    def __init__(self, fam: Family, o: Tensor) -> None:
        keep = observed_outputs(fam, o)  # (B, C) bool
        self.keep = None if keep is None or bool(keep.all()) else keep  # None: every number observed

    def vectors(self, rows: slice, v: Tensor, dim: int = -1) -> Tensor:
        """``v`` with the numbers of masked outputs set to 0; the output axis of ``v`` is ``dim``, the inputs
        ``rows`` its first, or its second for ``dim=2`` of ``(m, b, C, n)``."""
        if self.keep is None:
            return v
        keep = self.keep[rows]
        keep = keep.unsqueeze(0).unsqueeze(-1) if dim == 2 else keep.unsqueeze(1)
        return torch.where(keep, v, torch.zeros((), dtype=v.dtype, device=v.device))

    def grams(self, rows: slice, gram: Tensor) -> Tensor:
        """Output grams ``(b, C, C)`` over the observed numbers: masked rows and columns set to 0."""
        if self.keep is None:
            return gram
        keep = self.keep[rows]
        both = keep.unsqueeze(2) & keep.unsqueeze(1)
        return torch.where(both, gram, torch.zeros((), dtype=gram.dtype, device=gram.device))


def _bound_scale(fam: Family, o: Tensor, mode: str) -> Tensor | None:
    """The per-input constant of an Î1 bound: ``λ_max(M)`` (spectral) or ``E‖u‖⁴`` (kurtosis)."""
    if mode == "spectral":
        return fam.fourth_moment_top_eigenvalue(o)
    if mode == "kurtosis":
        eye = identity_like(o.shape[1], o).expand(o.shape[0], -1, -1)
        return fam.quadratic_moment(o, eye)
    return None


class ScoreVariance(StructureVisitor):
    """Add Σᵢ of the per-label Î1 variance (or its bound) of one mini-batch to a structure."""

    def __init__(self, engine: Backend, rec: Recording, fam: Family, mode: str) -> None:
        self.engine, self.rec, self.fam, self.mode = engine, rec, fam, mode
        self.o = widened(rec.values)
        self.observed = _Observed(fam, rec.values)

    @cached_property
    def scale(self) -> Tensor | None:
        """The bound's per-input constant in float64 (:func:`_bound_dtype`), taken at its first use: after the
        engine has checked that all output numbers of an input fit in memory (the kurtosis bound's ``E‖u‖⁴``
        reads a ``C × C`` identity)."""
        return _bound_scale(self.fam, self.o.to(_bound_dtype(self.o)), self.mode)

    def trace(self, structure: Trace) -> None:
        structure.add_squares(0, self.trace_terms(slice(None), self.engine.output_gram(self.rec)).sum())

    def trace_terms(self, rows: slice, gram: Tensor, at_least: Tensor | None = None) -> Tensor:
        """Per input of ``rows``, ``E[(uᵀGu)²] − (tr ΛG)²`` (or its bound) for its output gram ``G`` (b, C, C); the
        kurtosis bound's terms only as far as they are below ``at_least`` (:mod:`torchfim.gram_spectral_norm`)."""
        o, fam, mode = self.o[rows], self.fam.for_rows(rows), self.mode
        if mode == "exact":  # Var[uᵀGu], by the family's form without cancellation
            return fam.score_quadratic_spread(o, gram).to(torch.promote_types(o.dtype, gram.dtype))
        o, gram = _widened_for_bounds(o, self.observed.grams(rows, gram))
        if (line := fam.score_line(o)) is not None:  # u = s e: formed without cancellation near p = ½
            return line_bounds.trace_bounds(line, self.scale[rows], gram, mode)
        eye = identity_like(gram.shape[-1], gram).expand_as(gram)
        trace_i = fam.fisher_output_bilinear(o, eye, gram).sum(-1)  # tr ΛG, by the family's accurate form
        if mode == "spectral":
            second = self.scale[rows] * gram.square().sum((1, 2))
        else:
            second = kurtosis_seconds(gram, self.scale[rows], trace_i**2, at_least)
        if isinstance(fam, Positions):  # tight where every position is near p = ½: the difference then cancels (it
            # was 0 on a variance of 5e-17 at logit 1e-8); the variance itself, formed without cancellation, is below it
            return torch.maximum(second - trace_i**2, fam.score_quadratic_spread(o, gram).to(second.dtype))
        return second - trace_i**2

    def diag(self, structure: Diag) -> None:
        o, fam, mode = self.o, self.fam, self.mode

        def quartic(rows: slice, cols: Tensor) -> Tensor:
            if mode == "exact":  # Var[(uᵀv)²], by the family's form without cancellation
                spread = fam.for_rows(rows).spread_along(o[rows], cols)[1]
                return spread.to(torch.promote_types(o.dtype, cols.dtype))
            o_rows, cols = _widened_for_bounds(o[rows], self.observed.vectors(rows, cols))
            if (line := fam.for_rows(rows).score_line(o_rows)) is not None:
                return line_bounds.entry_bounds(line, self.scale[rows], cols)
            fisher_pp = fam.for_rows(rows).moments_along(o_rows, cols)[0]  # the categorical's fast second moments
            return self.scale[rows].unsqueeze(1) * cols.square().sum(-1) ** 2 - fisher_pp**2

        for i, value in self.engine.entry_quartic(self.rec, quartic).items():
            structure.add_squares(i, value)

    def blocks(self, structure: Blocks) -> None:
        for rows, piece in self.engine.jacobian_pieces(self.rec):
            for i, g in piece.items():
                self._pairwise(structure, i, g.transpose(1, 2), rows)

    def full(self, structure: Full) -> None:
        for rows, piece in self.engine.jacobian_pieces(self.rec):
            cols = torch.cat([piece[i] for i in sorted(piece)], dim=-1).transpose(1, 2)  # (b, P, C)
            self._pairwise(structure, None, cols, rows)

    def _pairwise(self, structure: Structure, index: int | None, v: Tensor, rows: slice) -> None:
        """Add Σᵢ ``E[(uᵀv_p)²(uᵀv_q)²] − (v_pᵀΛv_q)²`` (or its bound) for columns ``v`` (b, n, C), a few inputs at a
        time: the family's moments hold an ``(n, n)`` matrix per input, which for a whole chunk of Jacobians took
        up to 65 times the result's memory (16 inputs, P = 3418)."""
        n, first = v.shape[1], rows.start or 0
        step = max(1, CHUNK_ELEMENTS // max(1, n * n))
        one = slice(first, first + 1)
        if self.mode == "exact" and self.fam.for_rows(one).score_line(self.o[one]) is not None:
            what, entries, copies = f"working memory of one {n}×{n} matrix", n * n, 1  # a product of the squares along the score line
        elif self.mode == "exact" and isinstance(self.fam, Positions):  # per position: grams, their running sums
            step, what, entries, copies = 1, f"working memory of {POSITION_COPIES} {n}×{n} matrices", n * n, \
                POSITION_COPIES
        else:  # the family's fourth moments, the squared Fisher and a temporary of the family's: measured 3 (a bound's
            # in float64: twice a float32 model's)
            widen = 2 if self.mode != "exact" and _bound_dtype(v).itemsize > v.dtype.itemsize else 1
            what, entries, copies = (f"working memory of 3 {n}×{n} matrices per input", min(step, len(v)) * n * n,
                                     3 * widen)
        check_fits(entries, what + " for the closed-form Î1 variances", structure.name, self.engine.layout,
                   copies=copies)
        for start in range(0, v.shape[0], step):
            part = slice(start, min(v.shape[0], start + step))
            terms = self._pairwise_terms(v[part], slice(first + part.start, first + part.stop))
            structure.add_matrix(index, slice(None), terms)

    def _pairwise_terms(self, v: Tensor, rows: slice) -> Tensor:
        """:meth:`_pairwise`'s sum over the inputs ``rows``, whose columns are ``v``: ``(n, n)``."""
        o, fam = self.o[rows], self.fam.for_rows(rows)
        if self.mode == "exact" and (along := fam.along_score_line(o, v)) is not None:  # Var(s²)(v_pᵀe)²(v_qᵀe)²
            spread, squares = along
            weighted = (spread.unsqueeze(1) * squares).to(torch.promote_types(o.dtype, v.dtype))
            return weighted.T @ squares.to(weighted.dtype)
        if self.mode != "exact":
            o, v = _widened_for_bounds(o, self.observed.vectors(rows, v))
            if (line := fam.score_line(o)) is not None:
                return line_bounds.pair_bounds(line, self.scale[rows], v)
            norms = v.square().sum(-1)  # (b, n)
            scaled = self.scale[rows].unsqueeze(1) * norms
            return scaled.T @ norms - fam.fisher_output_gram(o, v).square_().sum(0)
        terms = fam.pairwise_spread(o, v)  # outputs with positions: without cancellation (the family's own form)
        return terms[0] if len(terms) == 1 else terms.sum(0)


class HessianVariance(StructureVisitor):
    """Add Σᵢ of the per-label Î2 variance (or its bound) of one mini-batch to a structure."""

    def __init__(self, engine: Backend, rec: Recording, fam: Family, mode: str) -> None:
        self.engine, self.rec, self.fam, self.mode = engine, rec, fam, mode
        self.o = widened(rec.values)
        self.top = fam.fisher_output_top_eigenvalue(self.o) if mode != "exact" else None
        self.observed = _Observed(fam, rec.values)

    def quadratic(self, rows: slice, d: Tensor) -> Tensor:
        """``dᵀΛd`` (exact) or ``λ_max(Λ)‖d‖²`` (bound) for ``d`` (b, n, C) of the samples ``rows``."""
        if self.mode == "exact":  # the family's dᵀΛd: diag(p) − ppᵀ as a matrix cancels once 1 − p_top < ε
            return self.fam.for_rows(rows).fisher_output_bilinear(self.o[rows], d, d)
        return self.top[rows].unsqueeze(1) * self.observed.vectors(rows, d).square().sum(-1)

    def diag(self, structure: Diag) -> None:
        terms = self.engine.hessian_diagonal_terms(self.rec.batch, self.quadratic)
        for i, value in terms.items():
            structure.add_squares(i, value)

    def trace(self, structure: Trace) -> None:
        d = self.engine.output_hessian_traces(self.rec.batch, self.o.shape[1]).to(self.o.dtype)
        structure.add_squares(0, self.quadratic(slice(None), d.unsqueeze(1)).sum())

    def blocks(self, structure: Blocks) -> None:
        layout = self.engine.layout  # a parameter the outputs are piecewise linear in has a zero block
        self._columns(structure, [(i, layout.span(i)) for i in self.engine.curved(self.rec.batch)])

    def full(self, structure: Full) -> None:
        self._columns(structure, [(None, slice(0, self.engine.layout.num_params))])

    def _columns(self, structure: Structure, blocks: list[tuple[int | None, slice]]) -> None:
        """Î2 variances of dense entries from per-sample output-Hessian columns, block by block."""
        layout, batch = self.engine.layout, self.rec.batch
        width = self.o.shape[1]
        row_step = max(1, CHUNK_ELEMENTS // max(1, width * layout.num_params))
        for start_row in range(0, batch.size, row_step):
            rows = slice(start_row, min(batch.size, start_row + row_step))
            sub = batch.rows(rows)
            extra = 4 * sub.size * width * layout.num_params  # the output-Hessian columns themselves
            for index, span, columns in self.engine.directions.chunks(sub, blocks, "output-Hessian columns", extra):
                h = self.engine.output_hessian_columns(sub, columns)[..., span]  # (m, b, C, block)
                if self.mode == "exact":
                    m, b, c, size = h.shape
                    v = h.permute(1, 0, 3, 2).reshape(b, m * size, c)  # every column of every sample
                    values = self.quadratic(rows, v).reshape(b, m, size).sum(0)
                else:
                    h = self.observed.vectors(rows, h.to(self.top.dtype), dim=2)
                    values = torch.einsum("n,mnab->mb", self.top[rows], h.square())
                structure.add_matrix(index, columns - span.start, values)


def add_variance_terms(engine: Backend, rec: Recording, fam: Family, result: Structure, estimator: str,
                       mode: str) -> None:
    """Add Σᵢ of the per-label variance of ``estimator`` (``"score"`` or ``"hessian"``; ``mode``: exact or a bound)
    over the inputs of ``rec`` to ``result``."""
    if estimator == "score":
        result.visit(ScoreVariance(engine, rec, fam, mode))
    else:
        with second_order_support():
            result.visit(HessianVariance(engine, rec, fam, mode))


class EstimateVariance:
    """The closed-form variance of an estimate that draws labels, summed in the estimate's own pass
    (``fisher(..., return_stderr=True)``). Its per-input terms (module docstring) read the model and the inputs
    alone, not the labels drawn nor the estimate, so each mini-batch's are added as the pass reaches it and no
    mini-batch is held for a second pass: memory does not grow with their number. The estimate's mini-batches are
    never cut into row groups (that would change which labels their rows get); where :func:`variance_of` would cut
    one (:func:`~.engine.loop.closed_form_groups`), its groups are recorded again for the variance alone, so that
    both use the same memory as before."""

    def __init__(self, one: Pass, family: Family, estimator: str, structure: str, k: int, mask: Mask) -> None:
        self.one, self.family, self.estimator, self.k, self.mask = one, family, estimator, k, mask
        self.result = make_structure(structure, squares_layout(one.view.layout))
        self.warned = False

    def add(self, rec: Recording, fam: Family, estimate: Callable[[], None]) -> None:
        """Add the variance terms of ``rec``'s inputs and call ``estimate``, which adds the estimate's (and may be
        ``rec``'s last use: the score estimator frees the recording as its pull-back goes). The terms come first
        where they read ``rec`` itself; after the estimate where its row groups are recorded again. Neither draws
        from a generator between the estimate's draws."""
        self.warned = self.warned or _warn_stderr_cost(rec.output.shape[1], self.k)
        whole, grams = self.estimator == "score", is_trace(self.result)
        groups = closed_form_groups(self.one.backend, rec, self.mask, whole, grams)
        if groups is None:
            add_variance_terms(self.one.backend, rec, fam, self.result, self.estimator, "exact")
            estimate()
            return
        estimate()
        for part, fam_part in group_recordings(self.one.view, self.one.backend, rec.batch, groups, self.family,
                                               self.mask, whole, grams):
            add_variance_terms(self.one.backend, part, fam_part, self.result, self.estimator, "exact")

    def finish(self, n: int) -> PublicValue:
        """The variance of the estimate over ``n`` inputs with ``k`` labels each: the sums over ``n²k``."""
        value = self.result.finish(max(n, 1) ** 2 * self.k)
        check_finite_result(value, f"the variance of the {self.estimator} estimator", self.result.layout.dtype)
        return value


def _warn_stderr_cost(width: int, k: int) -> bool:
    """Warn where the standard error's closed form, which pulls back each input's ``width`` output numbers, costs
    a hundred times the estimate's ``k`` pull-backs or more (a language model's positions × vocabulary: a user trial
    waited 490 times the estimate's time for it, longer than for the exact Fisher); whether it warned."""
    if width >= 100 * k:
        warn_user(f"torchfim: return_stderr=True computes the standard error in closed form, which pulls back each "
                  f"input's {width} output numbers where the estimate pulled back {k} vector{'s' if k > 1 else ''}: "
                  f"expect it to take up to {width // k} times as long as the estimate. Tr(F) with an error bar at "
                  "the estimate's cost: torchfim.score_norms.squared_score_norms(..., n_samples=2).trace() (the "
                  "spread of each input's labels)")
        return True
    return False


@announced(FAILED_BEFORE)
def variance_of(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family,
    estimator: str,
    structure: str,
    n_samples: int,
    mode: str,
    *,
    backend: str = "auto",
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
    across_processes: bool = False,
) -> PublicValue:
    """The variance (``mode="exact"``) of an estimator, or one of its bounds, per entry of ``structure``; with
    ``across_processes``, of the estimator over the inputs of all processes, each computing on its rows
    (:mod:`torchfim.process_rows`: ``Σ_r (n_r/N)² V_r``; a bound's per-input terms combine alike)."""
    fam = get_family(family)
    share = row_share(across_processes, mask, ("variance", estimator, structure_kind(structure), family_settings(fam),
                                               n_samples, mode, class_dim), output,
                      "fisher_variance" if mode == "exact" else "variance_bound")
    check_variance_estimator(estimator, "fisher_variance")
    check_choice("structure", structure, STRUCTURE_NAMES)
    k = check_n_samples(n_samples)

    def compute() -> tuple[PublicValue, int]:
        with engine_pass(model, backend, output, class_dim) as one:
            result = make_structure(structure, squares_layout(one.view.layout))
            # Closed forms pull every output vector back and draw nothing: large mini-batches go in row groups.
            for rec, fam_b in one.batches(inputs, None, fam, mask, progress, f"variance[{estimator}]", split=True,
                                          whole=estimator == "score", grams=is_trace(result),
                                          rows=None if share is None else share.rows):
                add_variance_terms(one.backend, rec, fam_b, result, estimator, mode)
            if share is not None:
                share.probe(one.view)
            value = result.finish(max(one.n, 1) ** 2 * k)
        what = f"the variance of the {estimator} estimator" if mode == "exact" else f"the {mode} bound on its variance"
        check_finite_result(value, what, squares_layout(one.view.layout).dtype)
        return value, one.n

    if share is None:
        return compute()[0]
    value, n = share.together(compute, model)
    return share.mean(None, value, n, model)[1]


def check_variance_estimator(estimator: object, caller: str) -> None:
    """Refuse an estimator without closed-form variances here, naming where its variance is (or why it has none)."""
    if estimator == "combined":
        raise TorchfimError(
            f"{caller} takes estimator='score' or 'hessian'; the combined estimator's variance is "
            "torchfim.combined_variance(model, inputs, ...) (or fisher(..., estimator='combined', return_stderr=True))"
        )
    if estimator in ("exact", "empirical"):
        raise TorchfimError(
            f"{caller} takes estimator='score' or 'hessian': estimator={estimator!r} draws no labels, so it has no "
            "sampling variance given the inputs"
        )
    check_choice("estimator", estimator, VARIANCE_ESTIMATORS)


@announced(FAILED_BEFORE)
@explains_keywords
def fisher_variance(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    estimator: str = "score",
    structure: str = "diag",
    n_samples: int = 1,
    *,
    backend: str = "auto",
    method: str | None = None,
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
    across_processes: bool = False,
) -> PublicValue:
    """Exact variance of each entry of the Î1 (``score``) or Î2 (``hessian``) estimator.

    Conditional on ``inputs`` (fixed) with ``k = n_samples`` labels per input, as the module
    docstring states: for ``full``/``diag``/``blocks`` the variance of each entry of the estimator
    that :func:`torchfim.fisher` returns with the same arguments; for ``trace`` the variance of the
    trace estimator (not the sum of the diagonal entries' variances). Scales as ``1/(n²k)·Σᵢ``,
    i.e. ``1/(nk)`` for a data set of similar inputs. Returned in the model's
    dtype, or float32 for a float16/bfloat16 model (variances are products of two numbers of the Fisher's scale:
    1e-13 is 0 in float16), as are the bounds, :func:`torchfim.fisher_covariance` and the combined variance.

    ``diag`` and ``trace`` never build ``P×P`` objects: Î2's needs the diagonal of every output
    Hessian ``∇²_θ o_a(xᵢ)``, computed exactly by forward-over-forward differentiation, one
    parameter direction at a time (one unit direction at a time inside dense layers).

    Args:
        model: the model, as in :func:`torchfim.fisher`.
        inputs: the inputs the variance is conditional on, as in :func:`torchfim.fisher`.
        family: output family name or :class:`~torchfim.families.Family`.
        estimator: ``"score"`` (Î1) or ``"hessian"`` (Î2).
        structure: ``"full"``, ``"diag"``, ``"trace"`` or ``"blocks"``.
        n_samples: the labels per input ``k`` of the estimator whose variance is returned.
        backend: ``"auto"``/``"modules"`` or ``"functional"``, as in :func:`torchfim.fisher`.
        method: deprecated name of ``backend``.
        progress: show a progress bar over the inputs.
        mask: drops positions, as in :func:`torchfim.fisher`.
        output: maps the model's raw output to the output tensor, as in :func:`torchfim.fisher`.
        class_dim: the class dimension of the outputs, as in :func:`torchfim.fisher`.
        across_processes: the variance of the estimator over every process's inputs, each process computing on
            its rows (:func:`torchfim.fisher`): ``Σ_r (n_r/N)² V_r``.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> var1 = torchfim.fisher_variance(model, x, estimator="score", structure="trace")
        >>> var2 = torchfim.fisher_variance(model, x, estimator="hessian", structure="diag")
        >>> bool(var1 > 0), var2.shape
        (True, torch.Size([67]))
    """
    return variance_of(model, inputs, family, estimator, structure, n_samples, "exact",
                       backend=backend_name(backend, method), progress=progress, mask=mask, output=output,
                       class_dim=class_dim, across_processes=across_processes)
