"""Normaliser and moments of the matrix Fisher distribution on SO(3), by one-dimensional quadrature.

``p(R) = exp(tr(AᵀR)) / c(A)`` with respect to the Haar probability measure on SO(3).

**Principal frame.** With the proper SVD ``A = U S Vᵀ`` (``U, V ∈ SO(3)``, ``s₁ ≥ s₂ ≥ |s₃|``, ``s₃``
carrying the sign of ``det A``), ``Q = UᵀRV`` follows ``MF(S)`` and ``c(A) = c(S)``. Writing ``Q``
by its unit quaternion ``q = (q₀, q₁, q₂, q₃)`` (Haar measure ↔ uniform ``q`` on S³),
``tr(SQ) = Σₖ bₖ qₖ²`` with ``b = (s₁+s₂+s₃, s₁−s₂−s₃, −s₁+s₂−s₃, −s₁−s₂+s₃)``: a Bingham law.

**One-dimensional integral.** Split ``q`` into the pairs ``(q₀, q₃)`` and ``(q₁, q₂)``, with squared
radii ``r² = 1 − t/2`` and ``ρ² = t/2`` and angles θ, χ. On S³, ``t`` is uniform on [0, 2] and
``sin²(θ/2)``, ``sin²(χ/2)`` are independent Beta(½, ½). Integrating the angles,

    c(S) = e^{s₁+s₂+s₃} ∫₀² ½ e^{−(s₂+s₃)t} T₀₀(κ_P) T₀₀(κ_Q) dt,   κ_P = (s₁+s₂) r²,  κ_Q = (s₁−s₂) ρ²,

with ``T_mn(κ) = E[(1−τ)^m τ^n e^{−2κτ}]``, ``τ ~ Beta(½, ½)``; ``T₀₀(κ) = e^{−κ}I₀(κ)``, which is
the integral of Mohlin, Sullivan & Bianchi (2020). Every even moment of ``q`` is the same kind of
integral, ``E[Πₖ qₖ^{2aₖ}] = Z(a)/Z(0)`` with

    Z(a) = ∫₀² ½ e^{−(s₂+s₃)t} (r²)^{a₀+a₃} (ρ²)^{a₁+a₂} T_{a₀a₃}(κ_P) T_{a₁a₂}(κ_Q) dt,

and odd ones vanish (``qₖ → −qₖ``). The entries of ``Q`` are quadratic in ``q``, so moments of ``R``
up to order four are these moments up to ``|a| = 4``.

**Accuracy.** ``T_mn`` is summed without cancellation: its Kummer series (positive terms) for
``2κ < 60`` and its asymptotic (Watson) series for ``2κ ≥ 60``. The ``t``-integral uses
Gauss–Legendre rules on panels graded geometrically towards both ends, where the integrand has
layers of width ``1/(s₂+s₃)``, ``1/(s₁−s₂)`` and ``1/(s₁+s₂)``; it is accurate to about 1e-13 from
``S = 0`` up to singular values near 1e13 (relative error 2.7e-3 at 1e14, NaN from about 3e17;
:class:`~torchfim.families.MatrixFisher` warns above 1e13 and refuses above 1e17). Central moments are formed from the small quantities
``Y = (q₁², q₂², q₃², q₀q₁, q₀q₂, q₀q₃, q₁q₂, q₁q₃, q₂q₃)`` (``vec Q = x₀ + W Y``), whose spread is of
the order of their mean, so centring loses no digits however concentrated the law is.
"""

from __future__ import annotations

import functools
import itertools
import math
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ..errors import TorchfimError

_SERIES_SWITCH = 60.0  # 2κ below: Kummer series; at or above: asymptotic series
_ASYMPTOTIC_TERMS = 60
_LEVELS = 42  # graded panels reach t = 2⁻⁴² from each end
_NODES_PER_PANEL = 10

