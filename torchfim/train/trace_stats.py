"""The statistics behind :class:`~torchfim.train.FisherTraceMonitor`: window variances and the control variate
(docs/math.md §10).

Everything here works on per-(input, label) squared score norms ``s`` of shape ``(n, k)``: row i
holds the ``k`` values ``s_ij = ‖∇_θ log p(y_ij|xᵢ)‖²`` of input ``xᵢ``; ``mᵢ = (1/k) Σⱼ s_ij``.

* :func:`mean_and_variance` — the estimate ``(1/n) Σᵢ mᵢ`` and its variance, for the held inputs
  as an i.i.d. sample of the data (no population) or for a random subset of ``N`` held inputs.
* :class:`Windows` — consecutive windows over a fixed random permutation of the held inputs.
* :class:`ControlVariate` — the control-variate estimator (two cross-fitted chains, see its docstring).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor


def mean_and_variance(s: Tensor, population: int | None) -> tuple[float, float]:
    """``(mean, variance of the mean)`` of the per-input means ``mᵢ`` of ``s`` (n, k).

    With ``s²`` the sample variance of the ``mᵢ`` (divisor n − 1):

    * ``population=None``: ``s²/n``, the variance of the mean as an estimate of ``E_x Tr(F(x))``
      when the n inputs are an i.i.d. sample of the data (it counts input spread and label noise).
    * ``population=N``: the n inputs are a random subset, drawn without replacement, of ``N``
      held inputs, and the target is the mean over all ``N`` of them. The variance of the mean is
      ``((1 − f) S² + σ̄²)/n`` with ``f = n/N``, ``S²`` the spread of the true per-input values over
      the N inputs and ``σ̄²`` the mean label variance of an ``mᵢ``; it is estimated without bias by
      ``((1 − f) s² + f v̄)/n`` with ``v̄ = (1/n) Σᵢ var_j(s_ij)/k`` (k ≥ 2). The finite-population
      correction applies to the input sampling only: the label noise stays whole even when n = N.
      With ``k = 1``, ``v̄`` cannot be told from the input spread and ``s²`` stands in for it,
      giving ``s²/n``, which over-states the variance by at most the factor ``1/(1 − f)``.

    A single input (n = 1) has no spread to estimate ``s²`` from, so the variance is NaN, except where the
    input is the whole population (``population=1``, so f = 1) and ``k ≥ 2``: the formula then needs no
    ``s²`` and gives the label noise alone, ``v̄ = var_j(s_1j)/k``.

    Example:
        >>> import torch
        >>> s = torch.tensor([[1.0, 3.0], [2.0, 2.0], [6.0, 8.0]], dtype=torch.float64)
        >>> mean_and_variance(s, None)  # m = (2, 2, 7), s² = 25/3, over n = 3
        (3.666666666666667, 2.7777777777777772)
        >>> mean_and_variance(s, 3)[1]  # f = 1: label noise only, v̄ = mean(2, 0, 2)/k = 2/3, over n = 3
        0.2222222222222222
        >>> mean_and_variance(s[:1], 1), mean_and_variance(s[:1], None)  # one input: label noise only, or NaN
        ((2.0, 1.0), (2.0, nan))
    """
    n, k = s.shape
    s = s.double()
    m = s[:, 0] if k == 1 else s.mean(1)
    if n < 2:  # no input spread to see: only the whole population of one, with its label noise, is answered
        return float(m[0]), float(s.var()) / k if population == 1 and k > 1 else math.nan
    spread, mean = (float(t) for t in torch.var_mean(m))  # one pass, divisor n − 1
    if population is None:
        return mean, spread / n
    f = n / population
    label = float((s.var(1) / k).mean()) if k > 1 else spread
    return mean, ((1.0 - f) * spread + f * label) / n


class Windows:
    """Windows of ``size`` held inputs: consecutive positions of one fixed random permutation.

    Measurement j uses positions ``j·size, …, j·size + size − 1`` (mod N) of a permutation of
    ``0..N−1`` drawn at the first call from the generator it is given (``torch.randperm``), so
    successive windows sweep all held inputs and wrap around. Each window, on its own, is a
    uniformly random subset of ``size`` distinct inputs.
    """

    def __init__(self, population: int, size: int) -> None:
        self.population = population
        self.size = min(size, population)
        self.permutation: Tensor | None = None
        self.position = 0

    def next(self, generator: torch.Generator) -> Tensor:
        """The indices (CPU, int64) of the next window."""
        if self.permutation is None:
            self.permutation = torch.randperm(self.population, generator=generator, device=generator.device).cpu()
        start, end = self.position, self.position + self.size
        self.position = end % self.population
        if end <= self.population:
            return self.permutation[start:end]
        return torch.cat([self.permutation[start:], self.permutation[: end - self.population]])

    def state(self) -> dict[str, object]:
        """The permutation (None before the first window) and the next window's start."""
        return {"permutation": self.permutation, "position": self.position}

    def load(self, state: dict[str, object]) -> None:
        self.permutation, self.position = state["permutation"], state["position"]


