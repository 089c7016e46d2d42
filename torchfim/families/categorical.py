"""The categorical family: logits of C classes."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import TorchfimError
from .base import Family, _to_generator_device


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
