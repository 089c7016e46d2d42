"""The combined estimator ``Î_w = w·Î1 + (1 − w)·Î2`` with the variance-minimising weight (docs/math.md §8).

Both estimators are computed from ONE set of ``k`` labels per input, so besides their variances
``V1 = Var Î1`` and ``V2 = Var Î2`` (docs/math.md §3, :mod:`torchfim.variance`) their covariance
``C12 = Cov(Î1, Î2)`` enters (§8.2, :mod:`torchfim.covariance`). Per entry (per ``full``/``diag``/
``blocks`` entry; for ``trace`` the trace estimators):

* ``V(w) = w² V1 + (1 − w)² V2 + 2w(1 − w) C12``, convex in ``w`` with curvature
  ``D = V1 + V2 − 2 C12 = Var(Î1 − Î2) ≥ 0``;
* ``D > 0``: ``w* = (V2 − C12)/D`` and ``V(w*) = (V1V2 − C12²)/D ≤ min(V1, V2)``. ``w*`` is not
  clipped to ``[0, 1]``: outside it the estimator extrapolates but stays unbiased and has the
  smallest variance;
* ``D = 0``: ``Î1 = Î2`` almost surely (``V1 = V2 = C12``), every ``w`` gives the same estimator;
  ``w = 0`` (Î2) is taken — typically these are entries with ``h_pq = 0``, where Î2 has no label
  noise at all. In floating point ``D`` is taken as 0 when ``D ≤ √eps·(V1 + V2 + 2|C12|)``: below
  that its round-off is not small against it and ``w*`` would amplify the round-off of the three
  variances by ``w*²``. There the better endpoint is taken (``w = 0`` if ``V2 ≤ V1``, else 1), so
  ``V(w) ≤ min(V1, V2)`` always holds.

The three variances are closed forms conditional on the inputs, not estimates from the labels, so
``w`` is a constant given the inputs and ``Î_w`` is exactly unbiased (§8.1). ``w`` does not
depend on ``k`` (every term scales as ``1/k``).

Cost: one pass computes both estimates and the three variances. ``C12`` on ``diag`` needs the
output-Hessian diagonal of every parameter, one forward-over-forward pass per parameter direction
(the Î2 variance has a per-unit shortcut inside dense layers, docs/math.md §6.4, that the
covariance does not have yet); ``trace`` needs one output-Hessian trace per input, ``blocks`` and
``full`` the dense output-Hessian columns, as Î2's variance does.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._batches import Inputs
from .covariance import ScoreHessianCovariance
from .engine import (
    Backend,
    ModelView,
    Recording,
    backend_name,
    check_finite_result,
)
from .engine.backend import is_trace, second_order_support
from .engine.session import engine_pass
from .engine.view import Mask
from .errors import TorchfimError, check_choice, check_n_samples, real_number
from .estimators import add_shared_label_estimates
from .families import Family, get_family
from .keyword_hints import explains_keywords
from .structures import STRUCTURE_NAMES, PublicValue, Structure, entrywise, make_structure
from .variance import HessianVariance, ScoreVariance, squares_layout

VARIANCE_PARTS = ("var_score", "var_hessian", "cov")
ESTIMATE_PARTS = ("score", "hessian")


def optimal_weight(v1: Tensor, v2: Tensor, c12: Tensor) -> Tensor:
    """The variance-minimising ``w`` per entry: ``(V2 − C12)/(V1 + V2 − 2 C12)``, with ``D ≈ 0`` handled
    as the module docstring says (``w = 0`` where ``V2 ≤ V1``, else ``1``). Each of ``v1``, ``v2``, ``c12`` is a real
    tensor (they broadcast) or a Python number; the result is floating (the default dtype where no input is).

    Example:
        >>> import torch
        >>> from torchfim.combined import optimal_weight, weighted_variance
        >>> v1, v2, c12 = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 1.0]), torch.tensor([0.5, 1.0])
        >>> w = optimal_weight(v1, v2, c12)
        >>> w, weighted_variance(w, v1, v2, c12)
        (tensor([0.2500, 0.0000]), tensor([0.8750, 1.0000]))
    """
    (v1, v2, c12), dtype = _widened("optimal_weight", v1=v1, v2=v2, c12=c12)
    curvature = v1 + v2 - 2 * c12
    eps = torch.finfo(dtype).eps
    resolved = curvature > eps**0.5 * (v1.abs() + v2.abs() + 2 * c12.abs())
    endpoint = (v1 < v2).to(curvature.dtype)
    return torch.where(resolved, (v2 - c12) / torch.where(resolved, curvature, 1.0), endpoint).to(dtype)


def weighted_variance(w: Tensor, v1: Tensor, v2: Tensor, c12: Tensor) -> Tensor:
    """``Var(w·Î1 + (1 − w)·Î2) = w² V1 + (1 − w)² V2 + 2w(1 − w) C12``, clamped at 0 (its true value is
    ``≥ 0``; a negative result is round-off). Inputs as :func:`optimal_weight` takes them."""
    (w, v1, v2, c12), dtype = _widened("weighted_variance", w=w, v1=v1, v2=v2, c12=c12)
    return (w.square() * v1 + (1 - w).square() * v2 + 2 * w * (1 - w) * c12).clamp_min(0).to(dtype)


def _widened(caller: str, **values: Tensor | float) -> tuple[list[Tensor], torch.dtype]:
    """``values`` (real tensors or Python numbers) as tensors of one floating dtype, in float32 when it is
    float16/bfloat16 (the weight amplifies round-off), and that dtype: the tensors' promoted dtype, as torch's
    arithmetic gives it (a Python number does not widen a tensor), or the default dtype where none is floating
    (integer variances are numbers too: ints and integer tensors were refused by bare errors from deep in torch)."""
    for name, value in values.items():
        real = (not (value.is_complex() or value.dtype == torch.bool) if isinstance(value, Tensor)
                else real_number(value) is not None)
        if not real:
            raise TorchfimError(f"{caller}: {name} must be a real tensor or a real number, got {value!r}; pass the "
                                "variances as float tensors (e.g. torch.as_tensor(values, dtype=torch.float64))")
    tensors = [value for value in values.values() if isinstance(value, Tensor)]
    dtype = functools.reduce(torch.promote_types, (t.dtype for t in tensors), torch.bool)
    dtype = dtype if dtype.is_floating_point else torch.get_default_dtype()
    wide = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    device = tensors[0].device if tensors else None
    return [torch.as_tensor(value, dtype=wide, device=device) for value in values.values()], dtype


@dataclass
class CombinedResult:
    """The combined estimate and its ingredients, each in the structure's public form."""

    estimate: PublicValue | None  #: ``w·Î1 + (1 − w)·Î2`` (None when no labels were drawn)
    variance: PublicValue  #: ``Var`` of the estimate (closed form)
    weight: PublicValue  #: ``w`` per entry
    parts: dict[str, PublicValue]  #: ``score``/``hessian`` (the two estimates), ``var_score``, ``var_hessian``, ``cov``


