"""Variances of the trace estimators for the model and for each parameter tensor alone, in one pass.

``torchfim report`` shows, for the model and for each parameter tensor ``t`` alone (what the public
functions give with only ``t`` trainable), the variance of the trace estimators Î1 and Î2 with one
label per input and the tightest bound on it. Called per tensor, the public functions take one
pass over the data per tensor and per bound, and for Î2 one sweep of the output-Hessian diagonals
``d_p(xᵢ) = ∂²o(xᵢ)/∂θ_p²`` each (one forward-over-forward pass per entry: minutes on a
transformer). Every one of these figures is a sum over inputs of a function of quantities that add
over tensors (docs/math.md §3, ``1/n²`` as the public functions):

* Î1: the output gram ``Gᵢ = Σ_t G_t(xᵢ)``, ``G_t = J_t J_tᵀ`` over the columns of ``t``;
  ``E[(uᵀGu)²] − (tr ΛG)²`` and its bounds (:meth:`.variance.ScoreVariance.trace_terms`);
* Î2: the trace vector ``dᵢ = Σ_t d_t(xᵢ)``, ``d_t = Σ_{p in t} d_p``; ``dᵀΛd`` and its bound
  ``λ_max(Λ) ‖d‖²`` (:meth:`.variance.HessianVariance.quadratic`), and the diagonal
  ``Var(Î2)_pp = (1/n²) Σᵢ d_pᵀ Λᵢ d_p`` from the same sweep.

So :func:`score_trace_variances` takes one pass (the per-tensor grams of each mini-batch,
:meth:`.engine.backend.Backend.tensor_output_grams`: a dense layer's from its factors, ``‖a‖² G Gᵀ``, at
``C²`` multiply-adds per unit instead of per weight; and their sum) and :func:`hessian_trace_variances` one sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._batches import Inputs
from .engine import backend_name, check_finite_result
from .engine.backend import second_order_support
from .engine.session import engine_pass
from .engine.view import Mask
from .families import Family, get_family
from .process_rows import RowShare
from .structures import Layout
from .variance import HessianVariance, ScoreVariance, squares_layout


@dataclass
class TraceVariances:
    """Variances of a trace estimator (one label per input), in the model's dtype (float32 for a half-precision
    one); the bounds are the tightest that :func:`torchfim.variance_bound` gives (None where not asked for)."""

    variance: Tensor  # of the model's trace estimator, 0-dim
    bound: Tensor | None
    tensor_variances: dict[str, Tensor]  # per parameter tensor alone
    tensor_bounds: dict[str, Tensor] | None
    diag_variance: Tensor | None = None  # Var(Î2)_pp (a P-vector), from the Hessian sweep only


class _Sums:
    """Running sums over inputs: one entry for the model and one per parameter tensor, per quantity."""

    def __init__(self, layout: Layout, keys: tuple[str, ...]) -> None:
        self.layout = layout
        self.total = {key: layout.zeros() for key in keys}
        self.tensors = {key: layout.zeros(len(layout.names)) for key in keys}

    def result(self, n: int, bounded: bool, diag: Tensor | None = None) -> TraceVariances:
        n2, dtype, names = float(n) ** 2, self.layout.dtype, self.layout.names
        total = {key: (value / n2).to(dtype) for key, value in self.total.items()}
        tensors = {key: dict(zip(names, (value / n2).to(dtype).unbind())) for key, value in self.tensors.items()}
        diag = None if diag is None else (diag / n2).to(dtype)
        check_finite_result({**total, **({"diag": diag} if diag is not None else {})},
                            "a variance of a trace estimator", dtype)
        return TraceVariances(total["var"], total["bound"] if bounded else None, tensors["var"],
                              tensors["bound"] if bounded else None, diag)


def score_trace_variances(
    model: nn.Module, inputs: Inputs, family: str | Family = "categorical", *, bounds: bool = True,
    backend: str = "auto", progress: bool = False, mask: Mask = None,
    output: Callable[[object], Tensor] | None = None, class_dim: int | None = None,
) -> TraceVariances:
    """``Var(Tr Î1)`` and (with ``bounds``) its tightest bound, for the model and for each tensor alone,
    in one pass; arguments as in :func:`torchfim.fisher_variance`.

    Example:
        >>> import torch, torchfim
        >>> from torchfim.trace_summary import score_trace_variances
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> x = torch.randn(16, 4, dtype=torch.float64)
        >>> s = score_trace_variances(model, x)
        >>> want = torchfim.variance_bound(model, x, structure="trace")
        >>> bool(torch.isclose(s.bound, want)), sorted(s.tensor_variances)
        (True, ['0.bias', '0.weight', '2.bias', '2.weight'])
    """
    modes = ("var", "spectral", "kurtosis") if bounds else ("var",)
    sums, n = _score_trace_sums(model, inputs, get_family(family), modes, True, backend, progress, mask, output,
                                class_dim)
    return sums.result(n, bounds)


def score_trace_bound(
    model: nn.Module, inputs: Inputs, family: str | Family = "categorical", *, backend: str = "auto",
    progress: bool = False, mask: Mask = None, output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None, share: RowShare | None = None,
) -> Tensor:
    """The tightest bound on ``Var(Tr Î1)`` (one label per input) that :func:`torchfim.variance_bound` gives: the sum
    over inputs of the smaller of each input's spectral and kurtosis terms, both from one pass, for the model alone
    (none of :func:`score_trace_variances`' per-tensor terms nor the exact variance). With ``share`` (a process's
    rows, :func:`torchfim.process_rows.row_share`), over every process's inputs: each sums the terms of its own rows,
    ``S_r``, and the bound is ``Σ_r S_r / N²`` (:meth:`~torchfim.process_rows.RowShare.mean` of ``S_r / n_r²``), one
    process's over all the inputs to rounding."""

    def compute() -> tuple[Tensor, int]:
        sums, n = _score_trace_sums(model, inputs, get_family(family), ("spectral", "kurtosis"), False, backend,
                                    progress, mask, output, class_dim, share, screened=True)
        bound = sums.total["bound"] / float(max(n, 1)) ** 2  # a process's share may be empty
        check_finite_result({"bound": bound}, "a variance bound of the trace estimator", sums.layout.dtype)
        return bound.to(sums.layout.dtype), n

    if share is None:
        return compute()[0]
    bound, n = share.together(compute, model)
    return share.mean(None, bound, n, model)[1]