# Multi-indices a = (a₀, a₁, a₂, a₃), |a| ≤ 4, for the moments E[Π qₖ^{2aₖ}]; slot 70 holds a zero.
_MULTI = [a for a in itertools.product(range(5), repeat=4) if sum(a) <= 4]
_MULTI_INDEX = {a: i for i, a in enumerate(_MULTI)}
# Quaternion exponents of Y = (q₁², q₂², q₃², q₀q₁, q₀q₂, q₀q₃, q₁q₂, q₁q₃, q₂q₃).
_Y_EXPONENTS = np.array(
    [[0, 2, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2],
     [1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1], [0, 1, 1, 0], [0, 1, 0, 1], [0, 0, 1, 1]]
)
# vec Q (row-major) = x₀ + W Y, from the rotation matrix of a unit quaternion.
_W = np.array(
    [
        [0, -2, -2, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, -2, 2, 0, 0],
        [0, 0, 0, 0, 2, 0, 0, 2, 0],
        [0, 0, 0, 0, 0, 2, 2, 0, 0],
        [-2, 0, -2, 0, 0, 0, 0, 0, 0],
        [0, 0, 0, -2, 0, 0, 0, 0, 2],
        [0, 0, 0, 0, -2, 0, 0, 2, 0],
        [0, 0, 0, 2, 0, 0, 0, 0, 2],
        [-2, -2, 0, 0, 0, 0, 0, 0, 0],
    ],
    dtype=np.float64,
)
_X0 = np.array([1, 0, 0, 0, 1, 0, 0, 0, 1], dtype=np.float64)


class MatrixFisherMoments(NamedTuple):
    """Moments of ``vec R`` (row-major) under ``MF(A)``, float64; those not requested are ``None``."""

    log_normaliser: Tensor  # (B,)  log c(A)
    mean: Tensor  # (B, 9)  E[vec R]
    cov: Tensor | None  # (B, 9, 9)  Cov(vec R)
    third: Tensor | None  # (B, 9, 9, 9)  E[u⊗u⊗u], u = vec R − E[vec R]
    fourth: Tensor | None  # (B, 9, 9, 9, 9)  E[u⊗u⊗u⊗u]


