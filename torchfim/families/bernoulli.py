"""The Bernoulli family: one logit per input."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError
from .base import Family, _to_generator_device, _wide_float, _work_dtype


def _variance_and_root(o: Tensor) -> tuple[Tensor, Tensor]:
    """``Λ = σ(o)σ(−o) = e^{−|o|}/(1 + e^{−|o|})²`` and ``√Λ = e^{−|o|/2}/(1 + e^{−|o|})``.

    Written in ``|o|`` so that no ``1 − p`` is formed: ``p(1 − p)`` cancels to exactly 0 for logits
    above ≈ 17 (float32) or 37 (float64), and the result is exactly symmetric, ``Λ(o) = Λ(−o)``.
    The root is formed directly, so it stays representable where ``Λ`` underflows.
    """
    t = torch.exp(-o.abs())
    denominator = 1 + t
    return t / denominator**2, torch.exp(-0.5 * o.abs()) / denominator


#: A Bernoulli model that ends in a sigmoid.
SIGMOID = (
    "torchfim: the model's outputs come out of a sigmoid (probabilities), but the bernoulli family reads them as "
    "logits (p = sigmoid(outputs)), so the Fisher would be that of another model; drop the final sigmoid (train "
    "with BCEWithLogitsLoss, which takes logits)"
)


class Bernoulli(Family):
    """Bernoulli with one logit ``o``: ``p = sigmoid(o)``, labels in ``{0, 1}`` of shape ``(1,)``.

    ``u = y − p`` (computed as ``y σ(−o) − (1 − y) σ(o)``, exact for both labels);
    ``Λ = p(1 − p) = σ(o)σ(−o)``; ``E[u³] = Λ(1 − 2p) = −Λ tanh(o/2)``;
    ``E[u⁴] = p(1−p)⁴ + (1−p)p⁴ = Λ(1 − 3Λ)``. All computed without cancellation for large ``|o|``,
    in float32 at least (half-precision logits).

    Example:
        >>> import torch
        >>> from torchfim.families import Bernoulli
        >>> o = torch.tensor([[0.0], [2.0]], dtype=torch.float64)  # one logit per input
        >>> p = torch.sigmoid(o)
        >>> torch.allclose(Bernoulli().fisher_output(o), (p * (1 - p))[:, :, None])  # Λ = p(1 − p), (B, 1, 1)
        True
        >>> y = torch.tensor([[1.0], [0.0]], dtype=torch.float64)
        >>> torch.allclose(Bernoulli().output_score(y, o), y - p)  # u = y − p
        True
    """

    name = "bernoulli"
    misread = {"SigmoidBackward0": SIGMOID}

    def _width_hint(self) -> str:
        return "1"

    def _check_width(self, width: int) -> None:
        if width != 1:
            raise TorchfimError(
                f"family 'bernoulli' expects one logit per input, shape (batch, 1), got {width} outputs; "
                f"use family='categorical' for {width} exclusive classes, or, for {width} independent binary labels "
                f"per input, return the outputs as (batch, {width}, 1) ({width} positions of one logit, targets "
                f"(batch, {width}))"
            )

    def _filler_label(self, o: Tensor) -> Tensor:
        return torch.zeros_like(o)

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        y = super().check_targets(y, o)
        if not bool(((y == 0) | (y == 1)).all()):
            raise TorchfimError("bernoulli targets must be 0 or 1; threshold or binarise them first")
        return y

    def _wide(self, o: Tensor) -> Tensor:
        return o.to(_work_dtype(o)[0])

    def _lam(self, o: Tensor) -> Tensor:
        return _variance_and_root(self._wide(o))[0]

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``k`` labels per logit: the rarer label where ``U < σ(−|o|)`` for ``U`` uniform in float64.

        Neither ``p`` nor ``1 − p`` of the likelier label is formed: ``σ(o)`` rounds to 1 in float32
        for ``o ≥ 17`` (16.6), and label 0 was then never drawn; here the rare label keeps its
        probability to float64's resolution, ``2⁻⁵³`` absolute.
        """
        logit = _to_generator_device(o.detach(), generator)
        logit = logit.to(_wide_float(logit.device)).unsqueeze(1)
        uniform = torch.rand((o.shape[0], k, 1), generator=generator, dtype=logit.dtype, device=logit.device)
        rare = uniform < torch.sigmoid(-logit.abs())
        labels = torch.where(logit >= 0, ~rare, rare)  # the rare label is 0 for o ≥ 0, 1 below
        return labels.to(device=o.device, dtype=o.dtype)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        logit = self._wide(self._align(y, o))
        y = y.to(logit.dtype)
        return (y * torch.sigmoid(-logit) - (1 - y) * torch.sigmoid(logit)).to(o.dtype)

    def fisher_output(self, o: Tensor) -> Tensor:
        return self._lam(o).unsqueeze(-1).to(o.dtype)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        return _variance_and_root(self._wide(o))[1].unsqueeze(-1).to(o.dtype)

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``Λ v w`` (C = 1)."""
        work, out = _work_dtype(o, v, w)
        return (self._lam(o).to(work) * (v.to(work) * w.to(work)).squeeze(-1)).to(out)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        """``Λ v_p v_q`` (C = 1)."""
        work, out = _work_dtype(o, v)
        flat = v.to(work).squeeze(-1)
        return (self._lam(o).to(work).unsqueeze(-1) * flat.unsqueeze(-1) * flat.unsqueeze(-2)).to(out)

    def _m4(self, o: Tensor) -> Tensor:
        """``E[u⁴] = Λ(1 − 3Λ)`` (B, 1); ``1 − 3Λ ≥ 1/4``, so no cancellation."""
        lam = self._lam(o)
        return lam * (1 - 3 * lam)

    def fourth_moment(self, o: Tensor) -> Tensor:
        return self._m4(o).reshape(-1, 1, 1, 1, 1).to(o.dtype)

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        work, out = _work_dtype(o, v, w)
        return (self._m4(o).to(work) * (v.to(work) * w.to(work)).squeeze(-1) ** 2).to(out)

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        """``E[u⁴] v_p² v_q²``."""
        work, out = _work_dtype(o, v)
        squared = v.to(work).squeeze(-1) ** 2
        return (self._m4(o).to(work).unsqueeze(-1) * squared.unsqueeze(-1) * squared.unsqueeze(-2)).to(out)

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        work, out = _work_dtype(o, v)
        squared = v.to(work).squeeze(-1) ** 2
        return (self._lam(o).to(work) * squared).to(out), (self._m4(o).to(work) * squared**2).to(out)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        work, out = _work_dtype(o, k)
        return (self._m4(o).to(work).reshape(-1) * k.to(work).reshape(-1) ** 2).to(out)

    def score_line(self, o: Tensor) -> tuple[Tensor, Tensor]:
        """One output, ``e = 1``, and ``Var(u²) = E[u⁴] − Λ² = Λ(1 − 3Λ) − Λ² = Λ(1 − 4Λ) = Λ(1 − 2p)² = Λ tanh²(o/2)``
        (B,), since ``1 − 4p(1 − p) = (1 − 2p)²`` and ``1 − 2σ(o) = −tanh(o/2)``. The difference itself cancels
        near ``p = ½``: at logit 1e-9 it gave −1.4e-17 where the value is 6e-20."""
        wide = self._wide(o)
        return (_variance_and_root(wide)[0] * torch.tanh(0.5 * wide) ** 2).reshape(-1), torch.ones(1, device=o.device)

    def _m3(self, o: Tensor) -> Tensor:
        """``E[u³] = Λ(1 − 2p) = −Λ tanh(o/2)`` (B, 1)."""
        wide = self._wide(o)
        return -_variance_and_root(wide)[0] * torch.tanh(0.5 * wide)

    def third_moment(self, o: Tensor) -> Tensor:
        return self._m3(o).reshape(-1, 1, 1, 1).to(o.dtype)

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        work, out = _work_dtype(o, a, b, c)
        product = (a.to(work) * b.to(work) * c.to(work)).squeeze(-1)
        return (self._m3(o).to(work) * product).to(out)

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``Λ = σ(o)σ(−o)`` itself (a 1×1 matrix)."""
        return self._lam(o).reshape(-1).to(o.dtype)

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``E[u⁴] = Λ(1 − 3Λ)`` itself (a 1×1 matrix)."""
        return self._m4(o).reshape(-1).to(o.dtype)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        logits = self._wide(self._align(y, o))
        y = y.to(logits.dtype)
        return (y * logits - torch.nn.functional.softplus(logits)).squeeze(-1).to(o.dtype)