def _score_trace_sums(model: nn.Module, inputs: Inputs, fam: Family, modes: tuple[str, ...], per_tensor: bool,
                      backend: str, progress: bool, mask: Mask, output: Callable[[object], Tensor] | None,
                      class_dim: int | None, share: RowShare | None = None, screened: bool = False) -> tuple[_Sums, int]:
    """The sums over inputs of :meth:`.variance.ScoreVariance.trace_terms` of the model's output gram, per mode
    (``"var"`` the exact variance) and, with ``per_tensor``, of each tensor's own gram; and the inputs counted.
    With both bounds' modes, ``"bound"`` too: the sum of each input's smaller bound term (each input's term bounds its
    own variance, so the sum of the smaller ones bounds the whole, never above the smaller of the two sums). With
    ``share``, over this process's rows alone (its model's outputs probed for the processes' check). ``screened``: only
    ``"bound"`` is read, so the kurtosis terms are exact only where they are the smaller (:func:`_input_terms`)."""
    forms_of = {"var": "exact", "spectral": "spectral", "kurtosis": "kurtosis"}
    with engine_pass(model, backend_name(backend, None), output, class_dim) as one:
        sums = _Sums(squares_layout(one.view.layout), modes + ("bound",) * ("kurtosis" in modes))
        for rec, fam_b in one.batches(inputs, None, fam, mask, progress, "variance[score]", split=True, whole=True,
                                      grams=True,  # an output Gram matrix per input, per tensor and in all
                                      rows=None if share is None else share.rows):
            forms = [ScoreVariance(one.backend, rec, fam_b, forms_of[mode]) for mode in modes]
            gram = None  # G = Σ_t G_t per input, (B, C, C)
            for rows, grams in one.backend.tensor_output_grams(rec):
                for i, own in grams.items():  # G_t (b, C, C)
                    if per_tensor:
                        for key, terms in _input_terms(modes, forms, rows, own).items():
                            sums.tensors[key][i] += terms.sum().to(sums.tensors[key].dtype)
                    if gram is None:
                        gram = own.new_zeros(rec.batch.size, *own.shape[1:])
                    gram[rows] += own
            if gram is not None:
                for key, terms in _input_terms(modes, forms, slice(0, rec.batch.size), gram, screened).items():
                    sums.total[key] += terms.sum().to(sums.total[key].dtype)
        if share is not None:
            share.probe(one.view)
        return sums, one.n


