"""The Poisson family: log-rates, one per output."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError
from .base import (
    Family,
    _isserlis,
    _isserlis_moment4,
    _isserlis_pairwise,
    _isserlis_quadratic,
    _to_generator_device,
    _top_eig_diag_plus_rank_one,
    _wide_float,
    _work_dtype,
)

#: Rates up to which labels come from ``torch.poisson``; above, the skewness-corrected normal
#: approximation. torch.poisson's variance is measurably off (25 standard errors in 2e5 draws)
#: at λ ≈ 2e14 and its int64 count overflows above 2⁶³ ≈ e^43.7 (issue 11 item 5); at 2³² it is
#: still exact within sampling error, and the approximation's O(1/λ) error is already ≲ 1e-9.
EXACT_POISSON_MAX_RATE = 2.0**32


def _sample_counts(rate: Tensor, generator: torch.Generator | None) -> Tensor:
    """Poisson draws for float64 ``rate`` of any size.

    ``λ ≤ EXACT_POISSON_MAX_RATE``: ``torch.poisson``. Above: ``round(λ + √λ z + (z² − 1)/6)``,
    ``z ~ N(0, 1)``, the Cornish–Fisher expansion of the Poisson quantile to order ``λ^{-1/2}``:
    its mean, variance and third central moment are ``λ``, ``λ + 5/36`` and ``λ + O(1)``, and its
    distribution function is within ``O(1/λ)`` (≲ 1e-9 here) of the Poisson one. The plain normal
    approximation ``N(λ, λ)`` would err by ``O(1/√λ)`` and miss the third moment ``λ``.
    """
    exact = rate <= EXACT_POISSON_MAX_RATE
    counts = torch.poisson(torch.where(exact, rate, 0.0), generator=generator)
    if bool(exact.all()):
        return counts
    z = torch.randn(rate.shape, generator=generator, dtype=rate.dtype, device=rate.device)
    approximate = torch.round(rate + rate.sqrt() * z + (z * z - 1) / 6).clamp_min(0)
    return torch.where(exact, counts, approximate)


def _sample_deviations(rate: Tensor, generator: torch.Generator | None) -> Tensor:
    """``y − λ`` for the draws :func:`_sample_counts` makes from the same random numbers, formed without
    ``y`` above ``EXACT_POISSON_MAX_RATE``: ``√λ z + (z² − 1)/6`` (rounding to an integer moves it by at most
    1/2 against a spread above 65536; beyond λ ≈ 2¹⁰⁶ the count itself would be λ to float64 precision)."""
    exact = rate <= EXACT_POISSON_MAX_RATE
    exact_rate = torch.where(exact, rate, 0.0)
    deviations = torch.poisson(exact_rate, generator=generator) - exact_rate
    if bool(exact.all()):
        return deviations
    z = torch.randn(rate.shape, generator=generator, dtype=rate.dtype, device=rate.device)
    return torch.where(exact, deviations, rate.sqrt() * z + (z * z - 1) / 6)


#: A Poisson model that ends in an exponential or a softplus, returning rates.
RATES = (
    "torchfim: the model's outputs come out of {op} (rates), but the poisson family reads them as log-rates "
    "(rate = exp(outputs)), so the Fisher would be that of another model; return the log of the rate ({fix})"
)


class Poisson(Family):
    """Independent Poisson counts with log-rates ``o``: ``λ = exp(o)``.

    ``u = y − λ``; ``Λ = diag(λ)``; ``E[u_a u_b u_c] = λ_a`` when ``a = b = c`` (else 0); fourth
    moments: Isserlis pairings of ``Λ`` plus the fourth cumulant ``λ_a`` when ``a = b = c = d``.

    Counts (sampled or checked) are float64 (float32 on MPS) whatever the output's dtype, since
    counts above 2²⁴ are not exact in float32; scores and log-probabilities are computed in that
    width from them and returned in the output's dtype. Sampling is exact up to rate
    ``EXACT_POISSON_MAX_RATE`` and accurate to ``O(1/λ)`` in distribution above (see
    :func:`_sample_counts`); beyond ``λ ≈ 2¹⁰⁶ ≈ e^73.5`` the spread ``√λ`` is below float64's
    resolution of ``λ``, so draws and scores are quantised to it.

    Example:
        >>> import torch
        >>> from torchfim.families import Poisson
        >>> o = torch.tensor([[0.0, 1.0]], dtype=torch.float64)  # log-rates
        >>> torch.allclose(Poisson().fisher_output(o)[0], torch.diag(o.exp()[0]))  # Λ = diag(λ)
        True
        >>> y = torch.tensor([[3.0, 0.0]], dtype=torch.float64)
        >>> torch.allclose(Poisson().output_score(y, o), y - o.exp())  # u = y − λ
        True
    """

    name = "poisson"
    misread_through_shifts = True  # positive values plus a constant: still positive
    misread = {"ExpBackward0": RATES.format(op="exp", fix="drop the final exp; PoissonNLLLoss(log_input=True) takes "
                                               "log-rates"),
               "SoftplusBackward0": RATES.format(op="a softplus", fix="torch.log of it")}

    def _filler_label(self, o: Tensor) -> Tensor:
        return torch.zeros(o.shape, dtype=_wide_float(o.device), device=o.device)

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        y = super().check_targets(y, o)
        if bool((y < 0).any()) or not bool((y == y.round()).all()):
            raise TorchfimError("poisson targets must be non-negative integer counts")
        return y.to(_wide_float(o.device))

    def _rate(self, o: Tensor, *others: Tensor) -> tuple[Tensor, torch.dtype]:
        """``λ = exp(o)`` in float32 at least (wider if ``others`` are), and the result dtype."""
        work, out = _work_dtype(o, *others)
        return torch.exp(o.to(work)), out

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        log_rate = _to_generator_device(o.detach(), generator)
        rate = torch.exp(log_rate.to(_wide_float(log_rate.device)))
        rate = rate.unsqueeze(1).expand(rate.shape[0], k, rate.shape[1]).contiguous()
        return _sample_counts(rate, generator).to(o.device)

    def sample_scores(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``u = y − λ`` drawn directly (:func:`_sample_deviations`), so that it keeps its spread at any rate."""
        log_rate = _to_generator_device(o.detach(), generator)
        rate = torch.exp(log_rate.to(_wide_float(log_rate.device)))
        rate = rate.unsqueeze(1).expand(rate.shape[0], k, rate.shape[1]).contiguous()
        return _sample_deviations(rate, generator).to(device=o.device, dtype=o.dtype)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        work = torch.promote_types(_work_dtype(o)[0], y.dtype) if y.is_floating_point() else _work_dtype(o)[0]
        return (y.to(work) - torch.exp(self._align(y, o).to(work))).to(o.dtype)

    def fisher_output(self, o: Tensor) -> Tensor:
        return torch.diag_embed(self._rate(o)[0]).to(o.dtype)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(0.5 * o.to(_work_dtype(o)[0]))).to(o.dtype)

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``Σ_a λ_a v_a w_a``."""
        rate, out = self._rate(o, v, w)
        return (rate.unsqueeze(1) * v.to(rate.dtype) * w.to(rate.dtype)).sum(-1).to(out)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        """``Σ_a λ_a v_pa v_qa``."""
        rate, out = self._rate(o, v)
        v = v.to(rate.dtype)
        return torch.bmm(v * rate.unsqueeze(1), v.transpose(1, 2)).to(out)

    def fourth_moment(self, o: Tensor) -> Tensor:
        rate = self._rate(o)[0]
        moments = _isserlis(torch.diag_embed(rate))
        idx = torch.arange(o.shape[-1], device=o.device)
        moments[:, idx, idx, idx, idx] += rate
        return moments.to(o.dtype)

    # The fourth cumulant λ_a adds to the Gaussian (Isserlis) part when a = b = c = d.
    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        rate, out = self._rate(o, v, w)
        v, w = v.to(rate.dtype), w.to(rate.dtype)
        return (_isserlis_moment4(rate, v, w) + (rate.unsqueeze(1) * v**2 * w**2).sum(-1)).to(out)

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        """Isserlis ``(v_pᵀΛv_p)(v_qᵀΛv_q) + 2(v_pᵀΛv_q)²`` plus the cumulant ``Σ_a λ_a v_pa² v_qa²``."""
        rate, out = self._rate(o, v)
        v = v.to(rate.dtype)
        squared = v * v
        cumulant = torch.bmm(squared * rate.unsqueeze(1), squared.transpose(1, 2))
        return (_isserlis_pairwise(rate, v) + cumulant).to(out)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        rate, out = self._rate(o, k)
        k = k.to(rate.dtype)
        diag = torch.diagonal(k, dim1=-2, dim2=-1)
        return (_isserlis_quadratic(rate, k) + (rate * diag**2).sum(-1)).to(out)

    def score_quadratic_spread(self, o: Tensor, k: Tensor) -> Tensor:
        """``Var[uᵀKu] = 2 tr(ΛKΛK) + Σ_a λ_a K_aa²`` (independent counts, fourth cumulant ``λ``): every term
        non-negative. As :meth:`quadratic_moment` less ``(tr ΛK)²`` it lost about ``log₁₀(C/2)`` digits (3e-4 off in
        float32 at C = 3000)."""
        rate, out = self._rate(o, k)
        kl = k.to(rate.dtype) * rate.unsqueeze(1)  # K Λ
        diag = torch.diagonal(k, dim1=-2, dim2=-1).to(rate.dtype)
        return (2 * torch.einsum("nab,nba->n", kl, kl) + (rate * diag**2).sum(-1)).to(out)

    def third_moment(self, o: Tensor) -> Tensor:
        """``λ_a`` on the diagonal ``a = b = c`` (the third cumulant), 0 elsewhere."""
        rate = self._rate(o)[0]
        c = o.shape[-1]
        moment = torch.zeros(o.shape[0], c, c, c, dtype=rate.dtype, device=o.device)
        idx = torch.arange(c, device=o.device)
        moment[:, idx, idx, idx] = rate
        return moment.to(o.dtype)

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """``Σ_a λ_a a_a b_a c_a``, without the C³ tensor."""
        rate, out = self._rate(o, a, b, c)
        product = a.to(rate.dtype) * b.to(rate.dtype) * c.to(rate.dtype)
        return (rate.unsqueeze(1) * product).sum(-1).to(out)

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``max_a λ_a``."""
        return torch.exp(o.to(torch.float64).amax(-1)).to(o.dtype)

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(M)`` with ``(M X)_ab = δ_ab λ_a Σ_c λ_c X_cc + λ_a λ_b (X_ab + X_ba) + δ_ab λ_a X_aa``.

        ``M`` is 0 on antisymmetric ``X``, ``2λ_aλ_b`` on ``E_ab + E_ba`` (``a ≠ b``) and, on diagonal
        ``X = diag(x)``, the C×C matrix ``N = λλᵀ + diag(2λ² + λ)``. ``λ_max(N) ≥ 3 max_a λ_a² ≥ 2λ_aλ_b``,
        so ``λ_max(M) = λ_max(N)``, found by the secular equation of a rank-one update in float64
        after dividing ``λ`` by ``s = max(1, max λ)``: ``λ_max(N) = s² λ_max(λ̃λ̃ᵀ + diag(2λ̃² + λ̃/s))``.
        """
        rate = torch.exp(o.to(torch.float64))
        scale = rate.amax(-1, keepdim=True).clamp_min(1.0)
        unit = rate / scale
        top = _top_eig_diag_plus_rank_one(2 * unit**2 + unit / scale, unit)
        return (scale.squeeze(-1) * (scale.squeeze(-1) * top)).to(o.dtype)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        work = torch.promote_types(_work_dtype(o)[0], y.dtype) if y.is_floating_point() else _work_dtype(o)[0]
        logr = self._align(y, o).to(work)
        y = y.to(work)
        return (y * logr - torch.exp(logr) - torch.lgamma(y + 1)).sum(-1).to(o.dtype)