@dataclass
class _Chain:
    """One chain's state after a measurement (see :class:`ControlVariate`)."""

    estimate: float  # T̂ʰ
    weight: float  # β used for it
    var_propagated: float  # Var(Pʰ) (0 when weight = 0: P did not enter)
    fresh: Tensor  # its fresh values (nₕ, k): the c of the next measurement
    # The chain's own-data recursion, whose variance alone sets the other chain's β (a state saved before it
    # existed goes on from the chain's own weight and variance).
    own_weight: float | None = None  # β̃ʰ, from the chain's own variances
    own_var_propagated: float | None = None  # Var(P̃ʰ) of the recursion with β̃ʰ

    def __post_init__(self) -> None:
        if self.own_weight is None:
            self.own_weight, self.own_var_propagated = self.weight, self.var_propagated


def _cross_weight(var_fresh: float, var_propagated: float) -> float:
    """β = Var(X)/(Var(X) + Var(P)): the inverse-variance weight of P (0 when undefined)."""
    total = var_fresh + var_propagated
    return var_fresh / total if total > 0 and math.isfinite(total) else 0.0


class ControlVariate:
    """The control-variate estimate of ``Tr(F)``: fresh labels, plus the previous estimate carried over.

    At measurement t the monitor draws fresh labels on a window of inputs (values ``a``, mean
    ``X_t``, unbiased for ``Tr(F)`` at the current weights θ_t) and also re-draws, at θ_t, the
    previous measurement's labels on the previous window with the same random numbers (common
    random numbers: the generator state is replayed), giving values ``b`` paired with that
    measurement's values ``c`` at θ_{t−1}. Then

    * ``P_t = T̂_{t−1} + mean(b) − mean(c)`` is unbiased for ``Tr(F)`` at θ_t (``mean(b) − mean(c)``
      estimates the change since the previous measurement; when the weights moved little, b ≈ c
      and ``P_t`` inherits the small variance of ``T̂_{t−1}``);
    * ``T̂_t = (1 − β) X_t + β P_t``, unbiased for any β chosen independently of the noise of
      ``X_t`` and ``P_t``, with variance ``V_t = (1 − β)² Var(X_t) + β² Var(P_t)`` (``X_t`` uses
      fresh labels, independent of everything in ``P_t``);
    * ``Var(P_t) = Var(mean(b − β_{t−1} c)) + β_{t−1}² Var(P_{t−1})``, since
      ``P_t = mean(b) − β_{t−1} mean(c) + β_{t−1} P_{t−1}``; each window variance is
      :func:`mean_and_variance` of the paired per-input values.

    The best weight, ``β = Var(X)/(Var(X) + Var(P))``, must be estimated, and an estimate taken
    from the same values would bias ``T̂`` (the values are skewed: a window's mean and its variance
    estimate err together). So the inputs are split into two chains, h = 0, 1, that share no labels
    (and, with a subset, each rotates over its own permutation). Each chain also runs a second
    recursion on its own values alone, ``Var(P̃_t)`` with its own weights
    ``β̃ = Var(X)/(Var(X) + Var(P̃))``; the β of a chain's estimate is ``β̃``'s formula on the
    **other** chain's ``Var(X)`` and ``Var(P̃)``, which no value of this chain reaches. (Taking the
    other chain's ``Var(P)`` instead, whose recursion runs on the β that this chain's own variances
    set one measurement before, biased the estimate by a fifth of its standard error and the
    variance 20 % low, from the third measurement on, on skewed values in a review.) Each chain's
    estimate is then unbiased, and ``T̂ = Σₕ wₕ T̂ʰ`` (wₕ = nₕ/n) with ``V = Σₕ wₕ² Vʰ``; the
    chains' covariance through each other's β is a product of two small covariances, left out.
    The record's ``variance_ratio`` is ``V`` over ``Σₕ wₕ² Var(Xʰ)``, the variance of the fresh
    labels alone. Windows of one chain that follow each other are disjoint, so their
    input-sampling errors are negatively correlated; ignoring that keeps ``V`` on the safe side.
    """

    def __init__(self, chains: list[Tensor], population: list[int | None]) -> None:
        self.rows = chains
        self.population = population
        self.chains: list[_Chain] | None = None

    def update(self, fresh: Tensor, replay: Tensor | None) -> tuple[float, float, float]:
        """Estimate, its variance and the variance of the fresh-only estimate, from ``a`` and ``b``.

        ``fresh`` (n, k): this measurement's window at θ_t with new labels; ``replay`` (n, k): the
        previous window at θ_t with the previous labels' random numbers (None the first time).
        """
        xs = [mean_and_variance(fresh[rows], pop) for rows, pop in zip(self.rows, self.population)]
        if self.chains is None or replay is None:
            props = [(math.nan, math.nan, math.nan)] * len(self.rows)
        else:
            props = [self._propagated(chain, replay[rows], pop) for chain, rows, pop in zip(self.chains, self.rows, self.population)]
        # β̃ʰ of each chain's own recursion: a function of the chain's values alone
        own = [0.0 if math.isnan(p) else _cross_weight(var_x, var_own) for (_, var_x), (p, _, var_own) in zip(xs, props)]
        chains, total, variance, plain = [], 0.0, 0.0, 0.0
        n = sum(len(rows) for rows in self.rows)
        for h, ((x, var_x), (p, var_p, var_own)) in enumerate(zip(xs, props)):
            weight = own[1 - h]  # the other chain's: independent of this chain's values
            estimate = x if weight == 0.0 else (1.0 - weight) * x + weight * p
            w = len(self.rows[h]) / n
            total += w * estimate
            variance += w * w * ((1.0 - weight) ** 2 * var_x + (weight**2 * var_p if weight else 0.0))
            plain += w * w * var_x
            chains.append(_Chain(estimate, weight, var_p if weight else 0.0, fresh[self.rows[h]], own[h],
                                 var_own if own[h] else 0.0))
        self.chains = chains
        return total, variance, plain

    def state(self) -> list[dict[str, object]] | None:
        """Each chain's estimate, weight, propagated variance and fresh values (None before a measurement)."""
        return None if self.chains is None else [asdict(chain) for chain in self.chains]

    def load(self, chains: list[dict[str, object]] | None) -> None:
        self.chains = None if chains is None else [_Chain(**chain) for chain in chains]

    @staticmethod
    def _propagated(chain: _Chain, b: Tensor, population: int | None) -> tuple[float, float, float]:
        """``P = T̂_{t−1} + mean(b − c)``, ``Var(P)``, and ``Var(P̃)`` of the chain's own recursion, for one chain."""
        b, c = b.double(), chain.fresh.double()
        p = chain.estimate + float((b - c).mean())
        var_p = mean_and_variance(b - chain.weight * c, population)[1] + chain.weight**2 * chain.var_propagated
        own = mean_and_variance(b - chain.own_weight * c, population)[1] + chain.own_weight**2 * chain.own_var_propagated
        return p, var_p, own
