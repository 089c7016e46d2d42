"""The heteroscedastic Gaussian family: a mean and a log-variance per label dimension."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._paired import PairedFamily
from .base import _wide_float, _work_dtype

#: A model whose outputs all end in an exponential or a softplus: its log-variance half is a variance.
POSITIVE = (
    "torchfim: the model's outputs come out of {op} (positive values), but the heteroscedastic_gaussian family "
    "reads their second half as the log-variance (a variance, as torch.nn.GaussianNLLLoss takes, is not its log), "
    "so the Fisher would be that of another model; return the log of the variance as the second half"
)


class HeteroscedasticGaussian(PairedFamily):
    """Independent Gaussians ``y_d ~ N(μ_d, σ_d²)`` with outputs ``o = [μ (D), s = log σ² (D)]``.

    Labels ``y`` have shape ``(D,)``; ``C = 2D`` outputs, the means first (``torch.cat([mean,
    log_var], -1)``). With ``z = (y − μ)/σ``:

    * score ``u_μ = z/σ``, ``u_s = (z² − 1)/2``;
    * ``Λ = diag(1/σ², ½)`` per dimension (``μ`` and ``s`` are orthogonal parameters);
    * third cumulants ``κ(μ, μ, s) = 1/σ²``, ``κ(s, s, s) = 1``; fourth cumulants
      ``κ(μ, μ, s, s) = 2/σ²``, ``κ(s, s, s, s) = 3``; the others vanish (moments of ``z`` up to
      ``E z⁸ = 105``), so ``E[u⊗u⊗u⊗u]`` is the Gaussian pairing of ``Λ`` plus ``κ₄``.

    Not canonical: ``−∇²_o log p`` is ``[[1/σ², u_μ], [u_μ, ½ + u_s]]`` per dimension, i.e.
    ``Λ + u_μ Γ_μ + u_s Γ_s`` (:meth:`~PairedFamily.output_hessian`); its expectation is ``Λ``.
    The ``hessian`` estimator (Î2) uses ``Λ`` as the output curvature, so it stays unbiased with
    variance ``hᵀΛh``; the literal negative Hessian of ``log p`` would put ``∇²_θ o_a − JᵀΓ_aJ`` in
    place of ``∇²_θ o_a`` (:meth:`~PairedFamily.score_curvature`).

    Labels come in float64 (float32 on MPS) whatever the outputs' dtype, so that ``y − μ`` keeps ``σz`` where
    ``σ`` is far below ``|μ|``.

    Example:
        >>> import torch
        >>> fam = HeteroscedasticGaussian()
        >>> o = torch.tensor([[0.5, -1.0, 0.0, 2.0]], dtype=torch.float64)  # μ = (0.5, −1), log σ² = (0, 2)
        >>> torch.diagonal(fam.fisher_output(o), dim1=-2, dim2=-1)
        tensor([[1.0000, 0.1353, 0.5000, 0.5000]], dtype=torch.float64)
        >>> fam.sample(o, 3, torch.Generator().manual_seed(0)).shape
        torch.Size([1, 3, 2])
    """

    name = "heteroscedastic_gaussian"
    halves = ("mean", "log-variance")
    log_halves = (False, True)
    log_half_hint = " (a variance, as torch.nn.GaussianNLLLoss takes, is not its log)"
    misread_through_shifts = True  # a variance plus 1e-6 is still a variance
    misread = {"ExpBackward0": POSITIVE.format(op="exp"), "SoftplusBackward0": POSITIVE.format(op="a softplus")}
    curvature_coupling = (((0.0, 1.0), (1.0, 0.0)), ((0.0, 0.0), (0.0, 1.0)))

    def _filler_label(self, o: Tensor) -> Tensor:
        return o.detach().to(_work_dtype(o)[0]).chunk(2, dim=-1)[0]

    def _noise(self, o: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        """Standard normal ``z`` (B, k, D) in the working dtype, drawn on the generator's device."""
        noise = torch.randn(
            (o.shape[0], k, o.shape[1] // 2),
            generator=generator,
            dtype=_work_dtype(o)[0],
            device=generator.device if generator is not None else o.device,
        )
        return noise.to(o.device)

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        # In float64 (float32 on MPS) whatever the outputs' dtype: a float32 label rounded σz away where σ is
        # below float32's spacing at μ (log σ² = −36, μ = 3: y = μ, and the Fisher penalty, whose scores are its
        # labels', was 0).
        wide = _wide_float(o.device)
        mean, log_var = o.detach().to(wide).chunk(2, dim=-1)
        return mean.unsqueeze(1) + torch.exp(0.5 * log_var).unsqueeze(1) * self._noise(o, k, generator).to(wide)

    def sample_scores(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``u_μ = z/σ``, ``u_s = (z² − 1)/2`` from the noise ``z`` of :meth:`sample`: through the label,
        ``(y − μ)/σ`` cancels when ``|μ| ≫ σ`` (float64 μ = 1e8, log σ² = −40 gave E[u_μ²]/Λ = 0.020)."""
        z = self._noise(o, k, generator)
        inv_sd = torch.exp(-0.5 * o.detach().to(z.dtype).chunk(2, dim=-1)[1]).unsqueeze(1)
        return torch.cat([z * inv_sd, 0.5 * (z**2 - 1)], dim=-1).to(o.dtype)

    def _standardised(self, y: Tensor, o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        work = _work_dtype(o, y)[0]
        mean, log_var = self._align(y, o).to(work).chunk(2, dim=-1)
        inv_sd = torch.exp(-0.5 * log_var)
        return (y.to(work) - mean) * inv_sd, inv_sd, log_var

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        z, inv_sd, _ = self._standardised(y, o)
        return torch.cat([z * inv_sd, 0.5 * (z**2 - 1)], dim=-1).to(o.dtype)

    def cumulants_by_count(self, o: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        precision = torch.exp(-o.to(_work_dtype(o)[0]).chunk(2, dim=-1)[1])
        zero, one = torch.zeros_like(precision), torch.ones_like(precision)
        second = torch.stack([precision, zero, 0.5 * one], -1)
        third = torch.stack([zero, precision, zero, one], -1)
        fourth = torch.stack([zero, zero, 2 * precision, zero, 3 * one], -1)
        return second, third, fourth

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        z, _, log_var = self._standardised(y, o)
        return (-0.5 * (z**2 + log_var + math.log(2 * math.pi)).sum(-1)).to(o.dtype)