@functools.cache
def _graded_rule() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Nodes as ``(t, ρ² = t/2, r² = 1 − t/2)`` and weights (including the ½) on [0, 2].

    Panels ``[2⁻ʲ⁻¹, 2⁻ʲ]`` near each end; ``ρ²`` and ``r²`` are computed from the distance to the
    nearer end, so nodes near ``t = 2`` keep their relative accuracy in ``r²``.
    """
    x, w = np.polynomial.legendre.leggauss(_NODES_PER_PANEL)
    edges = np.array([0.0] + [2.0**-j for j in range(_LEVELS, -1, -1)])  # 0, 2⁻ᴸ, …, ½, 1
    lo, hi = edges[:-1, None], edges[1:, None]
    near = ((lo + hi) / 2 + (hi - lo) / 2 * x).ravel()  # distance from the nearer end
    weight = np.tile(((hi - lo) / 2 * w).ravel(), 2) / 2
    t = np.concatenate([near, 2 - near])
    half_near = near / 2
    rho2 = np.concatenate([half_near, 1 - half_near])
    r2 = np.concatenate([1 - half_near, half_near])
    return t, rho2, r2, weight


def _kummer_series(z: Tensor, m: int, n: int) -> Tensor:
    """``T_mn = e^{−z}/π Σⱼ zʲ/j! B(n+½, m+j+½)`` at ``z = 2κ`` (positive terms; for small ``z``)."""
    log_first = math.lgamma(n + 0.5) + math.lgamma(m + 0.5) - math.lgamma(m + n + 1) - math.log(math.pi)
    term = torch.exp(log_first - z)
    total = term.clone()
    top = float(z.max()) if z.numel() else 0.0
    for j in range(int(top + 10 * math.sqrt(top) + 40)):
        term = term * z * ((m + j + 0.5) / ((j + 1) * (m + n + j + 1)))
        total = total + term
    return total


@functools.cache
def _watson_coefficients(m: int, n: int) -> tuple[float, ...]:
    """``(½−m)ⱼ Γ(n+½+j) / (j! π)``: ``T_mn ~ Σⱼ cⱼ z^{−(n+½+j)}`` as ``z = 2κ → ∞``."""
    coefficients, c = [], math.gamma(n + 0.5) / math.pi
    for j in range(_ASYMPTOTIC_TERMS):
        coefficients.append(c)
        c *= (0.5 - m + j) * (n + 0.5 + j) / (j + 1)
    return tuple(coefficients)


def _watson_series(z: Tensor, m: int, n: int) -> Tensor:
    inv = 1.0 / z
    total = torch.zeros_like(z)
    for c in reversed(_watson_coefficients(m, n)):
        total = total * inv + c
    return total * z ** -(n + 0.5)


def tilted_beta_moments(kappa: Tensor, order: int) -> dict[tuple[int, int], Tensor]:
    """``T_mn(κ) = E[(1−τ)^m τ^n e^{−2κτ}]``, ``τ ~ Beta(½, ½)``, for every ``m + n ≤ order``.

    The ``m + n = order`` row is summed directly; lower rows follow from ``T_mn = T_{m+1,n} +
    T_{m,n+1}`` (a sum of positive terms).
    """
    z = 2 * kappa
    small = z < _SERIES_SWITCH
    moments: dict[tuple[int, int], Tensor] = {}
    for n in range(order + 1):
        m = order - n
        value = _watson_series(z.clamp_min(_SERIES_SWITCH), m, n)
        if bool(small.any()):
            value = value.masked_scatter(small, _kummer_series(z[small], m, n))
        moments[(m, n)] = value
    for level in range(order - 1, -1, -1):
        for n in range(level + 1):
            moments[(level - n, n)] = moments[(level - n + 1, n)] + moments[(level - n, n + 1)]
    return moments


def proper_svd(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(U, s, V)`` with ``A = U diag(s) Vᵀ``, ``U, V ∈ SO(3)``, ``s₁ ≥ s₂ ≥ |s₃|`` for ``a`` (B, 3, 3).

    A non-finite ``A`` has no SVD (torch's fails to converge, deep inside LAPACK): a :class:`TorchfimError` says so.
    """
    if not bool(torch.isfinite(a).all()):
        raise TorchfimError(
            "the matrix Fisher outputs A have non-finite entries (NaN or Inf), so they have no distribution; check the "
            "model's outputs for divergence (MatrixFisher().check_output(o) names them)"
        )
    u, s, vh = torch.linalg.svd(a)
    v = vh.transpose(-1, -2)
    sign_u, sign_v = torch.linalg.det(u).sign(), torch.linalg.det(v).sign()
    flip = torch.stack([torch.ones_like(sign_u), torch.ones_like(sign_u), sign_u], -1)
    u = u * flip.unsqueeze(-2)
    v = v * torch.stack([torch.ones_like(sign_v), torch.ones_like(sign_v), sign_v], -1).unsqueeze(-2)
    s = s * torch.stack([torch.ones_like(sign_u), torch.ones_like(sign_u), sign_u * sign_v], -1)
    return u, s, v


def bingham_moments(s: Tensor, order: int) -> tuple[Tensor, Tensor]:
    """``log c(S)`` (B,) and ``E[Πₖ qₖ^{2aₖ}]`` (B, 71) for ``|a| ≤ order`` (others and slot 70: 0)."""
    t, rho2, r2, weight = (torch.as_tensor(v, dtype=s.dtype, device=s.device) for v in _graded_rule())
    s1, s2, s3 = s.unbind(-1)
    decay = (s2 + s3).clamp_min(0).unsqueeze(-1)
    omega = weight * torch.exp(-decay * t)  # (B, N)
    t_p = tilted_beta_moments((s1 + s2).clamp_min(0).unsqueeze(-1) * r2, order)
    t_q = tilted_beta_moments((s1 - s2).clamp_min(0).unsqueeze(-1) * rho2, order)
    z = torch.zeros(s.shape[:-1] + (len(_MULTI) + 1,), dtype=s.dtype, device=s.device)
    for a, idx in _MULTI_INDEX.items():
        if sum(a) <= order:
            integrand = r2 ** (a[0] + a[3]) * rho2 ** (a[1] + a[2]) * t_p[(a[0], a[3])] * t_q[(a[1], a[2])]
            z[..., idx] = (omega * integrand).sum(-1)
    z0 = z[..., _MULTI_INDEX[(0, 0, 0, 0)]]
    return s.sum(-1) + torch.log(z0), z / z0.unsqueeze(-1)