class SharedLabelSums:
    """Running sums over mini-batches of Î1 and Î2 from shared labels (optional) and of V1, V2, C12."""

    def __init__(self, structure: str, view: ModelView, draw: bool) -> None:
        names = (ESTIMATE_PARTS if draw else ()) + VARIANCE_PARTS
        self.parts: dict[str, Structure] = {
            name: make_structure(structure, squares_layout(view.layout) if name in VARIANCE_PARTS else view.layout)
            for name in names}
        self.draw = draw
        self.n = 0

    @property
    def grams(self) -> bool:
        """Whether the closed forms build an output Gram matrix per input (the trace's do)."""
        return is_trace(self.parts["var_score"])

    def add(self, engine: Backend, rec: Recording, fam: Family, k: int, generator: torch.Generator | None) -> None:
        """Add one mini-batch: the two estimates (same labels) and the per-input variance terms."""
        parts = self.parts
        # The Î1 variance first: where an input's Jacobian would not fit it refuses at once, before Î2's
        # one pull-back per output number. It draws nothing, so the labels are those of any order.
        parts["var_score"].visit(ScoreVariance(engine, rec, fam, "exact"))
        if self.draw:
            add_shared_label_estimates(engine, rec, fam, parts["score"], parts["hessian"], k, generator)
        with second_order_support():
            parts["var_hessian"].visit(HessianVariance(engine, rec, fam, "exact"))
            parts["cov"].visit(ScoreHessianCovariance(engine, rec, fam))
        self.n += rec.batch.size

    def finish(self, k: int) -> CombinedResult:
        """Means over inputs (``1/n``) and variances (``1/(n²k)``), then the weight and the combination."""
        if self.n == 0:
            raise TorchfimError("inputs is empty: pass at least one input (a tensor with batch size ≥ 1)")
        done = {name: s.finish(self.n * self.n * k if name in VARIANCE_PARTS else self.n)
                for name, s in self.parts.items()}
        weight = entrywise(optimal_weight, done["var_score"], done["var_hessian"], done["cov"])
        variance = entrywise(weighted_variance, weight, done["var_score"], done["var_hessian"], done["cov"])
        estimate = None
        if self.draw:
            estimate = entrywise(lambda w, a, b: (w * a + (1 - w) * b).to(a.dtype), weight, done["score"],
                                 done["hessian"])
        return CombinedResult(estimate, variance, weight, done)


