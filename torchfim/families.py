"""Output families: how a network output ``o`` becomes a distribution ``p(y | o)``.

Every family here satisfies ``E_y[u] = 0`` and ``E_y[u uᵀ] = Λ(o) = −∇²_o log p(y|o)``
for the output score ``u = ∇_o log p(y|o)``, with ``Λ`` independent of ``y``
(canonical-link exponential families, and the Gaussian with fixed variance
parametrised by its mean). That is what makes the Fisher information of a
network equal to ``Jᵀ Λ J``; see ``DESIGN.md`` §1–2.

Shapes: outputs ``o`` are ``(B, C)``. Labels carry the batch dimension first, may
carry extra leading sample dimensions after it (``(B, k, ...)`` from
:meth:`Family.sample`) and end with the family's own label shape: ``()`` for a
class index, ``(1,)`` for a Bernoulli outcome, ``(C,)`` for Gaussian or Poisson
vectors. Output scores are returned with the labels' leading dimensions and a
trailing ``C``.

Example:
    >>> import torch
    >>> from torchfim.families import get_family
    >>> fam = get_family("categorical")
    >>> o = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    >>> y = fam.sample(o, 4, torch.Generator().manual_seed(0))
    >>> y.shape, fam.output_score(y, o).shape, fam.fisher_output(o).shape
    (torch.Size([1, 4]), torch.Size([1, 4, 3]), torch.Size([1, 3, 3]))
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

from .errors import TorchfimError


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


class Categorical(Family):
    """Categorical over ``C`` classes with logits ``o``: ``p = softmax(o)``.

    ``u = e_y − p``; ``Λ = diag(p) − ppᵀ``; fourth moments by exact enumeration
    over the ``C`` classes.
    """

    name = "categorical"
    label_ndim = 0

    def _width_hint(self) -> str:
        return "num_classes"

    def _check_width(self, width: int) -> None:
        if width < 2:
            raise TorchfimError(
                f"family 'categorical' needs at least 2 logits per input, got {width}; "
                "for a single logit use family='bernoulli'"
            )

    def _label_shape(self, o: Tensor) -> tuple[int, ...]:
        return ()

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        if y.dim() == 2 and y.shape[1] == o.shape[1] and y.is_floating_point():
            raise TorchfimError(
                "categorical targets must be class indices of shape (batch,), got a (batch, C) "
                "float tensor; pass y.argmax(dim=1) if these are one-hot labels"
            )
        if y.is_floating_point() or y.is_complex():
            raise TorchfimError(
                f"categorical targets must be integer class indices, got dtype {y.dtype}; pass y.long()"
            )
        if tuple(y.shape) != (o.shape[0],):
            raise TorchfimError(
                f"categorical targets must have shape ({o.shape[0]},) for outputs of shape "
                f"{tuple(o.shape)}, got {tuple(y.shape)}; pass one class index per input"
            )
        if y.numel() and (int(y.min()) < 0 or int(y.max()) >= o.shape[1]):
            raise TorchfimError(
                f"categorical targets must lie in [0, {o.shape[1] - 1}], got values in "
                f"[{int(y.min())}, {int(y.max())}]; check that the model has one logit per class"
            )
        return y.to(device=o.device, dtype=torch.long)

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        probs = _to_generator_device(torch.softmax(o.detach(), dim=-1), generator)
        return torch.multinomial(probs, k, replacement=True, generator=generator).to(o.device)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        p = torch.softmax(self._align(y, o), dim=-1)
        return torch.nn.functional.one_hot(y, o.shape[-1]).to(o.dtype) - p

    def fisher_output(self, o: Tensor) -> Tensor:
        p = torch.softmax(o, dim=-1)
        return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        # Λ = diag(s)(I − s sᵀ)diag(s) with s = √p a unit vector (Σ p = 1), so Λ has rank C − 1 and
        # S = diag(s) Q for any orthonormal basis Q (C × (C−1)) of s⊥. Q: the Householder reflection
        # H = I − v vᵀ/(1 + s_k), v = s + e_k, maps s to −e_k, so its columns other than k span s⊥.
        # k = argmax p keeps 1 + s_k ≥ 1 + 1/√C away from 0. One column fewer means one backward
        # pass fewer in the exact Fisher.
        p = torch.softmax(o, dim=-1)
        s = p.sqrt()
        c = o.shape[-1]
        k = p.argmax(-1, keepdim=True)
        v = s.scatter_add(-1, k, torch.ones_like(k, dtype=s.dtype))
        scale = 1.0 / (1.0 + s.gather(-1, k))
        eye = torch.eye(c, dtype=o.dtype, device=o.device)
        h = eye - (scale.unsqueeze(-1) * v.unsqueeze(-1)) * v.unsqueeze(-2)
        keep = torch.arange(c - 1, device=o.device) + (torch.arange(c - 1, device=o.device) >= k).long()
        q = h.gather(-1, keep.unsqueeze(-2).expand(*h.shape[:-1], c - 1))
        return s.unsqueeze(-1) * q

    def fourth_moment(self, o: Tensor) -> Tensor:
        p = torch.softmax(o, dim=-1)
        eye = torch.eye(o.shape[-1], dtype=o.dtype, device=o.device)
        d = eye - p.unsqueeze(1)  # d[n, y] = e_y − p, the score for label y
        return torch.einsum("ny,nya,nyb,nyc,nyd->nabcd", p, d, d, d, d)

    # Enumerating the C labels is cheaper than contracting the C⁴ moment tensor.
    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        p = torch.softmax(o, dim=-1).unsqueeze(1)  # (B, 1, C)
        uv = v - (p * v).sum(-1, keepdim=True)  # uᵀv for u = e_y − p, per label y
        uw = w - (p * w).sum(-1, keepdim=True)
        return (p * uv**2 * uw**2).sum(-1)

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        # uᵀv = v_y − pᵀv for label y. One label at a time: each (B, m) slice stays in cache, which
        # is several times faster than broadcasting over (C, B, m) (v is often a class-last view of
        # class-first data, one back-propagated vector per class).
        p = torch.softmax(o, dim=-1).T  # (C, B)
        by_label = v.permute(2, 0, 1)  # (C, B, m)
        mean = torch.einsum("cbm,cb->bm", by_label, p)
        second, fourth = torch.zeros_like(mean), torch.zeros_like(mean)
        for y in range(by_label.shape[0]):
            squared = (by_label[y] - mean).square_()
            second.addcmul_(squared, p[y].unsqueeze(-1))
            fourth.addcmul_(squared.square_(), p[y].unsqueeze(-1))
        return second, fourth

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        p = torch.softmax(o, dim=-1)
        eye = torch.eye(o.shape[-1], dtype=o.dtype, device=o.device)
        d = eye - p.unsqueeze(1)
        quad = torch.einsum("nya,nab,nyb->ny", d, k, d)
        return (p * quad**2).sum(-1)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        logp = torch.log_softmax(self._align(y, o), dim=-1)
        logp = logp.expand(y.shape + o.shape[-1:])
        return logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)


class Bernoulli(Family):
    """Bernoulli with one logit ``o``: ``p = sigmoid(o)``, labels in ``{0, 1}`` of shape ``(1,)``.

    ``u = y − p``; ``Λ = p(1 − p)``; fourth moment ``p(1−p)⁴ + (1−p)p⁴``.
    """

    name = "bernoulli"

    def _width_hint(self) -> str:
        return "1"

    def _check_width(self, width: int) -> None:
        if width != 1:
            raise TorchfimError(
                f"family 'bernoulli' expects one logit per input, shape (batch, 1), got {width} outputs; "
                "use family='categorical' for several classes"
            )

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        if y.dim() == 1:
            y = y.unsqueeze(1)
        y = super().check_targets(y, o)
        if not bool(((y == 0) | (y == 1)).all()):
            raise TorchfimError("bernoulli targets must be 0 or 1; threshold or binarise them first")
        return y

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        p = _to_generator_device(torch.sigmoid(o.detach()), generator)
        probs = p.unsqueeze(1).expand(p.shape[0], k, 1)
        return torch.bernoulli(probs, generator=generator).to(o.device)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        return y.to(o.dtype) - torch.sigmoid(self._align(y, o))

    def fisher_output(self, o: Tensor) -> Tensor:
        p = torch.sigmoid(o)
        return (p * (1 - p)).unsqueeze(-1)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        p = torch.sigmoid(o)
        return (p * (1 - p)).sqrt().unsqueeze(-1)

    def fourth_moment(self, o: Tensor) -> Tensor:
        p = torch.sigmoid(o)
        m4 = p * (1 - p) ** 4 + (1 - p) * p**4
        return m4.reshape(-1, 1, 1, 1, 1)

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        return self.fourth_moment(o).reshape(-1, 1) * (v * w).squeeze(-1) ** 2

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        return self.fourth_moment(o).reshape(-1) * k.reshape(-1) ** 2

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        logits = self._align(y, o)
        y = y.to(o.dtype)
        return (y * logits - torch.nn.functional.softplus(logits)).squeeze(-1)


class Gaussian(Family):
    """Gaussian ``N(o, σ² I)`` with fixed ``σ`` and mean ``o``.

    ``u = (y − o)/σ²``; ``Λ = I/σ²``; fourth moments by Isserlis' theorem.
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
            raise TorchfimError(f"Gaussian sigma must be a positive finite number, got {sigma!r}")
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        mean = o.detach()
        noise = torch.randn(
            (o.shape[0], k, o.shape[1]),
            generator=generator,
            dtype=o.dtype,
            device=generator.device if generator is not None else o.device,
        ).to(o.device)
        return mean.unsqueeze(1) + self.sigma * noise

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        return (y.to(o.dtype) - self._align(y, o)) / self.sigma**2

    def fisher_output(self, o: Tensor) -> Tensor:
        eye = torch.eye(o.shape[-1], dtype=o.dtype, device=o.device)
        return (eye / self.sigma**2).expand(o.shape[0], -1, -1)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        eye = torch.eye(o.shape[-1], dtype=o.dtype, device=o.device)
        return (eye / self.sigma).expand(o.shape[0], -1, -1)

    def fourth_moment(self, o: Tensor) -> Tensor:
        return _isserlis(self.fisher_output(o))

    def _lam_diag(self, o: Tensor) -> Tensor:
        return torch.full_like(o, 1 / self.sigma**2)

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        return _isserlis_moment4(self._lam_diag(o), v, w)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        return _isserlis_quadratic(self._lam_diag(o), k)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        diff = y.to(o.dtype) - self._align(y, o)
        c = o.shape[-1]
        return -0.5 * (diff**2).sum(-1) / self.sigma**2 - 0.5 * c * math.log(2 * math.pi * self.sigma**2)


