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


def robust_eigvalsh(a: Tensor) -> Tensor:
    """Eigenvalues (ascending) of symmetric matrices ``a`` (..., n, n), computed in float64.

    Half and bfloat16 have no eigen-solver and float32 ones may fail to converge on ill-conditioned
    matrices (confident classifiers), so the solve runs in float64 on a symmetrised copy; a matrix
    whose solver still fails gets the Gershgorin upper bound on its spectrum in its top entry
    (callers use the top eigenvalue as a bound constant, which an upper bound keeps valid).
    """
    a64 = a.to(torch.float64)
    a64 = 0.5 * (a64 + a64.transpose(-1, -2))
    try:
        return torch.linalg.eigvalsh(a64)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses RuntimeError
        radius = a64.abs().sum(-1).amax(-1)
        n = a64.shape[-1]
        evals = torch.zeros(a64.shape[:-1], dtype=torch.float64, device=a64.device)
        evals[..., n - 1] = radius
        return evals


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

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        """``E_y[(uᵀv_p)² (uᵀv_q)²]`` for every pair of output-space vectors ``v`` (B, m, C) → (B, m, m).

        The Î1 variance of ``full``/``blocks`` entries needs it; families override it to avoid the
        ``C⁴`` moment tensor (memory linear in ``C`` per input and vector).
        """
        return torch.einsum("nabcd,npa,npb,nqc,nqd->npq", self.fourth_moment(o), v, v, v, v)

    def third_moment(self, o: Tensor) -> Tensor:
        """``E_y[u_a u_b u_c]``, shape ``(B, C, C, C)`` (the covariance of Î1 and Î2 needs it)."""
        raise TorchfimError(
            f"family {self.name!r} does not provide third moments of its output score; "
            "implement Family.third_moment to use the combined estimator with it"
        )

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """``E_y[(uᵀa)(uᵀb)(uᵀc)]`` for output-space vectors ``a, b, c`` (B, m, C) → (B, m)."""
        return torch.einsum("nxyz,nmx,nmy,nmz->nm", self.third_moment(o), a, b, c)

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(Λ(o))`` per input, shape ``(B,)``: the constant of the Î2 spectral bound."""
        return robust_eigvalsh(self.fisher_output(o))[..., -1].to(o.dtype)

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ_max(M)`` per input, shape ``(B,)``, ``M = E[vec(uuᵀ) vec(uuᵀ)ᵀ]`` read as ``C²×C²``.

        The constant of the spectral Î1 bound. Any upper bound on it keeps that bound valid, so
        families may return a cheaper upper bound where the exact value is out of reach (say so).
        """
        c = o.shape[-1]
        return robust_eigvalsh(self.fourth_moment(o).reshape(o.shape[0], c * c, c * c))[..., -1].to(o.dtype)

    @abstractmethod
    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        """``log p(y|o)`` with the labels' leading dims (``(B,)`` or ``(B, k)``)."""

    def nll(self, o: Tensor, y: Tensor) -> Tensor:
        """Negative log-likelihood, mean over every label given (0-dim tensor)."""
        return -self.log_prob(o, y).mean()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
