"""Closed-form variances of the Fisher estimators Î1 and Î2, and upper bounds on them.

Conditional on the inputs ``x_1..x_n``, with ``k`` labels per input (Soen & Sun
2021; DESIGN.md §4), entry ``(p, q)`` of each estimator has variance

* Î1 (``score``):   ``(1/(n²k)) Σᵢ ( E[(uᵀj_p)²(uᵀj_q)²] − I(θ|xᵢ)_pq² )``
* Î2 (``hessian``): ``(1/(n²k)) Σᵢ h_pqᵀ Λᵢ h_pq``,  ``h_pq = ∂²o(xᵢ)/∂θ_p∂θ_q``

where ``j_p = ∂o(xᵢ)/∂θ_p`` is column ``p`` of ``Jᵢ``; ``E[(uᵀv)²(uᵀw)²] =
Σ_abcd v_a v_b w_c w_d E[u_a u_b u_c u_d]``. The trace estimators have
``Var(Tr Î1) = (1/(n²k)) Σᵢ (E[(uᵀ Jᵢ Jᵢᵀ u)²] − (tr I(θ|xᵢ))²)`` and
``Var(Tr Î2) = (1/(n²k)) Σᵢ dᵢᵀ Λᵢ dᵢ`` with ``d_a = tr ∇²_θ o_a(xᵢ)``.

The bounds replace the moment contractions by spectral norms, per input:

* Î1, spectral:  ``E[(uᵀv)²(uᵀw)²] ≤ λ_max(M) ‖v‖²‖w‖²`` and ``E[(uᵀKu)²] ≤ λ_max(M) ‖K‖_F²``,
  where ``M`` is the fourth-moment tensor ``E[u⊗u⊗u⊗u]`` read as a ``C²×C²``
  positive semi-definite matrix (Cauchy–Schwarz in the inner product ``M``).
* Î1, kurtosis:  the same with ``E‖u‖⁴ ≥ λ_max(M)`` in place of ``λ_max(M)`` for
  entries, and ``E[(uᵀKu)²] ≤ ‖K‖₂² E‖u‖⁴`` for the trace.
* Î2, spectral:  ``hᵀΛh ≤ λ_max(Λ) ‖h‖²`` (and ``dᵀΛd ≤ λ_max(Λ)‖d‖²``).

Soen & Sun (2021) bound both variances in this way, through the spectra of the
output distribution's moments and the norms of the first and second derivatives
of the network's output (their Theorem 7 is the bound whose ratio to the true
variance their Figure A.3 plots). The paper's text was not available to this
project when the bounds were written, so each bound here is stated and proved
in its own docstring rather than transcribed; the equality cases are the ones
those proofs give (one output, ``C = 1``; and ``Λ ∝ I`` for Î2).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._batches import Inputs, iter_batches
from ._fastpath import METHODS, FastPath, Recording, choose_path
from ._functional import CHUNK_ELEMENTS, FunctionalModel
from .errors import TorchfimError, check_choice, check_n_samples
from .families import Family, get_family
from .fisher import STRUCTURES, FisherResult, _Accumulator, _check_dense

VARIANCE_ESTIMATORS = ("score", "hessian")
_MODES = ("exact", "spectral", "kurtosis")


def _fourth_moment_matrix(fam: Family, o: Tensor) -> Tensor:
    c = o.shape[1]
    return fam.fourth_moment(o).reshape(o.shape[0], c * c, c * c)


class _Sum(_Accumulator):
    """Running sum of one structure, addressed by blocks of flat parameter columns."""

    def blocks(self) -> Iterator[tuple[int, int, str | None]]:
        """``(start, stop, name)`` column ranges whose pairwise entries are wanted."""
        if self.structure == "full":
            yield 0, self.fm.num_params, None
        else:
            for name, offset, size in zip(self.fm.names, self.fm.offsets, self.fm.sizes):
                yield offset, offset + size, name

    def add_block(self, start: int, rows: slice | Tensor, name: str | None, values: Tensor) -> None:
        if name is None:
            self.value[rows] += values
        else:
            local = rows - start if isinstance(rows, Tensor) else slice(rows.start - start, rows.stop - start)
            self.value[name][local] += values



def _score_trace_terms(fam: Family, o: Tensor, lam: Tensor, gram: Tensor, mode: str, scale: Tensor | None) -> Tensor:
    """Σᵢ of ``E[(uᵀKᵢu)²] − (tr ΛᵢKᵢ)²`` (or its bound) for ``Kᵢ = JᵢJᵢᵀ`` (B, C, C)."""
    trace_i = torch.einsum("nab,nab->n", lam, gram)
    if mode == "exact":
        second = fam.quadratic_moment(o, gram)
    elif mode == "spectral":
        second = scale * (gram**2).sum((1, 2))
    else:
        second = scale * torch.linalg.eigvalsh(gram)[:, -1] ** 2
    return (second - trace_i**2).sum()


def _bound_scale(fam: Family, o: Tensor, mode: str) -> Tensor | None:
    """The per-input constant of an Î1 bound: ``λ_max(M)`` (spectral) or ``E‖u‖⁴`` (kurtosis); None when exact."""
    if mode == "spectral":
        return torch.linalg.eigvalsh(_fourth_moment_matrix(fam, o))[:, -1]
    if mode == "kurtosis":
        eye = torch.eye(o.shape[1], dtype=o.dtype, device=o.device).expand(o.shape[0], -1, -1)
        return fam.quadratic_moment(o, eye)
    return None


def _score_chunk(acc: _Sum, fam: Family, o: Tensor, jac: Tensor, mode: str) -> None:
    """Add Σᵢ of the per-label Î1 variance (or its bound) of one chunk of samples."""
    lam = fam.fisher_output(o)
    scale = _bound_scale(fam, o, mode)
    if acc.structure == "trace":
        acc.value += _score_trace_terms(fam, o, lam, jac @ jac.transpose(1, 2), mode, scale)
        return
    cols = jac.transpose(1, 2)  # (B, P, C): column j_p of each Jᵢ
    if acc.structure == "diag":
        fisher_pp, fourth = fam.moments_along(o, cols)
        second = fourth if mode == "exact" else scale.unsqueeze(1) * (cols**2).sum(-1) ** 2
        acc.value += (second - fisher_pp**2).sum(0)
        return
    for start, stop, name in acc.blocks():
        v = cols[:, start:stop]
        fisher_pq = torch.einsum("npc,ncd,nqd->npq", v, lam, v)
        if mode == "exact":
            phi = torch.einsum("npa,npb->npab", v, v).flatten(2)
            second = torch.einsum("npk,nkl,nql->npq", phi, _fourth_moment_matrix(fam, o), phi)
        else:
            norms = (v**2).sum(-1)
            second = scale[:, None, None] * norms.unsqueeze(2) * norms.unsqueeze(1)
        acc.add_block(start, slice(start, stop), name, (second - fisher_pq**2).sum(0))


def _score_dense_chunk(
    acc: _Sum, fam: Family, fast: FastPath, o: Tensor, x: Tensor, mode: str, rec: Recording | None = None
) -> None:
    """:func:`_score_chunk` for dense layers, from the factors ``j_p = a_j g_u`` of each weight column.

    ``E[(uᵀj_p)⁴] − (j_pᵀΛj_p)² = a_j⁴ (E[(uᵀg_u)⁴] − (g_uᵀΛg_u)²)``: one term per unit, spread
    over the layer's inputs, so no per-sample Jacobian is built. ``rec``: the recorded forward of
    ``x`` when there is one.
    """
    eye = torch.eye(o.shape[1], dtype=o.dtype, device=o.device).expand(o.shape[0], -1, -1)
    products = fast.backward(rec, eye) if rec is not None else fast.sensitivities(x, eye)[1:]
    columns = fast.unit_columns(*products)
    scale = _bound_scale(fam, o, mode)
    if acc.structure == "trace":
        acc.value += _score_trace_terms(fam, o, fam.fisher_output(o), fast.output_gram(columns), mode, scale)
        return
    per_unit = []
    for _, g in columns:
        fisher_uu, fourth = fam.moments_along(o, g)
        second = fourth if mode == "exact" else scale.unsqueeze(1) * (g**2).sum(-1) ** 2
        per_unit.append(second - fisher_uu**2)
    acc.value += fast.spread_units([a for a, _ in columns], per_unit, power=4)


def _quadratic(lam: Tensor, top: Tensor, h: Tensor, mode: str) -> Tensor:
    """``hᵀΛh`` (exact) or ``λ_max(Λ)‖h‖²`` (spectral) with ``h`` (m, B, C, ...) → summed over samples."""
    if mode == "exact":
        return torch.einsum("mna...,nab,mnb...->m...", h, lam, h)
    return torch.einsum("n,mna...->m...", top, h**2)


def _hessian_batch(
    acc: _Sum, fam: Family, fm: FunctionalModel, fast: FastPath | None, x: Tensor, o: Tensor, mode: str
) -> None:
    """Add Σᵢ of the per-label Î2 variance (or its bound) of one mini-batch."""
    lam = fam.fisher_output(o)
    top = torch.linalg.eigvalsh(lam)[:, -1]
    batch, width = o.shape
    if fast is not None and fast.dense and acc.structure in ("diag", "trace"):
        inputs, diagonals = fast.unit_hessian_diagonals(x)  # ∂²o_a/∂z_u² per unit u: (B, C, out)
        if acc.structure == "diag":
            # ∂²o/∂W_uj² = a_j² ∂²o/∂z_u², so hᵀΛh = a_j⁴ · (per-unit quadratic form).
            if mode == "exact":
                per_unit = [torch.einsum("nau,nab,nbu->nu", d, lam, d) for d in diagonals]
            else:
                per_unit = [top.unsqueeze(1) * (d**2).sum(1) for d in diagonals]
            acc.value += fast.spread_units(inputs, per_unit, power=4)
        else:
            traces = fast.unit_traces(inputs, diagonals)
            acc.value += _quadratic(lam, top, traces.unsqueeze(0), mode).sum()
        return
    if acc.structure in ("diag", "trace"):
        step = fm.column_chunk(batch, width)
        traces = torch.zeros_like(o)  # dᵢ = tr ∇²o(xᵢ)
        for start in range(0, fm.num_params, step):
            columns = torch.arange(start, min(fm.num_params, start + step), device=fm.device)
            diagonals = fm.output_hessian_diagonals(x, columns)  # (m, B, C)
            if acc.structure == "diag":
                acc.value[columns] += _quadratic(lam, top, diagonals, mode)
            else:
                traces += diagonals.sum(0)
        if acc.structure == "trace":
            acc.value += _quadratic(lam, top, traces.unsqueeze(0), mode).sum()
        return
    for rows in fm.sample_chunks(batch, width):
        n_rows = rows.stop - rows.start
        step = max(1, CHUNK_ELEMENTS // (n_rows * width * fm.num_params * 4))
        for start, stop, name in acc.blocks():
            for first in range(start, stop, step):
                columns = torch.arange(first, min(stop, first + step), device=fm.device)
                h = fm.output_hessian_columns(x[rows], columns)[..., start:stop]  # (m, B, C, block)
                acc.add_block(start, columns, name, _quadratic(lam[rows], top[rows], h, mode))


def _variance(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family,
    estimator: str,
    structure: str,
    n_samples: int,
    mode: str,
    progress: bool,
    method: str = "auto",
) -> FisherResult:
    fam = get_family(family)
    check_choice("estimator", estimator, VARIANCE_ESTIMATORS)
    check_choice("structure", structure, STRUCTURES)
    check_choice("method", method, METHODS)
    k = check_n_samples(n_samples)
    fm = FunctionalModel(model)
    _check_dense(structure, fm)
    acc = _Sum(structure, fm)
    n = 0
    fast: FastPath | None = None
    for x, _ in tqdm(iter_batches(inputs), desc=f"variance[{estimator}]", unit="batch", disable=not progress):
        x = fm.prepare_inputs(x)
        if x.shape[0] == 0:
            continue
        if n == 0:
            fast = choose_path(fm, method, x)
        dense_score = estimator == "score" and fast is not None and fast.dense and structure in ("diag", "trace")
        # A batch whose unit-vector products fit one chunk: one recorded forward serves it all.
        whole = dense_score and len(fast.sample_chunks(x.shape[0], fast.output_width, structure)) == 1
        rec = fast.record(x) if whole else None
        o = rec.output.detach() if rec is not None else fm.outputs(x)
        fam.check_output(o)
        if n == 0:
            fm.check_independent(x, o)
        if rec is not None:
            _score_dense_chunk(acc, fam, fast, o, x, mode, rec)
        elif dense_score:
            for rows in fast.sample_chunks(x.shape[0], o.shape[1], structure):
                _score_dense_chunk(acc, fam, fast, o[rows], x[rows], mode)
        elif estimator == "score":
            width = o.shape[1]
            per_sample = width * (fm.num_params if structure in ("full", "layers") else 1)
            for rows in fm.sample_chunks(x.shape[0], per_sample):
                if fast is None:
                    _, jac = fm.jacobians(x[rows], width)
                else:
                    eye = torch.eye(width, dtype=fm.dtype, device=fm.device).expand(rows.stop - rows.start, -1, -1)
                    jac = fast.per_sample_rows(*fast.sensitivities(x[rows], eye)[1:])
                _score_chunk(acc, fam, o[rows], jac, mode)
        else:
            _hessian_batch(acc, fam, fm, fast, x, o, mode)
        n += x.shape[0]
    if n == 0:
        raise TorchfimError("inputs is empty: pass at least one input (a tensor with batch size ≥ 1)")
    return acc.mean(n * n * k)


def fisher_variance(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    estimator: str = "score",
    structure: str = "diag",
    n_samples: int = 1,
    *,
    method: str = "auto",
    progress: bool = False,
) -> FisherResult:
    """Exact variance of each entry of the Î1 (``score``) or Î2 (``hessian``) estimator.

    Conditional on ``inputs`` (fixed) with ``k = n_samples`` labels per input, as
    the module docstring states: for ``full``/``diag``/``layers`` the variance of
    each entry of the estimator that :func:`torchfim.fisher` returns with the same
    arguments; for ``trace`` the variance of the trace estimator (not the sum of
    the diagonal entries' variances). Scales as ``1/(n²k)·Σᵢ``, i.e. ``1/(nk)``
    for a data set of similar inputs.

    ``diag`` and ``trace`` never build ``P×P`` objects: Î2's needs the diagonal
    of every output Hessian ``∇²_θ o_a(xᵢ)``, computed exactly by
    forward-over-forward differentiation, one parameter direction at a time
    (one unit direction at a time on the per-layer fast path of dense layers).
    ``method`` chooses the path as in :func:`torchfim.fisher`.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> var1 = torchfim.fisher_variance(model, x, estimator="score", structure="trace")
        >>> var2 = torchfim.fisher_variance(model, x, estimator="hessian", structure="diag")
        >>> bool(var1 > 0), var2.shape
        (True, torch.Size([67]))
    """
    return _variance(model, inputs, family, estimator, structure, n_samples, "exact", progress, method)


def score_variance_bound_spectral(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    structure: str = "diag",
    n_samples: int = 1,
) -> FisherResult:
    """Upper bound on ``Var(Î1)`` through the largest eigenvalue of the fourth moment of ``u``.

    Per input, with ``M = E[vec(uuᵀ) vec(uuᵀ)ᵀ]`` (``C²×C²``, positive semi-definite):
    ``E[(uᵀv)²(uᵀw)²] = ⟨v⊗v, M (w⊗w)⟩ ≤ λ_max(M) ‖v‖²‖w‖²`` by Cauchy–Schwarz, so

    ``Var(Î1)_pq ≤ (1/(n²k)) Σᵢ (λ_max(Mᵢ) ‖j_p‖² ‖j_q‖² − I(θ|xᵢ)_pq²)``, and
    ``Var(Tr Î1) ≤ (1/(n²k)) Σᵢ (λ_max(Mᵢ) ‖JᵢJᵢᵀ‖_F² − (tr I(θ|xᵢ))²)``.

    Assumptions: the output family of DESIGN.md §1 (``E[uuᵀ] = Λ``); none on the
    network. Equality: one output per input (``C = 1``). This is the spectral
    form of the Î1 bound of Soen & Sun (2021), stated and proved here.
    """
    return _variance(model, inputs, family, "score", structure, n_samples, "spectral", False)


def score_variance_bound_kurtosis(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    structure: str = "diag",
    n_samples: int = 1,
) -> FisherResult:
    """Upper bound on ``Var(Î1)`` through ``E‖u‖⁴`` (no eigen-decomposition needed).

    ``|uᵀv| ≤ ‖u‖‖v‖`` gives ``E[(uᵀv)²(uᵀw)²] ≤ E‖u‖⁴ ‖v‖²‖w‖²`` and
    ``E[(uᵀKu)²] ≤ ‖K‖₂² E‖u‖⁴``, so

    ``Var(Î1)_pq ≤ (1/(n²k)) Σᵢ (E‖u‖⁴ ‖j_p‖²‖j_q‖² − I(θ|xᵢ)_pq²)`` and
    ``Var(Tr Î1) ≤ (1/(n²k)) Σᵢ (E‖u‖⁴ ‖JᵢJᵢᵀ‖₂² − (tr I(θ|xᵢ))²)``.

    Never tighter than :func:`score_variance_bound_spectral` for entries
    (``λ_max(M) ≤ E‖u‖⁴``) but may be for the trace. Equality: ``C = 1``.
    """
    return _variance(model, inputs, family, "score", structure, n_samples, "kurtosis", False)


def hessian_variance_bound_spectral(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    structure: str = "diag",
    n_samples: int = 1,
) -> FisherResult:
    """Upper bound on ``Var(Î2)`` through the largest eigenvalue of ``Λ``.

    ``hᵀΛh ≤ λ_max(Λ) ‖h‖²`` gives
    ``Var(Î2)_pq ≤ (1/(n²k)) Σᵢ λ_max(Λᵢ) ‖∂²o(xᵢ)/∂θ_p∂θ_q‖²`` and
    ``Var(Tr Î2) ≤ (1/(n²k)) Σᵢ λ_max(Λᵢ) ‖dᵢ‖²`` with ``d_a = tr ∇²_θ o_a``.

    Assumptions: DESIGN.md §1 families; none on the network. Equality when
    ``Λ ∝ I`` (the fixed-σ Gaussian, any ``C = 1`` family). Like the exact
    variance it vanishes wherever ``∇²_θ o`` does (inside ReLU layers, the last
    linear layer). The Î2 bound of Soen & Sun (2021), stated and proved here.
    """
    return _variance(model, inputs, family, "hessian", structure, n_samples, "spectral", False)


BOUNDS = {
    "score": (score_variance_bound_spectral, score_variance_bound_kurtosis),
    "hessian": (hessian_variance_bound_spectral,),
}


def variance_bound(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    estimator: str = "score",
    structure: str = "diag",
    n_samples: int = 1,
) -> FisherResult:
    """The tightest of this module's upper bounds on ``fisher_variance`` (entry by entry).

    ``score`` takes the elementwise minimum of :func:`score_variance_bound_spectral`
    and :func:`score_variance_bound_kurtosis`; ``hessian`` uses
    :func:`hessian_variance_bound_spectral`. Same shape as :func:`fisher_variance`.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> exact = torchfim.fisher_variance(model, x, structure="trace")
        >>> bound = torchfim.variance_bound(model, x, structure="trace")
        >>> bool(bound >= exact)
        True
    """
    check_choice("estimator", estimator, VARIANCE_ESTIMATORS)
    results = [bound(model, inputs, family, structure, n_samples) for bound in BOUNDS[estimator]]
    best = results[0]
    for other in results[1:]:
        if isinstance(best, dict):
            best = {name: torch.minimum(best[name], other[name]) for name in best}
        else:
            best = torch.minimum(best, other)
    return best
