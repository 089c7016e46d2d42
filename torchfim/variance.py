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

import torch
from torch import Tensor, nn

from ._batches import Inputs
from .engine import ENGINE_LOCK, Backend, ModelView, Recording, backend_name, batches, make_backend, run
from .engine.backend import second_order_support
from .engine.view import Mask
from .errors import TorchfimError, check_choice, check_n_samples
from .families import Family, get_family
from .families.base import robust_eigvalsh
from .structures import STRUCTURE_NAMES, PublicValue, Structure, make_structure

VARIANCE_ESTIMATORS = ("score", "hessian")
MODES = ("exact", "spectral", "kurtosis")


def _bound_scale(fam: Family, o: Tensor, mode: str) -> Tensor | None:
    """The per-input constant of an Î1 bound: ``λ_max(M)`` (spectral) or ``E‖u‖⁴`` (kurtosis)."""
    if mode == "spectral":
        return fam.fourth_moment_top_eigenvalue(o)
    if mode == "kurtosis":
        eye = torch.eye(o.shape[1], dtype=o.dtype, device=o.device).expand(o.shape[0], -1, -1)
        return fam.quadratic_moment(o, eye)
    return None


def _score_batch(engine: Backend, rec: Recording, fam: Family, result: Structure, mode: str) -> None:
    """Add Σᵢ of the per-label Î1 variance (or its bound) of one mini-batch."""
    o = rec.values
    scale = _bound_scale(fam, o, mode)
    if result.name == "trace":
        gram = engine.output_gram(rec)
        lam = fam.fisher_output(o)
        trace_i = torch.einsum("nab,nab->n", lam, gram)
        if mode == "exact":
            second = fam.quadratic_moment(o, gram)
        elif mode == "spectral":
            second = scale * gram.square().sum((1, 2))
        else:
            second = scale * robust_eigvalsh(gram)[:, -1].to(gram.dtype) ** 2
        result.add_squares(0, (second - trace_i**2).sum())
        return
    if result.name == "diag":

        def quartic(rows: slice, cols: Tensor) -> Tensor:
            fisher_pp, fourth = fam.moments_along(o[rows], cols)
            second = fourth if mode == "exact" else scale[rows].unsqueeze(1) * cols.square().sum(-1) ** 2
            return second - fisher_pp**2

        for i, value in engine.entry_quartic(rec, quartic).items():
            result.add_squares(i, value)
        return
    lam = fam.fisher_output(o)
    for rows, piece in engine.jacobian_pieces(rec):
        if result.name == "full":
            cols = torch.cat([piece[i] for i in sorted(piece)], dim=-1).transpose(1, 2)  # (b, P, C)
            _add_pairwise(result, None, cols, fam, o[rows], lam[rows], scale, rows, mode)
        else:
            for i, g in piece.items():
                _add_pairwise(result, i, g.transpose(1, 2), fam, o[rows], lam[rows], scale, rows, mode)


def _add_pairwise(result: Structure, index: int | None, v: Tensor, fam: Family, o: Tensor, lam: Tensor,
                  scale: Tensor | None, rows: slice, mode: str) -> None:
    """Add Σᵢ ``E[(uᵀv_p)²(uᵀv_q)²] − (v_pᵀΛv_q)²`` (or its bound) for columns ``v`` (b, n, C)."""
    fisher_pq = torch.einsum("npc,ncd,nqd->npq", v, lam, v)
    if mode == "exact":
        second = fam.pairwise_moment4(o, v)
    else:
        norms = v.square().sum(-1)
        second = scale[rows][:, None, None] * norms.unsqueeze(2) * norms.unsqueeze(1)
    result.add_matrix(index, slice(None), (second - fisher_pq**2).sum(0))