class Poisson(Family):
    """Independent Poisson counts with log-rates ``o``: ``λ = exp(o)``.

    ``u = y − λ``; ``Λ = diag(λ)``; fourth moments: Isserlis pairings of ``Λ`` plus
    the fourth cumulant ``λ_a`` when ``a = b = c = d``.
    """

    name = "poisson"

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        y = super().check_targets(y, o)
        if bool((y < 0).any()) or not bool((y == y.round()).all()):
            raise TorchfimError("poisson targets must be non-negative integer counts")
        return y

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        rate = _to_generator_device(torch.exp(o.detach()), generator)
        rate = rate.unsqueeze(1).expand(rate.shape[0], k, rate.shape[1]).contiguous()
        return torch.poisson(rate, generator=generator).to(o.device)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        return y.to(o.dtype) - torch.exp(self._align(y, o))

    def fisher_output(self, o: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(o))

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        return torch.diag_embed(torch.exp(0.5 * o))

    def fourth_moment(self, o: Tensor) -> Tensor:
        rate = torch.exp(o)
        moments = _isserlis(torch.diag_embed(rate))
        idx = torch.arange(o.shape[-1], device=o.device)
        moments[:, idx, idx, idx, idx] += rate
        return moments

    # The fourth cumulant λ_a adds to the Gaussian (Isserlis) part when a = b = c = d.
    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        rate = torch.exp(o)
        return _isserlis_moment4(rate, v, w) + (rate.unsqueeze(1) * v**2 * w**2).sum(-1)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        rate = torch.exp(o)
        return _isserlis_quadratic(rate, k) + (rate * torch.diagonal(k, dim1=-2, dim2=-1) ** 2).sum(-1)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        logr = self._align(y, o)
        y = y.to(o.dtype)
        return (y * logr - torch.exp(logr) - torch.lgamma(y + 1)).sum(-1)


FAMILIES: dict[str, type[Family]] = {
    cls.name: cls for cls in (Categorical, Bernoulli, Gaussian, Poisson)
}


def get_family(family: str | Family) -> Family:
    """Return a :class:`Family` from its name (``"categorical"``, ``"bernoulli"``,
    ``"gaussian"``, ``"poisson"``) or pass an instance through."""
    if isinstance(family, Family):
        return family
    if isinstance(family, str) and family in FAMILIES:
        return FAMILIES[family]()
    listed = ", ".join(repr(n) for n in FAMILIES)
    raise TorchfimError(
        f"unknown family {family!r}; choose one of {listed} or pass a torchfim.families.Family instance"
    )
