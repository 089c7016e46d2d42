"""Upper bounds on the variances of Î1 and Î2 (docs/math.md §4).

Each bound replaces a moment contraction of :mod:`torchfim.variance` by a spectral norm, per input:

* Î1, spectral:  ``E[(uᵀv)²(uᵀw)²] ≤ λ_max(M) ‖v‖²‖w‖²`` and ``E[(uᵀKu)²] ≤ λ_max(M) ‖K‖_F²``, with
  ``M = E[vec(uuᵀ) vec(uuᵀ)ᵀ]`` (``C²×C²``, positive semi-definite; computed structure-aware by the
  family, never as a ``C⁴`` tensor where the family knows better);
* Î1, kurtosis:  ``E‖u‖⁴`` in place of ``λ_max(M)`` for entries, ``E[(uᵀKu)²] ≤ ‖K‖₂² E‖u‖⁴`` for the trace;
* Î2, spectral:  ``hᵀΛh ≤ λ_max(Λ) ‖h‖²``.

With a ``mask`` (or class labels of -100), every per-input term is over the observed positions alone: ``‖j_p‖²``,
``K = JJᵀ`` and ``d`` count no masked output (docs/math.md §5.4), so the bounds do not move with a masked position's
output. The keyword ``options`` (``backend``, ``mask``, ``output``, ``class_dim``, ``progress``,
``across_processes``) are as in :func:`torchfim.fisher`. Across processes, each bound is that of the estimator over
every process's inputs: its per-input terms combine as the variance's do, ``Σ_r (n_r/N)² B_r``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

from ._batches import Inputs
from ._processes import announced
from ._settings_digest import family_settings
from .errors import check_n_samples
from .families import Family, get_family
from .keyword_hints import explains_keywords
from .process_rows import FAILED_BEFORE, row_share
from .structures import PublicValue, Trace, structure_class
from .trace_summary import score_trace_bound
from .variance import check_variance_estimator, variance_of

#: The arguments of the three bounds, appended to their docstrings by :func:`_with_arguments`.
_ARGUMENTS = """
    Args:
        model: the model, as in :func:`torchfim.fisher`.
        inputs: the inputs the bound is conditional on, as in :func:`torchfim.fisher`.
        family: output family name or :class:`~torchfim.families.Family`.
        structure: ``"full"``, ``"diag"``, ``"trace"`` or ``"blocks"``, as in :func:`torchfim.fisher_variance`.
        n_samples: the labels per input ``k`` of the estimator whose variance is bounded.
        **options: ``backend``, ``progress``, ``mask``, ``output``, ``class_dim`` and ``across_processes``, as in
            :func:`torchfim.fisher`; any other keyword raises ``TypeError``.