def _hessian_batch(engine: Backend, rec: Recording, fam: Family, result: Structure, mode: str) -> None:
    """Add Σᵢ of the per-label Î2 variance (or its bound) of one mini-batch."""
    o, batch = rec.values, rec.batch
    lam = fam.fisher_output(o)
    top = fam.fisher_output_top_eigenvalue(o) if mode != "exact" else None

    def quadratic(rows: slice, d: Tensor) -> Tensor:  # d (b, n, C) → dᵀΛd or λ_max‖d‖²
        if mode == "exact":
            return torch.einsum("bnc,bcd,bnd->bn", d, lam[rows], d)
        return top[rows].unsqueeze(1) * d.square().sum(-1)

    if result.name == "diag":
        for i, value in engine.hessian_diagonal_terms(batch, quadratic, o.shape[1]).items():
            result.add_squares(i, value)
        return
    if result.name == "trace":
        d = engine.output_hessian_traces(batch, o.shape[1]).to(o.dtype)
        result.add_squares(0, quadratic(slice(None), d.unsqueeze(1)).sum())
        return
    _hessian_blocks(engine, rec, lam, top, result, mode)


def _hessian_blocks(engine: Backend, rec: Recording, lam: Tensor, top: Tensor | None, result: Structure,
                    mode: str) -> None:
    """Î2 variances of ``blocks``/``full`` entries from per-sample output-Hessian columns."""
    layout, batch = engine.layout, rec.batch
    width = rec.values.shape[1]
    blocks = [(None, slice(0, layout.num_params))] if result.name == "full" else \
        [(i, layout.span(i)) for i in range(len(layout.names))]
    row_step = max(1, 2**24 // max(1, width * layout.num_params))
    for start_row in range(0, batch.size, row_step):
        rows = slice(start_row, min(batch.size, start_row + row_step))
        sub = batch.rows(rows)
        step = max(1, 2**24 // max(1, sub.size * width * layout.num_params * 4))
        for index, span in blocks:
            for first in range(span.start, span.stop, step):
                columns = torch.arange(first, min(span.stop, first + step), device=layout.device)
                h = engine.output_hessian_columns(sub, columns)[..., span]  # (m, b, C, block)
                if mode == "exact":
                    values = torch.einsum("mnab,nac,mncb->mb", h, lam[rows], h)
                else:
                    values = torch.einsum("n,mnab->mb", top[rows], h.square())
                result.add_matrix(index, columns - span.start, values)


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
    class_dim: int = -1,
) -> PublicValue:
    """The variance (``mode="exact"``) of an estimator, or one of its bounds, per entry of ``structure``."""
    fam = get_family(family)
    check_choice("estimator", estimator, VARIANCE_ESTIMATORS)
    check_choice("structure", structure, STRUCTURE_NAMES)
    k = check_n_samples(n_samples)
    with ENGINE_LOCK:
        view = ModelView(model, output, class_dim)
        result = make_structure(structure, view.layout)
        engine = make_backend(view, backend)
        n = 0
        for rec, fam_b in run(view, engine, batches(inputs, None, view.device, view.dtype), fam, mask, progress,
                              f"variance[{estimator}]"):
            if estimator == "score":
                _score_batch(engine, rec, fam_b, result, mode)
            else:
                with second_order_support():
                    _hessian_batch(engine, rec, fam_b, result, mode)
            n += rec.batch.size
        if n == 0:
            raise TorchfimError("inputs is empty: pass at least one input (a tensor with batch size ≥ 1)")
        return result.finish(n * n * k)


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
    class_dim: int = -1,
) -> PublicValue:
    """Exact variance of each entry of the Î1 (``score``) or Î2 (``hessian``) estimator.

    Conditional on ``inputs`` (fixed) with ``k = n_samples`` labels per input, as the module
    docstring states: for ``full``/``diag``/``blocks`` the variance of each entry of the estimator
    that :func:`torchfim.fisher` returns with the same arguments; for ``trace`` the variance of the
    trace estimator (not the sum of the diagonal entries' variances). Scales as ``1/(n²k)·Σᵢ``,
    i.e. ``1/(nk)`` for a data set of similar inputs. ``backend``, ``mask``, ``output`` and
    ``class_dim`` as in :func:`torchfim.fisher`.

    ``diag`` and ``trace`` never build ``P×P`` objects: Î2's needs the diagonal of every output
    Hessian ``∇²_θ o_a(xᵢ)``, computed exactly by forward-over-forward differentiation, one
    parameter direction at a time (one unit direction at a time inside dense layers).

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
                       class_dim=class_dim)
