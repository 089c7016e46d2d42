"""The :class:`Family` interface every output family implements, and shared moment helpers."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from ..errors import TorchfimError


def _to_generator_device(t: Tensor, generator: torch.Generator | None) -> Tensor:
    """Move ``t`` to the device a generator draws on (sampling then stays reproducible)."""
    if generator is not None and t.device != generator.device:
        return t.to(generator.device)
    return t


def _isserlis_moment4(lam_diag: Tensor, v: Tensor, w: Tensor) -> Tensor:
    """``E[(uᵀv)²(uᵀw)²]`` for centred Gaussian ``u`` with diagonal covariance ``lam_diag`` (B, C)."""
    lam = lam_diag.unsqueeze(1)
    vv, ww, vw = (lam * v * v).sum(-1), (lam * w * w).sum(-1), (lam * v * w).sum(-1)
    return vv * ww + 2 * vw**2


def _isserlis_quadratic(lam_diag: Tensor, k: Tensor) -> Tensor:
    """``E[(uᵀKu)²]`` for centred Gaussian ``u`` with diagonal covariance: ``(tr KΛ)² + 2 tr(KΛKΛ)``."""
    kl = k * lam_diag.unsqueeze(1)  # K Λ
    return torch.einsum("naa->n", kl) ** 2 + 2 * torch.einsum("nab,nba->n", kl, kl)


def _isserlis(lam: Tensor) -> Tensor:
    """``E[u_a u_b u_c u_d]`` of a centred Gaussian with covariance ``lam`` (B, C, C)."""
    return (
        torch.einsum("nab,ncd->nabcd", lam, lam)
        + torch.einsum("nac,nbd->nabcd", lam, lam)
        + torch.einsum("nad,nbc->nabcd", lam, lam)
    )


class Family(ABC):
    """An output distribution ``p(y | o)`` over labels given a network output ``o``.

    Subclasses provide the label sampler, the output score ``u``, the output
    Fisher ``Λ(o)`` with a square-root factor, the fourth moments of ``u`` and the
    negative log-likelihood. All methods work on batches ``o`` of shape ``(B, C)``.
    """

    #: Name used to select the family by string.
    name: str = ""
    #: Number of trailing label dimensions (0 for a class index, 1 for a vector).
    label_ndim: int = 1

    # ----------------------------------------------------------------- checks
    def check_output(self, o: Tensor) -> None:
        """Raise :class:`TorchfimError` unless ``o`` is a finite ``(B, C)`` output this family accepts."""
        if o.dim() != 2:
            raise TorchfimError(
                f"family {self.name!r} expects model outputs of shape (batch, {self._width_hint()}), "
                f"got shape {tuple(o.shape)}; make the model return one flat output vector per input "
                "(e.g. end with nn.Flatten() or reshape in forward)"
            )
        self._check_width(o.shape[1])
        if not torch.isfinite(o).all():
            raise TorchfimError(
                "the model produced non-finite outputs (NaN or Inf); check the inputs for NaN/Inf "
                "and the parameters for divergence (e.g. lower the learning rate) before computing the Fisher"
            )

    def _width_hint(self) -> str:
        return "C"

    def _check_width(self, width: int) -> None:
        if width < 1:
            raise TorchfimError(f"family {self.name!r} needs at least one output per input, got 0")

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        """Validate true targets for a batch of outputs and return them in canonical form."""
        want = (o.shape[0],) + self._label_shape(o)
        if tuple(y.shape) != want:
            raise TorchfimError(
                f"targets for family {self.name!r} must have shape {want} for outputs of shape "
                f"{tuple(o.shape)}, got {tuple(y.shape)}; pass one target per input, aligned with the inputs"
            )
        return y.to(device=o.device, dtype=o.dtype)

    def _label_shape(self, o: Tensor) -> tuple[int, ...]:
        return (o.shape[1],)

    def _align(self, y: Tensor, o: Tensor) -> Tensor:
        """View ``o`` (B, C) with singleton dims matching the labels' extra leading dims."""
        extra = y.dim() - 1 - self.label_ndim
        return o.reshape(o.shape[:1] + (1,) * extra + o.shape[1:])

    # ------------------------------------------------------------ interface
    @abstractmethod
    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """Draw ``k`` labels per input from ``p(·|o)``: shape ``(B, k, *label_shape)``.

        Randomness comes only from ``generator`` (torch's global generator when None).
        """

    @abstractmethod
    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        """Output score ``u = ∇_o log p(y|o)``, shape ``(*y's leading dims, C)``."""

    @abstractmethod
    def fisher_output(self, o: Tensor) -> Tensor:
        """Output Fisher ``Λ(o) = E[u uᵀ] = −∇²_o log p(y|o)``, shape ``(B, C, C)``."""

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        """A factor ``S`` (B, C, r) with ``S Sᵀ = Λ(o)`` (so ``Jᵀ Λ J = (SᵀJ)ᵀ(SᵀJ)``), ``r ≤ C``.

        Each column costs one backward pass in the exact Fisher, so families whose
        ``Λ`` has rank below ``C`` return fewer columns.
        """
        evals, evecs = torch.linalg.eigh(self.fisher_output(o))
        return evecs * evals.clamp_min(0).sqrt().unsqueeze(-2)

    @abstractmethod
    def fourth_moment(self, o: Tensor) -> Tensor:
        """``E_y[u_a u_b u_c u_d]``, shape ``(B, C, C, C, C)``."""

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``E_y[(uᵀv)² (uᵀw)²]`` for output-space vectors ``v, w`` (B, m, C) → (B, m)."""
        return torch.einsum("nabcd,nma,nmb,nmc,nmd->nm", self.fourth_moment(o), v, v, w, w)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        """``E_y[(uᵀ K u)²]`` for symmetric ``K`` (B, C, C) → (B,)."""
        return torch.einsum("nabcd,nab,ncd->n", self.fourth_moment(o), k, k)

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``E_y[(uᵀv)²] = vᵀΛv`` and ``E_y[(uᵀv)⁴]`` for output-space vectors ``v`` (B, m, C) → (B, m) each."""
        return torch.einsum("nma,nab,nmb->nm", v, self.fisher_output(o), v), self.moment4(o, v, v)

    @abstractmethod
    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        """``log p(y|o)`` with the labels' leading dims (``(B,)`` or ``(B, k)``)."""

    def nll(self, o: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood, mean over every label given (0-dim tensor)."""
        return -self.log_prob(o, y).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
