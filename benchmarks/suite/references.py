"""Independent computations of the quantities that no peer computes, to check torchfim against."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from .models import Data

__all__ = ["score_variance_reference", "hessian_variance_reference"]


def score_variance_reference(model: nn.Module, data: Data) -> Tensor:
    """``Var(Î1)`` diagonal by enumerating the C labels, per-input gradients by ``torch.func`` (float64).

    ``Var = (1/n²) Σᵢ (Σ_c pᵢc gᵢc⁴ − (Σ_c pᵢc gᵢc²)²)`` with ``gᵢc = ∇θ log p(c|xᵢ)``: independent
    of torchfim's code (no output-score moments, no fourth-moment tensor).
    """
    from torch.func import functional_call, grad, vmap

    net = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def log_prob(p, x, c):
        return torch.log_softmax(functional_call(net, p, (x.unsqueeze(0),)).squeeze(0), -1)[c]

    per_input = vmap(grad(log_prob), in_dims=(None, 0, None))
    total, n = None, 0
    for x in data.batches:
        x = x.double()
        with torch.no_grad():
            probs = torch.softmax(net(x), -1)
        m2 = m4 = 0.0
        for c in range(probs.shape[1]):
            g = torch.cat([t.reshape(x.shape[0], -1) for t in per_input(params, x, c).values()], 1)
            w = probs[:, c : c + 1]
            g2 = g * g
            m2 = m2 + w * g2
            m4 = m4 + w * g2 * g2
        part = (m4 - m2 * m2).sum(0)
        total = part if total is None else total + part
        n += x.shape[0]
    return total / n**2


def hessian_variance_reference(model: nn.Module, data: Data, index: Tensor) -> Tensor:
    """``Var(Î2)_pp`` at the flat indices ``index``, by second directional derivatives (float64).

    ``Var(Î2)_pp = (1/n²) Σᵢ hᵢᵀ Λᵢ hᵢ`` with ``hᵢ = ∂²o(xᵢ)/∂θ_p²`` from nested ``torch.func.jvp``
    along ``e_p`` of the batched forward, one coordinate at a time.
    """
    from torch.func import functional_call, jvp

    net = copy.deepcopy(model).double()
    names = [k for k, _ in net.named_parameters()]
    base = [v.detach() for _, v in net.named_parameters()]
    sizes = [v.numel() for v in base]
    X = torch.cat(data.batches).double()
    with torch.no_grad():
        probs = torch.softmax(net(X), -1)
    lam = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    out = []
    for p in index.tolist():
        which, offset = 0, p
        while offset >= sizes[which]:
            offset -= sizes[which]
            which += 1
        direction = torch.zeros(sizes[which], dtype=torch.float64)
        direction[offset] = 1.0
        direction = direction.view_as(base[which])

        def outputs(t, which=which, direction=direction):
            params = dict(zip(names, base))
            params[names[which]] = base[which] + t * direction
            return functional_call(net, params, (X,))

        zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        h = jvp(lambda t, one=one: jvp(outputs, (t,), (one,))[1], (zero,), (one,))[1]  # (n, C)
        out.append(torch.einsum("na,nab,nb->", h, lam, h) / X.shape[0] ** 2)
    return torch.stack(out)