@functools.cache
def _raw_moment_table(order: int) -> np.ndarray:
    """Index into the 71 Bingham moments of ``E[Y_{i₁} ⋯ Y_{i_order}]`` for every index tuple."""
    table = np.full((9,) * order, len(_MULTI), dtype=np.int64)
    for idx in itertools.product(range(9), repeat=order):
        exponents = _Y_EXPONENTS[list(idx)].sum(0)
        if not (exponents % 2).any():
            table[idx] = _MULTI_INDEX[tuple(int(e) for e in exponents // 2)]
    return table


def _raw(moments: Tensor, order: int) -> Tensor:
    return moments[..., torch.as_tensor(_raw_moment_table(order), device=moments.device)]


def _central(moments: Tensor, order: int) -> list[Tensor]:
    """Central moments of ``Y`` of orders 2..order from its raw moments."""
    mu, r2 = _raw(moments, 1), _raw(moments, 2)
    c2 = r2 - torch.einsum("na,nb->nab", mu, mu)
    out = [c2]
    if order >= 3:
        r3 = _raw(moments, 3)
        c3 = (
            r3
            - torch.einsum("na,nbc->nabc", mu, r2)
            - torch.einsum("nb,nac->nabc", mu, r2)
            - torch.einsum("nc,nab->nabc", mu, r2)
            + 2 * torch.einsum("na,nb,nc->nabc", mu, mu, mu)
        )
        out.append(c3)
    if order >= 4:
        r3, r4 = _raw(moments, 3), _raw(moments, 4)
        subsets = ("a", "b", "c", "d", "ab", "ac", "ad", "bc", "bd", "cd")
        rest = {x: "".join(c for c in "abcd" if c not in x) for x in subsets}
        one = sum(torch.einsum(f"n{x},n{rest[x]}->nabcd", mu, r3) for x in "abcd")
        two = sum(torch.einsum(f"n{p[0]},n{p[1]},n{rest[p]}->nabcd", mu, mu, r2) for p in rest if len(p) == 2)
        four = torch.einsum("na,nb,nc,nd->nabcd", mu, mu, mu, mu)
        out.append(r4 - one + two - 3 * four)
    return out


def _transform(tensor: Tensor, matrix: Tensor) -> Tensor:
    """Apply ``matrix`` (B, 9, 9) along every index of ``tensor`` (B, 9, …, 9), one index at a time."""
    for _ in range(tensor.dim() - 1):
        tensor = torch.einsum("nxa,na...->n...x", matrix, tensor)
    return tensor


def matrix_fisher_moments(a: Tensor, order: int) -> MatrixFisherMoments:
    """Moments of ``vec R`` for ``R ~ MF(A)``, ``a`` (B, 9) row-major; orders above ``order`` are ``None``.

    ``order`` 1 gives ``log c`` and the mean, 2 adds the covariance, 3 the third and 4 the fourth
    central moments; all in float64 on ``a``'s device.
    """
    a64 = a.detach().to(torch.float64).reshape(-1, 3, 3)
    u, s, v = proper_svd(a64)
    log_c, moments = bingham_moments(s, order)
    w = torch.as_tensor(_W, dtype=torch.float64, device=a64.device)
    x0 = torch.as_tensor(_X0, dtype=torch.float64, device=a64.device)
    rotate = torch.einsum("nia,njb->nijab", u, v).reshape(-1, 9, 9)  # vec(U Q Vᵀ) = (U ⊗ V) vec Q
    mean = torch.einsum("nxq,nq->nx", rotate, x0 + _raw(moments, 1) @ w.T)
    if order < 2:
        return MatrixFisherMoments(log_c, mean, None, None, None)
    to_r = rotate @ w  # vec R − E vec R = (U ⊗ V) W (Y − E Y)
    central = [_transform(c, to_r) for c in _central(moments, order)]
    central += [None] * (3 - len(central))
    return MatrixFisherMoments(log_c, mean, *central)
