"""Closed-form covariance of the Fisher estimators Î1 and Î2 drawn from the same labels (docs/math.md §8.2).

When both estimators use the same ``k`` labels per input (``estimator="combined"``), one label's
terms ``Z1 = (uᵀj_p)(uᵀj_q)`` and ``Z2 = I(θ|x)_pq − uᵀh_pq`` have ``Cov(Z1, Z2) = −T[j_p, j_q, h_pq]``
(``E[u] = 0``), with ``T = E[u⊗u⊗u]`` the third moment of the output score. Conditional on the
inputs ``x_1..x_n``, as for the variances (§3.1):

* entries: ``Cov(Î1, Î2)_pq = −(1/(n²k)) Σᵢ Tᵢ[j_p, j_q, h_pq]``,  ``j_p = ∂o(xᵢ)/∂θ_p``,
  ``h_pq = ∂²o(xᵢ)/∂θ_p∂θ_q``;
* trace: ``Cov(Tr Î1, Tr Î2) = −(1/(n²k)) Σᵢ Tᵢ[Kᵢ, dᵢ]``, ``Tᵢ[K, d] = Σ_abc K_ab d_c T_abc``,
  with ``Kᵢ = JᵢJᵢᵀ`` and ``(dᵢ)_a = tr ∇²_θ o_a(xᵢ)``.

The contractions ``T[a, b, c]`` are the family's :meth:`~torchfim.families.Family.moment3`, which
never forms the ``C³`` tensor for the four classic families. With independent labels for Î1 and
Î2 the covariance is 0 (§8.3).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from ._batches import Inputs
from ._identity import identity_like
from .engine import (
    Backend,
    Recording,
    backend_name,
    check_finite_result,
)
from .engine.backend import CHUNK_ELEMENTS, Pieces, is_trace, second_order_support
from .engine.session import engine_pass
from .engine.view import Mask
from .errors import check_choice, check_n_samples
from .families import Family, get_family
from .keyword_hints import explains_keywords
from .structures import (
    STRUCTURE_NAMES,
    Blocks,
    Diag,
    Full,
    PublicValue,
    Structure,
    StructureVisitor,
    Trace,
    make_structure,
)
from .variance import squares_layout, widened


class ScoreHessianCovariance(StructureVisitor):
    """Add ``Σᵢ Cov(Z1, Z2) = −Σᵢ Tᵢ[j_p, j_q, h_pq]`` (one label per input) of a batch to a structure."""

    def __init__(self, engine: Backend, rec: Recording, fam: Family) -> None:
        self.engine, self.rec, self.fam = engine, rec, fam
        self.o = widened(rec.values)

    def trace(self, structure: Trace) -> None:
        o = self.o
        gram = self.engine.output_gram(self.rec).to(o.dtype)  # Kᵢ (B, C, C)
        d = self.engine.output_hessian_traces(self.rec.batch, o.shape[1]).to(o.dtype)  # dᵢ (B, C)
        # T[K, d] = Σ_ab K_ab T[e_a, e_b, d] = Σ_a T[e_a, K e_a, d]: C contractions, no C³ tensor.
        eye = identity_like(o.shape[1], o).expand_as(gram)
        third = self.fam.moment3(o, eye, gram, d.unsqueeze(1).expand_as(gram))  # (B, C)
        structure.add_squares(0, -third.sum())

    def diag(self, structure: Diag) -> None:
        layout = self.engine.layout
        total: dict[int, Tensor] = {}
        curved = set(self.engine.curved(self.rec.batch))  # the others have zero diagonals d_p
        for rows, piece in self.engine.jacobian_pieces(self.rec):
            sub, o, fam = self.rec.batch.rows(rows), self.o[rows], self.fam.for_rows(rows)
            for i, columns in self.engine.direction_chunks(sub, [i for i in sorted(piece) if i in curved]):
                g = piece[i]  # (b, C, size), the Jacobian columns j_p of parameter i
                local = total.setdefault(i, g.new_zeros(layout.sizes[i]))
                entries = slice(int(columns[0]) - layout.offsets[i], int(columns[-1]) + 1 - layout.offsets[i])
                d = self.engine.output_hessian_diagonals(sub, columns).transpose(0, 1)  # d_p: (b, m, C)
                j = g[:, :, entries].transpose(1, 2).to(d.dtype)  # j_p: (b, m, C)
                local[entries] -= fam.moment3(o, j, j, d).sum(0).to(local.dtype)
        for i, value in total.items():
            structure.add_squares(i, value)

    def blocks(self, structure: Blocks) -> None:
        layout = self.engine.layout  # a parameter the outputs are piecewise linear in has a zero block
        self._pairs(structure, [(i, layout.span(i)) for i in self.engine.curved(self.rec.batch)])

    def full(self, structure: Full) -> None:
        self._pairs(structure, [(None, slice(0, self.engine.layout.num_params))])

    def _pairs(self, structure: Structure, blocks: list[tuple[int | None, slice]]) -> None:
        """Dense entries ``−Σᵢ Tᵢ[j_p, j_q, h_pq]`` block by block, from per-sample Jacobians and
        output-Hessian columns of the same samples."""
        layout, batch = self.engine.layout, self.rec.batch
        width, size = self.o.shape[1], layout.num_params
        row_step = max(1, CHUNK_ELEMENTS // max(1, width * size))
        for rows, piece in self.engine.jacobian_pieces(self.rec):
            jac = self._dense_jacobian(piece, rows)  # (b, C, P)
            for start in range(rows.start, rows.stop, row_step):
                part = slice(start, min(rows.stop, start + row_step))
                sub = batch.rows(part)
                j = jac[part.start - rows.start : part.stop - rows.start]
                extra = 4 * sub.size * width * size  # the output-Hessian columns themselves
                for index, span, columns in self.engine.directions.chunks(sub, blocks, "output-Hessian columns", extra):
                    h = self.engine.output_hessian_columns(sub, columns)[..., span]  # (m, b, C, block)
                    values = self._contract(part, j[:, :, columns], j[:, :, span], h)
                    structure.add_matrix(index, columns - span.start, -values)

    def _dense_jacobian(self, piece: Pieces, rows: slice) -> Tensor:
        """The per-sample Jacobians of ``rows`` over all of θ, ``(b, C, P)`` (zero where a parameter
        does not reach the outputs)."""
        layout = self.engine.layout
        b = len(range(*rows.indices(self.rec.batch.size)))
        jac = self.o.new_zeros(b, self.o.shape[1], layout.num_params)
        for i, g in piece.items():
            jac[:, :, layout.span(i)] = g.to(jac.dtype)
        return jac

    def _contract(self, rows: slice, jp: Tensor, jq: Tensor, h: Tensor) -> Tensor:
        """``Σᵢ Tᵢ[j_p, j_q, h_pq]`` over the samples ``rows``: columns ``jp`` (b, C, m), ``jq`` (b, C, q),
        ``h`` (m, b, C, q) → (m, q)."""
        b, c, m = jp.shape
        q = jq.shape[-1]
        a = jp.transpose(1, 2).unsqueeze(2).expand(b, m, q, c).reshape(b, m * q, c)
        w = jq.transpose(1, 2).unsqueeze(1).expand(b, m, q, c).reshape(b, m * q, c)
        z = h.permute(1, 0, 3, 2).reshape(b, m * q, c).to(a.dtype)
        return self.fam.for_rows(rows).moment3(self.o[rows], a, w, z).sum(0).reshape(m, q)


def covariance_of(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family,
    structure: str,
    n_samples: int,
    *,
    backend: str = "auto",
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
) -> PublicValue:
    """``Cov(Î1, Î2)`` from shared labels per entry of ``structure`` (the loop of :func:`fisher_covariance`)."""
    fam = get_family(family)
    check_choice("structure", structure, STRUCTURE_NAMES)
    k = check_n_samples(n_samples)
    with engine_pass(model, backend, output, class_dim) as one:
        result = make_structure(structure, squares_layout(one.view.layout))
        # A closed form that draws nothing: large mini-batches go in row groups.
        for rec, fam_b in one.batches(inputs, None, fam, mask, progress, "covariance[score, hessian]", split=True,
                                      whole=True, grams=is_trace(result)):
            with second_order_support():
                result.visit(ScoreHessianCovariance(one.backend, rec, fam_b))
        value = result.finish(one.n * one.n * k)
        check_finite_result(value, "the covariance of Î1 and Î2", squares_layout(one.view.layout).dtype)
        return value


@explains_keywords
def fisher_covariance(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    structure: str = "diag",
    n_samples: int = 1,
    *,
    backend: str = "auto",
    method: str | None = None,
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
) -> PublicValue:
    """Exact covariance of each entry of Î1 (``score``) with the same entry of Î2 (``hessian``)
    when both are computed from the same ``k = n_samples`` labels per input.

    Conditional on ``inputs``, as the module docstring states (docs/math.md §8.2):
    ``Cov(Î1, Î2)_pq = −(1/(n²k)) Σᵢ Tᵢ[j_p, j_q, h_pq]`` for ``full``/``diag``/``blocks``, and for
    ``trace`` the covariance of the two trace estimators, ``−(1/(n²k)) Σᵢ Tᵢ[JᵢJᵢᵀ, dᵢ]``. It needs
    the family's third moments (zero for the Gaussian) and the second derivatives of the outputs, as
    the Î2 variance does; ``diag`` and ``trace`` never build ``P×P`` objects. ``family``, ``structure``,
    ``n_samples`` (``k``), ``backend`` (``method`` is its deprecated name), ``progress`` (a progress bar over the
    inputs), ``mask``, ``output`` and ``class_dim`` as in :func:`torchfim.fisher`. The variance-minimising combination
    of the two estimators is :func:`torchfim.fisher` with ``estimator="combined"``.

    Example:
        >>> import torch, torchfim
        >>> from torchfim.covariance import fisher_covariance
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> fisher_covariance(model, x, structure="diag").shape
        torch.Size([67])
        >>> float(fisher_covariance(model, x, family="gaussian", structure="trace"))  # no third moments
        0.0
    """
    return covariance_of(model, inputs, family, structure, n_samples, backend=backend_name(backend, method),
                         progress=progress, mask=mask, output=output, class_dim=class_dim)