def _input_terms(modes: tuple[str, ...], forms: list[ScoreVariance], rows: slice, gram: Tensor,
                 screened: bool = False) -> dict[str, Tensor]:
    """Each mode's per-input terms for the output grams ``gram`` of ``rows``, and with both bounds their minimum; with
    ``screened`` the kurtosis terms that the spectral ones (the modes' order) undercut are left inexact, above them."""
    terms: dict[str, Tensor] = {}
    for key, form in zip(modes, forms):
        terms[key] = form.trace_terms(rows, gram, terms.get("spectral") if screened and key == "kurtosis" else None)
    if "kurtosis" in terms:
        terms["bound"] = torch.minimum(terms["spectral"], terms["kurtosis"])
    return terms


def hessian_trace_variances(
    model: nn.Module, inputs: Inputs, family: str | Family = "categorical", *, backend: str = "auto",
    progress: bool = False, mask: Mask = None, output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
) -> TraceVariances:
    """``Var(Tr Î2)`` and its bound for the model and for each tensor alone, and the diagonal
    ``Var(Î2)_pp``, from one sweep; arguments as in :func:`torchfim.fisher_variance`.

    Example:
        >>> import torch, torchfim
        >>> from torchfim.trace_summary import hessian_trace_variances
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> x = torch.randn(16, 4, dtype=torch.float64)
        >>> s = hessian_trace_variances(model, x)
        >>> want = torchfim.fisher_variance(model, x, estimator="hessian", structure="trace")
        >>> bool(torch.isclose(s.variance, want)), s.diag_variance.shape
        (True, torch.Size([67]))
    """
    fam = get_family(family)
    with engine_pass(model, backend_name(backend, None), output, class_dim) as one:
        layout = squares_layout(one.view.layout)
        sums, diag = _Sums(layout, ("var", "bound")), layout.zeros(layout.num_params)
        for rec, fam_b in one.batches(inputs, None, fam, mask, progress, "variance[hessian]", split=True):
            forms = [HessianVariance(one.backend, rec, fam_b, mode) for mode in ("exact", "spectral")]
            o = rec.values
            with second_order_support():
                terms, traces = one.backend.output_hessian_sweep(rec.batch, o.shape[1], forms[0].quadratic,
                                                                 by_tensor=True)
            for i, value in terms.items():
                diag[layout.span(i)] += value.reshape(-1).to(diag.dtype)
            traces = traces.to(o.dtype)  # d_t: (B, T, C)
            for key, form in zip(("var", "bound"), forms):
                sums.tensors[key] += form.quadratic(slice(None), traces).sum(0).to(diag.dtype)
                sums.total[key] += form.quadratic(slice(None), traces.sum(1, keepdim=True)).sum().to(diag.dtype)
        return sums.result(one.n, True, diag)
