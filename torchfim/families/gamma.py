"""The gamma family: a log-mean and a log-shape per label dimension."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import TorchfimError, warn_user
from ._paired import PairedFamily
from .base import _to_generator_device, _wide_float, _work_dtype

# Beyond this shape the polygamma combinations below lose digits to cancellation, so their
# asymptotic series (from ψ'(x) ~ 1/x + 1/(2x²) + Σ B₂ₖ/x²ᵏ⁺¹) take over; at α ≥ 20 the first
# omitted term is below 1e-15 relative.
_ASYMPTOTIC_SHAPE = 20.0
# α²ψ'(α) − α, α³ψ''(α) + α, α⁴ψ'''(α) − 2α as power series in 1/α (coefficients of α^0, α^-1, …).
_SERIES = {
    1: (0.5, 1 / 6, 0.0, -1 / 30, 0.0, 1 / 42, 0.0, -1 / 30, 0.0, 5 / 66, 0.0, -691 / 2730, 0.0, 7 / 6),
    2: (-1.0, -0.5, 0.0, 1 / 6, 0.0, -1 / 6, 0.0, 3 / 10, 0.0, -5 / 6, 0.0, 691 * 13 / 2730, 0.0, -7 * 15 / 6),
    3: (3.0, 2.0, 0.0, -1.0, 0.0, 4 / 3, 0.0, -3.0, 0.0, 10.0, 0.0, -691 * 13 * 14 / 2730, 0.0, 7 * 15 * 16 / 6),
}
# α(log α − ψ(α)) in powers of 1/α, from ψ(x) ~ log x − 1/(2x) − Σ B₂ₖ/(2k x²ᵏ).
_DIGAMMA_SERIES = (0.5, 1 / 12, 0.0, -1 / 120, 0.0, 1 / 252, 0.0, -1 / 240, 0.0, 1 / 132, 0.0, -691 / 32760, 0.0,
                   1 / 12)
# Stirling's remainder log Γ(α) − (α − ½) log α + α − ½ log 2π in powers of 1/α: Σ B₂ₖ/(2k(2k−1)α²ᵏ⁻¹).
_LGAMMA_SERIES = (0.0, 1 / 12, 0.0, -1 / 360, 0.0, 1 / 1260, 0.0, -1 / 1680, 0.0, 1 / 1188, 0.0, -691 / 360360, 0.0,
                  1 / 156)
# Below this shape a Gamma(α, 1) draw can underflow float64 (P(w < 2⁻¹⁰²²) ≈ 2^(−1022α)/Γ(α+1)), so its
# log is drawn instead: w = g·U^{1/α} with g ~ Gamma(α+1, 1), U uniform, i.e. log w = log g + log(U)/α.
_LOG_DRAW_SHAPE = 1.0
# Above this shape a draw's deviation w − α is formed from a normal draw z (Wilson–Hilferty: w/α = (1 + s)³ with
# s = z/(3√α) − 1/(9α), so W/α = s(3 + s(3 + s)), no cancellation): a direct draw carries W to ε·√α relative (1e-10
# here) and rounds it to 0 from α ≈ 1e30 (a review: u_μ = 0 and u_α = ½ always at log α = 75). The approximation's
# error in the moments of the scores shrinks like a power of 1/α; at 1e12 it is far below any Monte-Carlo error.
_NORMAL_SHAPE = 1e12


def _series(coefficients: tuple[float, ...], alpha: Tensor) -> Tensor:
    """``Σ_k c_k α^{−k}`` by Horner, at ``max(α, 20)`` (the series are only used there)."""
    inv, total = 1.0 / alpha.clamp_min(_ASYMPTOTIC_SHAPE), torch.zeros_like(alpha)
    for coefficient in reversed(coefficients):
        total = total * inv + coefficient
    return total


def _reduced_polygamma(order: int, shape: Tensor) -> Tensor:
    r"""``α²ψ'(α) − α`` (order 1), ``α³ψ''(α) + α`` (2) or ``α⁴ψ'''(α) − 2α`` (3), in float64, without cancellation.

    Below ``α = 20`` through ``ψ⁽ⁿ⁾(α) = (−1)ⁿ⁺¹ n!/αⁿ⁺¹ + ψ⁽ⁿ⁾(α+1)``, i.e.
    ``αⁿ⁺¹ψ⁽ⁿ⁾(α) = (−1)ⁿ⁺¹ n! + αⁿ⁺¹ψ⁽ⁿ⁾(α+1)``, finite as ``α → 0`` (limits 1, −2, 6); above, by
    the asymptotic series.
    """
    alpha = shape.double()
    subtract = {1: alpha, 2: -alpha, 3: 2 * alpha}[order]
    sign_factorial = (-1) ** (order + 1) * math.factorial(order)
    # ψ⁽ⁿ⁾(x) = (−1)ⁿ⁺¹ n! ζ(n+1, x); torch's trigamma is good to only ~1e-9, its Hurwitz zeta to 1e-16.
    # At x = α + 1, not α: αⁿ⁺¹ · ζ(n+1, α) overflowed for tiny α (κ₄ = inf below log α ≈ −180).
    shifted = sign_factorial * torch.special.zeta(float(order + 1), alpha + 1)
    direct = sign_factorial + (alpha ** (order + 1) * shifted - subtract)
    return torch.where(alpha < _ASYMPTOTIC_SHAPE, direct, _series(_SERIES[order], alpha))


def _shape_score(alpha: Tensor, log_w: Tensor, deviation: Tensor) -> Tensor:
    """``u_α = α(log w − ψ(α)) − (w − α)`` from ``log w`` and the deviation ``W = w − α`` (float64 tensors).

    For ``α ≥ 20`` as ``α(log α − ψ(α)) + α(log1p(δ) − δ)`` with ``δ = W/α``, the first term by
    its series ``½ + 1/(12α) − 1/(120α³) + …``: the direct form subtracts terms of size ``α log α``
    to leave an O(1) score (float32 at log α = 14 gave E[u_α²]/Λ_αα = 1.81). Below, directly, with
    ``αψ(α) = αψ(α+1) − 1`` so that a tiny ``α`` (``log w ≈ −E/α``) meets no ``0 · ∞``.
    """
    small = alpha * log_w - alpha * torch.digamma(alpha + 1) + 1 - deviation
    big = alpha.clamp_min(_ASYMPTOTIC_SHAPE)
    large = _series(_DIGAMMA_SERIES, alpha) + big * _log1p_minus_identity(deviation / big)
    return torch.where(alpha < _ASYMPTOTIC_SHAPE, small, large)


def _log1p_minus_identity(delta: Tensor) -> Tensor:
    """``log(1 + δ) − δ`` without cancellation: below ``|δ| = 0.01`` by its series ``−δ²/2 + δ³/3 − …`` (to
    ``δ¹¹``, 1e-16 relative), where the difference would keep ``ε/|δ|`` of itself (none at all at ``α ≈ 1e32``,
    where ``δ ≈ 1e-16`` and ``α(log1p(δ) − δ) ≈ −z²/2`` rounded to 0)."""
    tiny = delta.abs() < 0.01
    x = torch.where(tiny, delta, torch.zeros_like(delta))
    series = torch.zeros_like(x)
    for power in range(11, 1, -1):  # −Σ_{m≥2} (−δ)^m/m, Horner from the top term
        series = x * series + (-1) ** (power + 1) / power
    return torch.where(tiny, x * x * series, torch.log1p(delta) - delta)


def _log_density_of_w(log_mean: Tensor, log_shape: Tensor, y: Tensor) -> Tensor:
    """``α log w − w − log Γ(α)`` with ``w = αy/μ`` (``log p(y) + log y``), float64 tensors, in a form whose
    derivatives in ``(log μ, log α)`` keep their digits (they are the scores, O(1) at any shape).

    For ``α ≥ 20`` as ``½ log α − ½ log 2π − R(α) + α(log(1 + δ) − δ)`` with ``δ = y/μ − 1 = W/α``, which
    does not depend on ``α``, and ``R`` Stirling's remainder of ``log Γ(α)`` by its series: its ``log α``
    derivative is then :func:`_shape_score`'s large-shape form term by term, where the direct form's cancels
    terms of size ``α log α`` (in float64 u_α was 0.015 off at log-shape 30 and 780 at 40). Below, directly,
    with ``log w = log y + log α − log μ`` (``w`` itself may underflow where ``α`` is tiny). Where a branch is
    not used it is evaluated on clamped inputs, so that its masked gradient is 0, not NaN.
    """
    threshold = math.log(_ASYMPTOTIC_SHAPE)
    large = log_shape >= threshold
    small_log_shape = log_shape.clamp_max(threshold)
    log_w = torch.log(y) + small_log_shape - log_mean
    direct = torch.exp(small_log_shape) * log_w - torch.exp(log_w) - torch.lgamma(torch.exp(small_log_shape))
    big_log_shape = log_shape.clamp_min(threshold)
    # y·e^{−log μ} − 1 rather than through logs: log y would keep only ε·|log y| of δ ≈ 1/√α.
    delta = torch.where(large, y, 1.0) * torch.exp(-torch.where(large, log_mean, 0.0)) - 1
    stirling = (0.5 * big_log_shape - 0.5 * math.log(2 * math.pi) - _series(_LGAMMA_SERIES, torch.exp(big_log_shape))
                + torch.exp(big_log_shape) * _log1p_minus_identity(delta))
    return torch.where(large, stirling, direct)


#: A gamma model that ends in an exponential or a softplus, returning the mean and shape themselves.
POSITIVE = (
    "torchfim: the model's outputs come out of {op} (positive values), but the gamma family reads them as a "
    "log-mean and a log-shape (μ = exp(outputs[..., :D]), α = exp(outputs[..., D:])), so the Fisher would be that "
    "of another model; return their logs ({fix})"
)


#: Labels drawn below the range of their dtype (log-shapes below about −5 in float64).
CLIPPED = (
    "torchfim: some gamma labels drawn fall below {dtype}'s smallest normal number (at shapes this small: "
    "log-shapes below about -5 in float64) and were raised to it, so their log-likelihoods, and a Fisher penalty drawn from them, are off; the Fisher, "
    "its variance and the monitor draw their scores without labels and are not affected"
)


class Gamma(PairedFamily):
    """Independent gamma labels ``y_d > 0`` with outputs ``o = [log μ (D), log α (D)]``.

    ``μ`` is the mean and ``α`` the shape (concentration): ``p(y) = β^α y^{α−1} e^{−βy}/Γ(α)``
    with rate ``β = α/μ``; ``C = 2D`` outputs, the log-means first. The log-rate, if wanted, is
    ``log α − log μ``.

    Why this parameterisation: both halves are unconstrained; the first is the usual log link
    of a gamma GLM; and ``(μ, α)`` are orthogonal parameters, so ``Λ`` is diagonal. The canonical
    parameters ``(α, −β)`` would need sign constraints on the outputs.

    With ``w = βy ~ Gamma(α, 1)``, ``L = log w − ψ(α)`` and ``W = w − α``:

    * score ``u_μ = W``, ``u_α = αL − W``;
    * ``Λ = diag(α, α²ψ'(α) − α)`` per dimension;
    * every cumulant follows from the joint cumulants of ``(log w, w)`` (cumulant generating
      function ``log Γ(α+s) − log Γ(α) − (α+s) log(1−t)``): ``κ(log w ×i) = ψ^{(i−1)}(α)``,
      ``κ(w ×j) = (j−1)! α``, ``κ(log w, w ×j) = (j−1)!``, and zero with two or more ``log w``
      and any ``w``. Hence (indices ``μ``, ``α``):
      ``κ₃ = (2α, −α, 0, α³ψ''(α) + α)`` and ``κ₄ = (6α, −4α, 2α, 0, α⁴ψ'''(α) − 2α)`` by the
      number of ``α`` indices, evaluated in float64 (asymptotic series for ``α ≥ 20``).

    Not canonical: per dimension ``−∇²_o log p = [[α + u_μ, −u_μ], [−u_μ, Λ_αα − u_α]]``, i.e.
    ``Λ + u_μ Γ_μ + u_α Γ_α`` (:meth:`~PairedFamily.output_hessian`), with expectation ``Λ``; the
    ``hessian`` estimator (Î2) uses ``Λ`` as the output curvature.

    Sampling draws ``w`` with ``torch._standard_gamma`` from the passed generator in float64, for
    ``α < 1`` as ``log w = log g + log(U)/α`` with ``g ~ Gamma(α+1, 1)`` and ``U`` uniform (``w``
    itself underflows there), and for ``α ≥ 10¹²`` its deviation ``w − α`` from a normal draw by
    Wilson–Hilferty's cube (``w − α`` itself rounds away there). Labels come in float64 (float32 on MPS) whatever
    the outputs' dtype; one below that range (log-shapes below about −5) is raised to its smallest normal number,
    with a warning; :meth:`sample_scores` works from ``log w`` and is not affected. :meth:`log_prob` is computed
    in that dtype too, in a form whose derivatives keep their digits at any shape (:func:`_log_density_of_w`).

    Example:
        >>> import torch
        >>> fam = Gamma()
        >>> o = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # μ = 1, α = e
        >>> fam.fisher_output(o)[0, 0, 0].item() == torch.e
        True
        >>> y = fam.sample(o, 5, torch.Generator().manual_seed(0))
        >>> y.shape, bool((y > 0).all())
        (torch.Size([1, 5, 1]), True)
    """

    name = "gamma"
    halves = ("log-mean", "log-shape")
    log_halves = (True, True)
    misread_through_shifts = True  # positive values plus a constant: still positive
    misread = {"ExpBackward0": POSITIVE.format(op="exp", fix="drop the final exp"),
               "SoftplusBackward0": POSITIVE.format(op="a softplus", fix="torch.log of it")}
    curvature_coupling = (((1.0, -1.0), (-1.0, 0.0)), ((0.0, 0.0), (0.0, -1.0)))

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        y = super().check_targets(y, o)
        if not bool((y > 0).all()):
            raise TorchfimError("gamma targets must be strictly positive; shift or drop the non-positive targets")
        return y

    def _filler_label(self, o: Tensor) -> Tensor:
        return torch.exp(o.detach().to(_work_dtype(o)[0]).chunk(2, dim=-1)[0])

    def _log_draws(self, o: Tensor, k: int, generator: torch.Generator | None) -> tuple[Tensor, ...]:
        """``(log w, w, w − α, log μ, log α)``, ``k`` draws ``w ~ Gamma(α, 1)`` per output, ``(B, k, D)`` in
        float64 on the generator's device (``log μ``, ``log α`` broadcast over the draws)."""
        log_mean, log_shape = _to_generator_device(o.detach().double(), generator).chunk(2, dim=-1)
        log_mean, log_shape = log_mean.unsqueeze(1), log_shape.unsqueeze(1).expand(-1, k, -1)
        shape = torch.exp(log_shape)
        small = shape < _LOG_DRAW_SHAPE
        draw = torch._standard_gamma(torch.where(small, shape + 1, shape).contiguous(), generator=generator)
        log_w = torch.log(draw)
        if bool(small.any()):
            # w = g·U^{1/α}, U ∈ (0, 1]: its log stays exact where w itself is below float64's range
            # (log-shape −6: a third of the draws, and E[u_α²]/Λ_αα was 0.39 from the clipped ones).
            log_u = torch.log1p(-torch.rand(draw.shape, generator=generator, dtype=draw.dtype, device=draw.device))
            log_w = torch.where(small, log_w + log_u / shape, log_w)
        w = torch.where(small, torch.exp(log_w), draw)
        deviation = w - shape
        large = shape >= _NORMAL_SHAPE
        if bool(large.any()):  # drawn only then: the draws of smaller shapes are as before
            root = shape.sqrt()
            s = (torch.randn(draw.shape, generator=generator, dtype=draw.dtype, device=draw.device) / 3 - 1 / (9 * root)) / root
            delta = s * (3 + s * (3 + s))  # (1 + s)³ − 1
            deviation = torch.where(large, shape * delta, deviation)
            log_w = torch.where(large, log_shape + torch.log1p(delta), log_w)
            w = torch.where(large, shape + deviation, w)
        return log_w, w, deviation, log_mean, log_shape

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        # In float64 (float32 on MPS) whatever the outputs' dtype, as the Poisson counts: float32 labels lost
        # u_α to rounding at large α and clipped at its smallest normal number at small α (1.1 % of them at
        # log-shape −3), and the Fisher penalty's scores are those of its labels.
        wide = _wide_float(o.device)
        log_w, w, _, log_mean, log_shape = self._log_draws(o, k, generator)
        shift = log_mean - log_shape
        # From w where it is a normal number: exp(log w + …) would lose ε·|log w| relative at large α.
        y = torch.where(w >= torch.finfo(w.dtype).tiny, w * torch.exp(shift), torch.exp(log_w + shift)).to(wide)
        # A label must be positive: one below the dtype's range is raised to its smallest normal number.
        tiny = torch.finfo(wide).tiny
        if bool((y < tiny).any()):
            warn_user(CLIPPED.format(dtype=str(wide).removeprefix("torch.")))
        return y.clamp_min(tiny).to(o.device)

    def sample_scores(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """The scores of :meth:`sample`'s draws, from ``log w`` and ``w`` in float64 (:func:`_shape_score`),
        not from the labels: those clip where ``w`` underflows and round away ``u_α`` at large ``α``."""
        log_w, _, deviation, _, log_shape = self._log_draws(o, k, generator)
        scores = torch.cat([deviation, _shape_score(torch.exp(log_shape), log_w, deviation)], dim=-1)
        return scores.to(device=o.device, dtype=o.dtype)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        # In float64 (float32 on MPS) whatever the dtype: u_α is O(1) out of terms of size √α.
        wide = _wide_float(o.device)
        log_mean, log_shape = self._align(y, o).to(wide).chunk(2, dim=-1)
        y, shape = y.to(wide), torch.exp(log_shape)
        log_w, w = torch.log(y) + (log_shape - log_mean), y * torch.exp(log_shape - log_mean)
        return torch.cat([w - shape, _shape_score(shape, log_w, w - shape)], dim=-1).to(o.dtype)

    def cumulants_by_count(self, o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        work = _work_dtype(o)[0]
        shape = torch.exp(o.to(work).chunk(2, dim=-1)[1])
        zero = torch.zeros_like(shape)
        g1, g2, g3 = (_reduced_polygamma(order, shape).to(work) for order in (1, 2, 3))
        second = torch.stack([shape, zero, g1], -1)
        third = torch.stack([2 * shape, -shape, zero, g2], -1)
        fourth = torch.stack([6 * shape, -4 * shape, 2 * shape, zero, g3], -1)
        return second, third, fourth

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        # In float64 (float32 on MPS) whatever the dtypes, as output_score: the Fisher penalty differentiates it
        # twice by autograd, and float32 lost the O(1) shape score to rounding (E[u_α²]/Λ_αα was 1.8 at
        # log-shape 14 and 362 at 17).
        wide = _wide_float(o.device)
        log_mean, log_shape = self._align(y, o).to(wide).chunk(2, dim=-1)
        y = y.to(wide)
        # log p(y) = α log w − w − log Γ(α) − log y, since β^α y^{α−1} = w^α / y.
        return (_log_density_of_w(log_mean, log_shape, y) - torch.log(y)).sum(-1).to(o.dtype)
