"""``torchfim.fisher``: the Fisher information of a model and its estimators.

For inputs ``x_1..x_n`` (fixed) with per-sample Jacobians ``Jᵢ = ∂o(xᵢ)/∂θ`` and
output Fishers ``Λᵢ = Λ(o(xᵢ))`` (see :mod:`torchfim.families`), with
``k = n_samples`` labels ``y_ij ~ p(·|xᵢ)`` per input and output scores
``u_ij = ∇_o log p(y_ij|o(xᵢ))``:

* ``exact``     ``I = (1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ``  (closed-form expectation over labels)
* ``score``     Î1 ``= (1/(nk)) Σᵢⱼ Jᵢᵀ u_ij u_ijᵀ Jᵢ``
* ``hessian``   Î2 ``= (1/(nk)) Σᵢⱼ [Jᵢᵀ Λᵢ Jᵢ − Σ_a u_ij,a ∇²_θ o_a(xᵢ)]``
* ``empirical`` ``(1/n) Σᵢ Jᵢᵀ uᵢ uᵢᵀ Jᵢ`` with the true targets ``yᵢ`` (biased)

Î1 and Î2 are unbiased for ``I``. All are means over inputs (and labels).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ._batches import Inputs, iter_batches
from ._fastpath import METHODS, FastPath, Recording, choose_path
from ._functional import FunctionalModel
from ._memory import fits_in_memory
from .errors import TorchfimError, check_choice, check_n_samples
from .families import Family, get_family

ESTIMATORS = ("exact", "score", "hessian", "empirical")
STRUCTURES = ("full", "diag", "trace", "layers")

FisherResult = Tensor | dict[str, Tensor]


class _Accumulator:
    """Running sum of one structure of ``Σ Gᵀ G`` and of Hessian columns."""

    def __init__(self, structure: str, fm: FunctionalModel) -> None:
        self.structure = structure
        self.fm = fm
        kw = {"dtype": fm.dtype, "device": fm.device}
        if structure == "full":
            self.value: FisherResult = torch.zeros(fm.num_params, fm.num_params, **kw)
        elif structure == "diag":
            self.value = torch.zeros(fm.num_params, **kw)
        elif structure == "trace":
            self.value = torch.zeros((), **kw)
        else:
            self.value = {n: torch.zeros(s, s, **kw) for n, s in zip(fm.names, fm.sizes)}

    def mean(self, n: int) -> FisherResult:
        """The sum divided by ``n``."""
        return _map(self.value, lambda v: v / n)

    def add_gram(self, g: Tensor, scale: float) -> None:
        """Add ``scale · gᵀ g`` for rows ``g`` (R, P) of per-sample products."""
        if self.structure == "full":
            self.value.addmm_(g.T, g, alpha=scale)
        elif self.structure == "diag":
            self.value.add_((g * g).sum(0), alpha=scale)
        elif self.structure == "trace":
            self.value.add_((g * g).sum(), alpha=scale)
        else:
            for name, offset, size in zip(self.fm.names, self.fm.offsets, self.fm.sizes):
                block = g[:, offset : offset + size]
                self.value[name].addmm_(block.T, block, alpha=scale)

    def add_hessian_columns(self, columns: Tensor, h: Tensor, scale: float, param: int) -> None:
        """Add ``scale ·`` the Hessian columns ``h`` (m, P) of indices ``columns`` inside parameter ``param``."""
        diagonal = h[torch.arange(len(columns)), columns]
        if self.structure == "full":
            self.value[:, columns] += scale * h.T
        elif self.structure == "diag":
            self.value[columns] += scale * diagonal
        elif self.structure == "trace":
            self.value.add_(diagonal.sum(), alpha=scale)
        else:
            offset, size = self.fm.offsets[param], self.fm.sizes[param]
            block = self.value[self.fm.names[param]]
            block[:, columns - offset] += scale * h[:, offset : offset + size].T



def _check_dense(structure: str, fm: FunctionalModel) -> None:
    if structure == "full":
        entries, what = fm.num_params**2, f"a {fm.num_params}×{fm.num_params} matrix"
    elif structure == "layers":
        entries, what = sum(s * s for s in fm.sizes), "one dense block per parameter tensor"
    else:
        return
    ok, needed, free = fits_in_memory(entries, fm.dtype, fm.device)
    if not ok:
        raise TorchfimError(
            f"structure={structure!r} needs {what} (about {needed:.1f} GiB with working memory) but only "
            f"{free:.1f} GiB is available on {fm.device}; use structure='diag' or 'trace', or freeze "
            "parameters you do not need with p.requires_grad_(False)"
        )


def _hessian_column_chunks(fm: FunctionalModel, batch: int, width: int) -> Iterator[tuple[int, Tensor]]:
    """Parameter index and a chunk of flat column indices inside it, covering every parameter."""
    step = fm.column_chunk(batch, width)
    for param, (offset, size) in enumerate(zip(fm.offsets, fm.sizes)):
        for start in range(offset, offset + size, step):
            stop = min(offset + size, start + step)
            yield param, torch.arange(start, stop, device=fm.device)


def fisher(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    estimator: str = "exact",
    structure: str = "diag",
    n_samples: int = 1,
    targets: Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    return_stderr: bool = False,
    method: str = "auto",
    progress: bool = False,
) -> FisherResult | tuple[FisherResult, FisherResult]:
    """Fisher information of ``model`` over ``inputs`` under its own predictive distribution.

    Computes the data-set FIM ``I = (1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` (``estimator="exact"``) or one
    of its estimators (``"score"`` = Î1, ``"hessian"`` = Î2, ``"empirical"`` with
    true targets); see the module docstring for the formulas. Means over inputs
    and over the ``n_samples`` labels drawn per input.

    Args:
        model: any ``nn.Module`` mapping a batch of inputs to outputs ``(B, C)``
            that treats samples independently (call ``model.eval()`` for
            BatchNorm or Dropout). θ = its ``requires_grad`` parameters in
            ``model.parameters()`` order.
        inputs: a tensor whose first dimension is the batch, or an iterable of
            mini-batches (tensors or ``(inputs, targets)`` pairs, e.g. a DataLoader).
        family: output family name or :class:`~torchfim.families.Family`.
        estimator: ``"exact"``, ``"score"``, ``"hessian"`` or ``"empirical"``.
        structure: ``"full"`` (P×P), ``"diag"`` (P), ``"trace"`` (0-dim) or
            ``"layers"`` (dict: parameter name → its diagonal block).
        n_samples: labels drawn per input for ``score`` and ``hessian``.
        targets: true targets, required by ``empirical`` (or carried by the batches).
        generator: ``torch.Generator`` for label sampling (global RNG when None).
        return_stderr: also return the standard error of each entry, the square
            root of :func:`torchfim.fisher_variance` (closed form, conditional on
            the inputs). ``exact`` has none; ``empirical`` has no label
            randomness given the targets (its error is a bias): both get zeros.
        method: ``"auto"`` (default) uses the per-layer fast path when every
            trainable parameter sits in an ``nn.Linear`` or ``nn.Conv2d`` and the
            ``torch.func`` path otherwise; ``"functional"`` forces the general
            path, ``"layers"`` the fast one. Both give the same result.
        progress: show a progress bar over mini-batches.

    Returns:
        The requested structure, on the model's device in the model's dtype;
        with ``return_stderr=True`` a pair ``(estimate, stderr)`` of that structure.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(32, 4)
        >>> torchfim.fisher(model, x, structure="trace").shape
        torch.Size([])
        >>> F = torchfim.fisher(model, x, estimator="score", structure="diag", n_samples=4,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> F.shape
        torch.Size([67])
    """
    fam = get_family(family)
    check_choice("estimator", estimator, ESTIMATORS)
    check_choice("structure", structure, STRUCTURES)
    check_choice("method", method, METHODS)
    k = check_n_samples(n_samples)
    fm = FunctionalModel(model)
    _check_dense(structure, fm)
    if estimator == "empirical" and targets is None and isinstance(inputs, Tensor):
        raise TorchfimError(
            "estimator='empirical' uses the true labels: pass targets=... (one per input), "
            "or use estimator='exact' for the Fisher under the model's own distribution"
        )

    acc = _Accumulator(structure, fm)
    n = 0
    fast: FastPath | None = None
    batches_seen: list[Tensor] = []  # kept only for return_stderr, to revisit the same inputs
    for x, y in tqdm(iter_batches(inputs, targets), desc=f"fisher[{estimator}]", unit="batch", disable=not progress):
        x = fm.prepare_inputs(x)
        if x.shape[0] == 0:
            continue
        if return_stderr:
            batches_seen.append(x)
        if n == 0:
            fast = choose_path(fm, method, x)
        rec = None
        if fast is not None and structure in ("diag", "trace"):
            # A batch whose diag/trace products fit one chunk: one recorded forward serves it all.
            width = {"score": k, "empirical": 1}.get(estimator, fast.output_width)
            if fast.whole_batch(x.shape[0], width):
                rec = fast.record(x)
        o = rec.output.detach() if rec is not None else fm.outputs(x)
        fam.check_output(o)
        if n == 0:
            fm.check_independent(x, o)
        if estimator in ("exact", "hessian"):
            vectors, scale = fam.fisher_output_sqrt(o).transpose(-1, -2), 1.0
        elif estimator == "score":
            vectors, scale = fam.output_score(fam.sample(o, k, generator), o), 1.0 / k
        else:
            if y is None:
                raise TorchfimError(
                    "estimator='empirical' uses the true labels but a mini-batch came without targets; "
                    "pass targets=... or yield (inputs, targets) pairs"
                )
            if not isinstance(y, Tensor):
                y = torch.as_tensor(y)
            vectors, scale = fam.output_score(fam.check_targets(y.to(o.device), o), o).unsqueeze(1), 1.0
        _add_products(acc, fm, fast, x, vectors, scale, rec)
        if estimator == "hessian":
            # Σⱼ Σ_a u_ij,a ∇²o_a(xᵢ) = ∇²_θ (Σⱼ u_ij)ᵀ o(xᵢ) with the scores held fixed.
            weights = fam.output_score(fam.sample(o, k, generator), o).sum(1)
            _add_hessian_term(acc, fm, fast, x, weights, -1.0 / k)
        n += x.shape[0]

    if n == 0:
        raise TorchfimError("inputs is empty: pass at least one input (a tensor with batch size ≥ 1)")
    estimate = acc.mean(n)
    if not return_stderr:
        return estimate
    if estimator in ("exact", "empirical"):
        variance = _map(estimate, torch.zeros_like)
    else:
        from .variance import fisher_variance  # variance builds on this module

        variance = fisher_variance(model, batches_seen, family=fam, estimator=estimator, structure=structure,
                                   n_samples=k, method=method)
    return estimate, _map(variance, lambda v: v.clamp_min(0).sqrt())


def _map(result: FisherResult, fn) -> FisherResult:
    """Apply ``fn`` to a result tensor or to every block of a ``layers`` dict."""
    if isinstance(result, dict):
        return {name: fn(block) for name, block in result.items()}
    return fn(result)


def _add_products(
    acc: _Accumulator,
    fm: FunctionalModel,
    fast: FastPath | None,
    x: Tensor,
    vectors: Tensor,
    scale: float,
    rec: Recording | None,
) -> None:
    """Add ``scale · Σᵢⱼ (Jᵢᵀ v_ij)(Jᵢᵀ v_ij)ᵀ`` (in ``acc``'s structure) for one mini-batch.

    ``rec`` is the batch's recorded forward when the fast path can use it whole.
    """
    m = vectors.shape[1]
    if rec is not None:
        squares = fast.recorded_squares(rec, vectors)
        acc.value.add_(squares if acc.structure == "diag" else squares.sum(), alpha=scale)
        return
    if fast is None:
        for rows in fm.sample_chunks(x.shape[0], m):
            _, g = fm.vector_jacobian(x[rows], vectors[rows])
            acc.add_gram(g.reshape(-1, fm.num_params), scale)
        return
    for rows in fast.sample_chunks(x.shape[0], m, acc.structure):
        _, inputs, sens = fast.sensitivities(x[rows], vectors[rows])
        if acc.structure == "diag":
            acc.value.add_(fast.diag_squares(inputs, sens), alpha=scale)
        elif acc.structure == "trace":
            acc.value.add_(fast.diag_squares(inputs, sens).sum(), alpha=scale)
        else:
            acc.add_gram(fast.per_sample_rows(inputs, sens).reshape(-1, fm.num_params), scale)


def _add_hessian_term(
    acc: _Accumulator, fm: FunctionalModel, fast: FastPath | None, x: Tensor, weights: Tensor, scale: float
) -> None:
    """Add ``scale · ∇²_θ Σᵢ wᵢᵀ o(xᵢ)`` (in ``acc``'s structure) for one mini-batch."""
    if fast is not None and fast.dense and acc.structure in ("diag", "trace"):
        inputs, diagonals = fast.unit_hessian_diagonals(x)
        if acc.structure == "diag":
            per_unit = [torch.einsum("na,nau->nu", weights, d) for d in diagonals]
            acc.value.add_(fast.spread_units(inputs, per_unit, power=2), alpha=scale)
        else:
            acc.value.add_((weights * fast.unit_traces(inputs, diagonals)).sum(), alpha=scale)
        return
    for param, columns in _hessian_column_chunks(fm, x.shape[0], weights.shape[1]):
        acc.add_hessian_columns(columns, fm.hessian_columns(x, weights, columns), scale, param)
