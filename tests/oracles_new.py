"""Independent float64 oracles for the heteroscedastic Gaussian, gamma and matrix Fisher families.

Log-likelihoods are written out by hand, and expectations over labels come from quadrature rules
built here (Gauss–Hermite for the Gaussian, graded Gauss–Legendre in ``log y`` for the gamma, an
Euler-angle product rule on SO(3) normalised by its own sum for the matrix Fisher), so a test that
compares a family against them checks it against the definitions, not against itself.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

NEW_WIDTH = {"heteroscedastic_gaussian": 4, "gamma": 4, "matrix_fisher": 9}
NEW_FAMILIES = tuple(NEW_WIDTH)


def log_likelihood(family: str, o: Tensor, y: Tensor) -> Tensor:
    """``log p(y | o)`` for one output vector ``o`` (C,) and one label, written by hand."""
    if family == "heteroscedastic_gaussian":
        mean, log_var = o.chunk(2)
        return (-0.5 * (y - mean) ** 2 / torch.exp(log_var) - 0.5 * log_var - 0.5 * math.log(2 * math.pi)).sum()
    if family == "gamma":
        mean, shape = torch.exp(o).chunk(2)
        rate = shape / mean
        return (shape * torch.log(rate) + (shape - 1) * torch.log(y) - rate * y - torch.lgamma(shape)).sum()
    if family == "matrix_fisher":
        return (o * y.reshape(9)).sum() - matrix_fisher_log_normaliser(o)
    raise KeyError(family)


def euler_grid(n: int = 32) -> tuple[Tensor, Tensor]:
    """Rotations ``Rz(α)Ry(β)Rz(γ)`` on a product grid and Haar weights summing to 1.

    Trapezoid (spectrally accurate for periodic integrands) in α and γ, Gauss–Legendre in cos β.
    """
    angles = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    nodes, weights = np.polynomial.legendre.leggauss(n)
    cos_b = torch.tensor(nodes)
    a, cb, g = torch.meshgrid(angles, cos_b, angles, indexing="ij")
    w = (torch.tensor(weights) / 2).reshape(1, n, 1).expand(n, n, n) / n**2
    sb = (1 - cb**2).sqrt()
    zero, one = torch.zeros_like(a), torch.ones_like(a)

    def matrix(rows: list[list[Tensor]]) -> Tensor:
        return torch.stack([torch.stack(row, -1) for row in rows], -2)

    def rz(t: Tensor) -> Tensor:
        c, s = torch.cos(t), torch.sin(t)
        return matrix([[c, -s, zero], [s, c, zero], [zero, zero, one]])

    ry = matrix([[cb, zero, sb], [zero, one, zero], [-sb, zero, cb]])
    return (rz(a) @ ry @ rz(g)).reshape(-1, 3, 3), w.reshape(-1)


#: Built at import, outside any torch.func transform: made inside one (a test's first use may be under
#: ``hessian``) the grid would be that transform's wrapped tensor, unusable once it has returned.
_GRID = euler_grid(32)


def matrix_fisher_log_normaliser(o: Tensor) -> Tensor:
    """``log ∫ exp(tr(AᵀR)) dR`` over the Haar probability measure, by the Euler-angle rule."""
    rotations, weights = _GRID
    exponent = rotations.reshape(-1, 9) @ o
    top = exponent.max().detach()
    return top + torch.log((weights * torch.exp(exponent - top)).sum())


def _gamma_rule(shape: float, panels: int = 160, order: int = 12) -> tuple[Tensor, Tensor]:
    """Nodes ``w`` and probabilities for ``w ~ Gamma(shape, 1)``: Gauss–Legendre panels in ``v = log w``."""
    mode = math.log(shape)
    lo, hi = mode - 45.0 / min(shape, 1.0) - 5.0, math.log(shape + 60.0 + 12 * math.sqrt(shape))
    x, wx = np.polynomial.legendre.leggauss(order)
    edges = np.linspace(lo, hi, panels + 1)
    half = (edges[1:] - edges[:-1])[:, None] / 2
    v = torch.tensor(((edges[1:] + edges[:-1])[:, None] / 2 + half * x).ravel())
    dv = torch.tensor((half * wx).ravel())
    log_density = shape * v - torch.exp(v) - math.lgamma(shape)
    return torch.exp(v), dv * torch.exp(log_density)


def label_rule(family: str, o: Tensor) -> tuple[Tensor, Tensor]:
    """Labels and probabilities (summing to 1 up to quadrature error) for one output row ``o``.

    Heteroscedastic Gaussian: 10-point Gauss–Hermite per dimension (exact for the polynomial
    moments used). Gamma: product of per-dimension rules (fine for one dimension, coarser for
    more). Matrix Fisher: the Euler grid
    weighted by ``exp(tr(AᵀR))`` and normalised by its own sum.
    """
    if family == "heteroscedastic_gaussian":
        mean, log_var = o.chunk(2)
        nodes, weights = np.polynomial.hermite_e.hermegauss(10)
        nodes, weights = torch.tensor(nodes), torch.tensor(weights / math.sqrt(2 * math.pi))
        d = mean.numel()
        z = torch.cartesian_prod(*[nodes] * d).reshape(-1, d)
        probs = torch.cartesian_prod(*[weights] * d).reshape(-1, d).prod(1)
        return mean + torch.exp(0.5 * log_var) * z, probs
    if family == "gamma":
        mean, shape = torch.exp(o).chunk(2)
        rules = [_gamma_rule(float(a), panels=160 if len(shape) == 1 else 32) for a in shape]
        w = torch.cartesian_prod(*[r[0] for r in rules]).reshape(-1, len(shape))
        probs = torch.cartesian_prod(*[r[1] for r in rules]).reshape(-1, len(shape)).prod(1)
        return w * mean / shape, probs
    rotations, weights = _GRID
    exponent = rotations.reshape(-1, 9) @ o
    probs = weights * torch.exp(exponent - exponent.max())
    return rotations, probs / probs.sum()


def label_moments(family: str, o: Tensor, hessians: bool = True) -> dict[str, Tensor]:
    """``E[u]``, ``E[uuᵀ]``, ``E[u⊗u⊗u]``, ``E[u⊗u⊗u⊗u]``, ``E[−∇²_o log p]`` and ``Σ p`` for one row ``o``.

    Scores and Hessians come from autograd of the hand-written :func:`log_likelihood` (for the
    matrix Fisher family the normaliser is the oracle's own quadrature). ``hessians=False`` skips
    ``E[−∇²_o log p]`` (returned as None).
    """
    labels, probs = label_rule(family, o)
    score = torch.func.grad(lambda out, y: log_likelihood(family, out, y))
    hessian = torch.func.hessian(lambda out, y: log_likelihood(family, out, y))
    if family == "matrix_fisher":
        # The normaliser's quadrature is not vmap-friendly; u = vec R − E[vec R] by hand, and the
        # Hessian (free of R for this canonical family) at one label.
        flat = labels.reshape(-1, 9)
        u = flat - probs @ flat
        neg_hessian = -hessian(o, labels[0]) if hessians else None
    else:
        u = torch.func.vmap(score, in_dims=(None, 0))(o, labels)
        neg_hessian = None
        if hessians:
            neg_hessian = -torch.einsum("s,sab->ab", probs, torch.func.vmap(hessian, in_dims=(None, 0))(o, labels))
    outer = torch.einsum("sa,sb->sab", u, u).reshape(len(u), -1)
    return {
        "total": probs.sum(),
        "m1": probs @ u,
        "m2": torch.einsum("s,sa,sb->ab", probs, u, u),
        "m3": torch.einsum("s,sa,sb,sc->abc", probs, u, u, u),
        "m4": ((outer * probs.unsqueeze(-1)).T @ outer).reshape((o.numel(),) * 4),
        "neg_hessian": neg_hessian,
    }