"""


#: The keywords the bounds' ``**options`` take: :func:`~torchfim.variance.variance_of`'s keyword-only arguments.
OPTIONS = tuple(name for name, p in inspect.signature(variance_of).parameters.items() if p.kind == p.KEYWORD_ONLY)


def _explained(function: Callable) -> Callable:
    """``function``, refusing a keyword that neither it nor its ``**options`` take, with what to pass instead."""
    return explains_keywords(function, OPTIONS)


def _with_arguments(function: Callable) -> Callable:
    """``function`` with :data:`_ARGUMENTS` at the end of its docstring, its keywords checked (:func:`_explained`)."""
    function.__doc__ = (function.__doc__ or "").rstrip() + "\n" + _ARGUMENTS
    return _explained(function)


@announced(FAILED_BEFORE)
@_with_arguments
def score_variance_bound_spectral(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    structure: str = "diag",
    n_samples: int = 1,
    **options: object,
) -> PublicValue:
    """Upper bound on ``Var(Î1)`` through the largest eigenvalue of the fourth moment of ``u``.

    Per input, with ``M = E[vec(uuᵀ) vec(uuᵀ)ᵀ]`` (``C²×C²``, positive semi-definite):
    ``E[(uᵀv)²(uᵀw)²] = ⟨v⊗v, M (w⊗w)⟩ ≤ λ_max(M) ‖v‖²‖w‖²`` by Cauchy–Schwarz, so

    ``Var(Î1)_pq ≤ (1/(n²k)) Σᵢ (λ_max(Mᵢ) ‖j_p‖² ‖j_q‖² − I(θ|xᵢ)_pq²)``, and
    ``Var(Tr Î1) ≤ (1/(n²k)) Σᵢ (λ_max(Mᵢ) ‖JᵢJᵢᵀ‖_F² − (tr I(θ|xᵢ))²)``.

    Assumptions: the output family of docs/math.md §1 (``E[uuᵀ] = Λ``); none on the
    network. Equality: one output per input (``C = 1``), where the two come out equal to rounding (the
    bound may then be an ulp below :func:`~torchfim.fisher_variance`). A bound of the kind Soen & Sun
    (2021) give for Î1, derived here in their setting: the paper's own statement could not
    be recovered (docs/math.md, Sources).

    Example:
        >>> import torch, torchfim
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(16, 4, dtype=torch.float64)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> variance = torchfim.fisher_variance(model, x)
        >>> bool((torchfim.score_variance_bound_spectral(model, x) >= variance).all())
        True
        >>> binary = torch.nn.Linear(4, 1).double()  # C = 1: the bound is the variance
        >>> torch.allclose(torchfim.score_variance_bound_spectral(binary, x, family="bernoulli"),
        ...                torchfim.fisher_variance(binary, x, family="bernoulli"))
        True
    """
    return variance_of(model, inputs, family, "score", structure, n_samples, "spectral", **options)


@announced(FAILED_BEFORE)
@_with_arguments
def score_variance_bound_kurtosis(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    structure: str = "diag",
    n_samples: int = 1,
    **options: object,
) -> PublicValue:
    """Upper bound on ``Var(Î1)`` through ``E‖u‖⁴`` (no eigen-decomposition needed).

    ``|uᵀv| ≤ ‖u‖‖v‖`` gives ``E[(uᵀv)²(uᵀw)²] ≤ E‖u‖⁴ ‖v‖²‖w‖²`` and
    ``E[(uᵀKu)²] ≤ ‖K‖₂² E‖u‖⁴``, so

    ``Var(Î1)_pq ≤ (1/(n²k)) Σᵢ (E‖u‖⁴ ‖j_p‖²‖j_q‖² − I(θ|xᵢ)_pq²)`` and
    ``Var(Tr Î1) ≤ (1/(n²k)) Σᵢ (E‖u‖⁴ ‖JᵢJᵢᵀ‖₂² − (tr I(θ|xᵢ))²)``.

    Never tighter than :func:`score_variance_bound_spectral` for entries
    (``λ_max(M) ≤ E‖u‖⁴``) but may be for the trace. Equality: ``C = 1``.

    Example:
        >>> import torch, torchfim
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(16, 4, dtype=torch.float64)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> kurtosis = torchfim.score_variance_bound_kurtosis(model, x)
        >>> bool((kurtosis >= torchfim.score_variance_bound_spectral(model, x)).all())  # entries: never tighter
        True
    """
    return variance_of(model, inputs, family, "score", structure, n_samples, "kurtosis", **options)


@announced(FAILED_BEFORE)
@_with_arguments
def hessian_variance_bound_spectral(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    structure: str = "diag",
    n_samples: int = 1,
    **options: object,
) -> PublicValue:
    """Upper bound on ``Var(Î2)`` through the largest eigenvalue of ``Λ``.

    ``hᵀΛh ≤ λ_max(Λ) ‖h‖²`` gives
    ``Var(Î2)_pq ≤ (1/(n²k)) Σᵢ λ_max(Λᵢ) ‖∂²o(xᵢ)/∂θ_p∂θ_q‖²`` and
    ``Var(Tr Î2) ≤ (1/(n²k)) Σᵢ λ_max(Λᵢ) ‖dᵢ‖²`` with ``d_a = tr ∇²_θ o_a``.

    Assumptions: docs/math.md §1 families; none on the network. Equality when
    ``Λ ∝ I`` (the fixed-σ Gaussian, any ``C = 1`` family). Like the exact
    variance it vanishes wherever ``∇²_θ o`` does (inside ReLU layers, the last
    linear layer). A bound of the kind Soen & Sun (2021) give for Î2, derived here in their
    setting: the paper's own statement could not be recovered (docs/math.md, Sources).

    Example:
        >>> import torch, torchfim
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(16, 4, dtype=torch.float64)
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> bound = torchfim.hessian_variance_bound_spectral(model, x)
        >>> bool((bound >= torchfim.fisher_variance(model, x, estimator="hessian")).all()), float(bound[-27:].max())
        (True, 0.0)
        >>> torch.allclose(torchfim.hessian_variance_bound_spectral(model, x, family="gaussian"),  # Λ = I: equal
        ...                torchfim.fisher_variance(model, x, family="gaussian", estimator="hessian"))
        True
    """
    return variance_of(model, inputs, family, "hessian", structure, n_samples, "spectral", **options)


@announced(FAILED_BEFORE)
@_explained
def variance_bound(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    estimator: str = "score",
    structure: str = "diag",
    n_samples: int = 1,
    **options: object,
) -> PublicValue:
    """The tightest of this module's upper bounds on ``fisher_variance`` (entry by entry).

    ``score`` takes the elementwise minimum of :func:`score_variance_bound_spectral`
    and :func:`score_variance_bound_kurtosis`; ``hessian`` uses
    :func:`hessian_variance_bound_spectral`. Same shape as :func:`fisher_variance`. For entries (``diag``,
    ``full``, ``blocks``) the kurtosis bound is never the tighter (``λ_max(M) ≤ E‖u‖⁴``, docs/math.md §4.2), so
    the spectral one is taken alone; for ``trace`` both come from one pass over the inputs, from the model's output
    gram alone (two passes took 1.5× as long), and each input's smaller term is summed: tighter than the smaller of
    the two bounds' sums, or equal to it (docs/math.md §4.2); across processes, each sums its own rows' terms, so the
    bound is one process's over all the inputs, to rounding.

    Args:
        model: the model, as in :func:`torchfim.fisher`.
        inputs: the inputs the bound is conditional on, as in :func:`torchfim.fisher`.
        family: output family name or :class:`~torchfim.families.Family`.
        estimator: ``"score"`` (Î1) or ``"hessian"`` (Î2), the estimator whose variance is bounded.
        structure: ``"full"``, ``"diag"``, ``"trace"`` or ``"blocks"``, as in :func:`torchfim.fisher_variance`.
        n_samples: the labels per input ``k`` of that estimator.
        **options: ``backend``, ``progress``, ``mask``, ``output``, ``class_dim`` and ``across_processes``, as in
            :func:`torchfim.fisher`; any other keyword is refused with what to pass instead.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> exact = torchfim.fisher_variance(model, x, structure="trace")
        >>> bound = torchfim.variance_bound(model, x, structure="trace")
        >>> bool(bound >= exact)
        True
    """
    check_variance_estimator(estimator, "variance_bound")
    trace = structure_class(structure) is Trace
    if estimator == "score" and not trace:  # entries: the kurtosis bound is never the tighter (§4.2)
        return score_variance_bound_spectral(model, inputs, family, structure, n_samples, **options)
    if estimator == "score":  # both trace bounds from one pass, over each process's rows with across_processes
        call = ("variance", "score", "trace", family_settings(get_family(family)), n_samples, "bound",
                options.get("class_dim"))
        share = row_share(options.get("across_processes", False), options.get("mask"), call, options.get("output"),
                          "variance_bound")
        k = check_n_samples(n_samples)
        single = {name: value for name, value in options.items() if name != "across_processes"}
        return score_trace_bound(model, inputs, family, **single, share=share) / k
    # Î2's one bound: one pass over the inputs (a loader's mini-batches were copied and held for a pass per bound)
    return hessian_variance_bound_spectral(model, inputs, family, structure, n_samples, **options)
