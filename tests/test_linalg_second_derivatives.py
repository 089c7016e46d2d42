"""Second derivatives through linear solves, determinants and Householder products (``torchfim.engine.composite_linalg``).

torch 2.13's forward-mode rules of ``linalg.solve``, ``det``, ``slogdet``, ``logdet``, ``cholesky_inverse`` and
``householder_product`` are not themselves differentiated correctly in forward mode, so every output-Hessian diagonal
torchfim takes by ``jvp`` of ``jvp`` through them came out silently wrong: the Î2 variance of an orthogonally
parametrised layer's entries up to 75 % (Cayley map) and 99 % (Householder, the default for a non-square weight) off,
of the trace 23 % and 78 %; on a model of determinants and solves 64 % and 37 %. The oracles are reverse-over-reverse Hessians
(right for these functions, as central differences of gradients confirm) and :mod:`oracles`' float64 ``∇²_θ o``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from oracles import assert_hessian_bound_holds, assert_hessian_variance_is_the_oracles, variance_oracle
from torch import nn
from torch.func import jvp
from torch.nn.utils.parametrizations import orthogonal

from torchfim.engine.composites import composite_forms


def _randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float64)


_SQUARE = _randn(2, 4, 4) + 3 * torch.eye(4, dtype=torch.float64)
_FUNCTIONS = {  # name -> a function of a batch of well-conditioned 4×4 matrices, as the model calls it
    "solve": lambda a: torch.linalg.solve(a, a.mT.exp()),
    "solve-vector": lambda a: torch.linalg.solve(a, a[..., 0].exp()),
    "solve-right": lambda a: torch.linalg.solve(a, a[..., :3, :].cos(), left=False),
    "solve_ex": lambda a: torch.linalg.solve_ex(a, a.mT.exp(), left=False).result,
    "tensorsolve": lambda a: torch.linalg.tensorsolve(a[0].reshape(4, 2, 2), a[1, 0].exp().reshape(2, 2), dims=(0,)),
    "triangular_solve": lambda a: torch.triangular_solve(a.mT.exp(), a, upper=False, transpose=True).solution,
    "det": lambda a: torch.linalg.det(a[..., [1, 0, 2, 3], :]),
    "det-method": lambda a: a.det(),
    "slogdet": lambda a: torch.stack(tuple(torch.linalg.slogdet(a - 3.5 * torch.eye(4, dtype=a.dtype)))),
    "logdet": lambda a: torch.logdet(a @ a.mT),
    "cholesky_inverse": lambda a: torch.cholesky_inverse(torch.linalg.cholesky(a @ a.mT), upper=False),
    "householder_product": lambda a: torch.linalg.householder_product(a[..., :3], a[..., 0, :2].sigmoid()),
}


@pytest.mark.parametrize("name", list(_FUNCTIONS))
def test_forward_over_forward_through_the_composite_is_reverse_over_reverse(name: str) -> None:
    """Values to round-off of torch's own; ``eᵀ∇²f e`` by ``jvp`` of ``jvp`` under :func:`composite_forms` equal to
    torch's double backward (torch's own ``jvp`` of ``jvp`` was 0.5-10000 % off)."""
    torch.manual_seed(0)
    direction = _randn(2, 4, 4)

    def scalar(a: torch.Tensor) -> torch.Tensor:
        return _FUNCTIONS[name](a).sin().sum()

    with composite_forms():
        value = _FUNCTIONS[name](_SQUARE)
        second = jvp(lambda a: jvp(scalar, (a,), (direction,))[1], (_SQUARE,), (direction,))[1]
    exact = direction.flatten() @ torch.autograd.functional.hessian(scalar, _SQUARE).reshape(32, 32) @ direction.flatten()
    assert torch.allclose(value, _FUNCTIONS[name](_SQUARE), rtol=1e-12, atol=1e-12)
    assert torch.isclose(second, exact, rtol=1e-10, atol=0)


class _Orthogonal(nn.Module):
    """Linear → orthogonally parametrised Linear → tanh → Linear head."""

    def __init__(self, width: int, orthogonal_map: str | None) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.mixed = orthogonal(nn.Linear(4, width), orthogonal_map=orthogonal_map)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mixed(self.first(x))))


class _Determinants(nn.Module):
    """A Linear's output read as 2×2 matrices ``M``; features ``log|det M|``, ``det M``, ``M⁻¹b`` → Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.first(x).reshape(-1, 2, 2) + 2 * torch.eye(2, dtype=x.dtype)
        features = [torch.linalg.slogdet(m).logabsdet, torch.det(m), torch.linalg.solve(m, m[..., 1].exp()).sum(-1)]
        return self.head(torch.tanh(torch.cat([torch.stack(features, -1), m[..., 0, :1]], -1)))


MODELS = {"cayley": lambda: _Orthogonal(4, "cayley"), "householder": lambda: _Orthogonal(2, None),
          "determinants": _Determinants}


@pytest.fixture(scope="module", params=list(MODELS))
def setting(request):
    torch.manual_seed(0)
    model = MODELS[request.param]().double()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return model, x, variance_oracle(copy.deepcopy(model), x, "categorical", 1)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_the_hessian_variance_through_solves_and_determinants_is_the_oracles(setting, backend: str) -> None:
    model, x, oracle = setting
    assert_hessian_variance_is_the_oracles(model, x, oracle, backend)


def test_the_hessian_bound_through_solves_and_determinants_holds_the_oracles_variance(setting) -> None:
    model, x, oracle = setting
    assert_hessian_bound_holds(model, x, oracle)
