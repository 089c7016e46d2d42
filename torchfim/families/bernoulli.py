"""The Bernoulli family: one logit per input."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError
from .base import Family, _to_generator_device


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
