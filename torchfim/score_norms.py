"""Squared score norms per input and drawn label, for the model and for each parameter tensor, in one pass.

For inputs ``x_1..x_n`` and ``k`` labels ``y_ij ~ p(·|xᵢ)`` drawn from the model per input (one per
position for outputs with positions, the input's score summing over them), the squared score norm
of tensor ``t`` is ``s^t_ij = ‖∇_{θ_t} log p(y_ij|xᵢ)‖²`` and the model's ``s_ij = Σ_t s^t_ij``.
Their mean ``(1/(nk)) Σᵢⱼ s_ij`` is the score estimate Î1 of ``Tr(F)`` with ``k`` labels per input
(what ``fisher(..., estimator="score", structure="diag", n_samples=k)`` sums to, with the same labels
for the same generator), and ``s^t`` gives each tensor's share.

Unlike the closed-form variances (:func:`torchfim.fisher_variance`, ``return_stderr=True``), which pull
back every output number of an input together, this pulls back ``k`` vectors per input: its standard
errors come from the spread of the ``s_ij`` themselves, so it reaches models whose per-input Jacobian
would not fit in memory (a language model over a real vocabulary). With ``k ≥ 2`` the spread over
labels of one input measures the label noise alone (:func:`torchfim.train.trace_stats.mean_and_variance`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._batches import Inputs
from .engine import backend_name, check_finite_result
from .engine.session import engine_pass
from .engine.view import Mask
from .errors import TorchfimError, check_generator, check_n_samples, warn_user
from .estimators import sampled_scores
from .families import Family, get_family
from .keyword_hints import explains_keywords
from .train.trace_stats import mean_and_variance

__all__ = ["ScoreNorms", "squared_score_norms"]


@dataclass(frozen=True)
class ScoreNorms:
    """The squared score norms ``s^t_ij`` of :func:`squared_score_norms`.

    ``per_tensor`` is ``(T, n, k)`` in float64, tensor ``t`` in the order of ``names`` (the model's
    trainable parameters, ``named_parameters()`` order), inputs in the order given, labels in the
    order drawn.
    """

    names: list[str]
    per_tensor: Tensor

    @property
    def total(self) -> Tensor:
        """``s_ij`` of the whole model, ``(n, k)``."""
        return self.per_tensor.sum(0)

    def of(self, name: str | None = None) -> Tensor:
        """``s^t_ij`` of the tensor ``name`` (None: the whole model), ``(n, k)``."""
        if name is None:
            return self.total
        if name not in self.names:
            raise TorchfimError(f"no trainable parameter named {name!r}; the names are {self.names}")
        return self.per_tensor[self.names.index(name)]

    def trace(self, name: str | None = None, *, inputs_as_sample: bool = False) -> tuple[float, float]:
        """``(estimate, standard error)`` of ``Tr(F)`` of the whole model or of the tensor ``name`` alone.

        The estimate is ``(1/(nk)) Σᵢⱼ s_ij``. The standard error is that of the label draws about
        ``Tr(F)`` of these ``n`` inputs, ``√(v̄/n)`` with ``v̄ = (1/n) Σᵢ var_j(s_ij)/k`` (needs
        ``k ≥ 2``; with ``k = 1`` the spread over inputs stands in and over-states it); with
        ``inputs_as_sample=True`` it is that of an estimate of ``E_x Tr(F(x))`` when the inputs are an
        i.i.d. sample of the data, ``√(s²/n)`` with ``s²`` the variance of the per-input means
        (input spread and label noise together). For a single input the spread between inputs cannot be
        estimated: the default standard error is then the label noise of that input's ``Tr(F(x₁))``
        alone, ``√(var_j(s_1j)/k)`` (NaN with ``k = 1``), and with ``inputs_as_sample=True`` it is NaN.
        The variance behind it is estimated from few, skewed numbers when there are few inputs: ±1.96 s.e. then covers well under 95%
        (77% with 3 inputs and 2 labels each, 87% with 8, 93% with 32, in an error-bar trial).
        Where every input's ``k`` labels gave one value (:meth:`label_spread_unseen`: a class drawn every time) the
        default standard error is 0, which keeps its square an unbiased estimate of the variance over repeated draws
        but, read alone, claims an exact ``Tr(F)``: a warning says that the labels' spread was not seen (the report
        writes "–" there).
        """
        s = self.of(name)
        mean, variance = mean_and_variance(s, None if inputs_as_sample else s.shape[0])
        if not inputs_as_sample and self.label_spread_unseen(name):
            warn_user(f"every input's {s.shape[1]} labels gave the same squared score norm"
                      f"{'' if name is None else f' of {name!r}'} (one class drawn every time): the spread of the "
                      "labels was not seen, so the standard error of 0 is no exact Tr(F); draw more labels per input "
                      "(n_samples)")
        return mean, math.sqrt(max(variance, 0.0)) if math.isfinite(variance) else math.nan

    def label_spread_unseen(self, name: str | None = None) -> bool:
        """Whether ``k ≥ 2`` labels were drawn per input and each input's ``s_ij`` (of the tensor ``name``, None: the
        whole model) are one value while their mean is above 0: the label noise that :meth:`trace`'s standard error
        measures was not seen in these draws (a dominant class drawn every time), which is no exact ``Tr(F)``."""
        s = self.of(name)
        return s.shape[1] >= 2 and bool((s == s[:, :1]).all()) and bool(s.mean() > 0)


@explains_keywords
def squared_score_norms(
    model: nn.Module,
    inputs: Inputs,
    family: str | Family = "categorical",
    *,
    n_samples: int = 2,
    generator: torch.Generator | None = None,
    backend: str = "auto",
    progress: bool = False,
    mask: Mask = None,
    output: Callable[[object], Tensor] | None = None,
    class_dim: int | None = None,
) -> ScoreNorms:
    """``s^t_ij = ‖∇_{θ_t} log p(y_ij|xᵢ)‖²`` for ``n_samples`` labels drawn per input, per tensor.

    Arguments as in :func:`torchfim.fisher`; labels are drawn per mini-batch, in order, by the same
    calls as ``fisher(..., estimator="score", n_samples=n_samples)``, so the same ``generator`` state
    gives the same labels. The cost is one forward and ``n_samples`` pull-backs per mini-batch.

    Example:
        >>> import torch, torchfim
        >>> from torchfim.score_norms import squared_score_norms
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
        >>> x = torch.randn(64, 4, dtype=torch.float64)
        >>> s = squared_score_norms(model, x, n_samples=4, generator=torch.Generator().manual_seed(0))
        >>> tuple(s.per_tensor.shape), s.names[0]
        ((4, 64, 4), '0.weight')
        >>> d = torchfim.fisher(model, x, estimator="score", structure="diag", n_samples=4,
        ...                     generator=torch.Generator().manual_seed(0))
        >>> estimate, stderr = s.trace()
        >>> bool(abs(estimate - float(d.sum())) < 1e-12 * float(d.sum())), stderr > 0
        (True, True)
    """
    fam = get_family(family)
    k = check_n_samples(n_samples)
    check_generator(generator)
    with engine_pass(model, backend_name(backend, None), output, class_dim) as one:
        layout = one.view.layout
        parts: list[Tensor] = []
        for rec, fam_b in one.batches(inputs, None, fam, mask, progress, "score norms"):
            o = rec.values
            squares = one.backend.tensor_sample_squares(rec, sampled_scores(fam_b, o, k, generator).to(o.dtype))
            zero = o.new_zeros(o.shape[0], k, dtype=torch.float64)
            parts.append(torch.stack([squares[i].double() if i in squares else zero
                                      for i in range(len(layout.names))]))
        per_tensor = torch.cat(parts, 1)
    check_finite_result(per_tensor, "a squared score norm", one.view.dtype)
    return ScoreNorms(list(layout.names), per_tensor)