def combined_terms(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family,
    structure: str,
    n_samples: int,
    *,
    draw: bool,
    targets: Tensor | None = None,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
) -> CombinedResult:
    """One pass over ``inputs``: with ``draw`` the shared-label Î1 and Î2, and always V1, V2 and C12;
    then the weight and the combination (module docstring)."""
    fam = get_family(family)
    check_choice("structure", structure, STRUCTURE_NAMES)
    k = check_n_samples(n_samples)
    with engine_pass(model, backend, output, class_dim) as one:
        sums = SharedLabelSums(structure, one.view, draw)
        # Row groups only without draws: cutting a batch would change which labels its rows get.
        for rec, fam_b in one.batches(inputs, targets, fam, mask, progress,
                                      "fisher[combined]" if draw else "variance[combined]", split=not draw,
                                      whole=not draw, grams=sums.grams):
            sums.add(one.backend, rec, fam_b, k, generator)
        result = sums.finish(k)
    if result.estimate is not None:
        check_finite_result(result.estimate, "the combined Fisher", one.view.dtype)
    check_finite_result(result.variance, "the combined estimator's variance", squares_layout(one.view.layout).dtype)
    return result


@explains_keywords
def combined_variance(
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
    """Exact variance of each entry of the combined estimator (``torchfim.fisher(...,
    estimator="combined")`` with the same arguments).

    ``min_w Var(w·Î1 + (1 − w)·Î2) = w*² V1 + (1 − w*)² V2 + 2w*(1 − w*) C12`` per entry, with
    ``w* = (V2 − C12)/(V1 + V2 − 2 C12)`` from the closed-form variances of §3 and the shared-label
    covariance of §8.2 (docs/math.md §8.1; the module docstring handles ``V1 + V2 − 2C12 = 0``). It
    is ``≤ min(V1, V2)`` entry by entry. Conditional on ``inputs``, ``k = n_samples`` labels per
    input, scaling as ``1/(n²k)·Σᵢ``; for ``trace`` the variance of the combined trace estimator.
    ``family``, ``structure``, ``backend`` (``method`` is its deprecated name), ``progress`` (a progress bar over
    the inputs), ``mask``, ``output`` and ``class_dim`` as in :func:`torchfim.fisher`.

    Example:
        >>> import torch, torchfim
        >>> from torchfim.combined import combined_variance
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> x = torch.randn(16, 4)
        >>> v = combined_variance(model, x, structure="diag")
        >>> v1 = torchfim.fisher_variance(model, x, estimator="score", structure="diag")
        >>> bool((v <= v1 * (1 + 1e-6)).all()), v.shape
        (True, torch.Size([67]))
    """
    return combined_terms(model, inputs, family, structure, n_samples, draw=False,
                          backend=backend_name(backend, method), progress=progress, mask=mask, output=output,
                          class_dim=class_dim).variance
