"""Metamorphic relations: transformations of the model or of the data that leave the function (or the data set) the
same, and how every closed-form quantity must follow. Each quantity of the transformed problem is compared with the
untransformed one, mapped by hand, in float64, on both backends (tolerance 1e-12; the largest difference 1.1e-15 when written).

* Rescaling a ReLU layer's weights and bias by ``c`` and the next layer's weights by ``1/c`` keeps the function: θ'
  = Dθ with ``D`` diagonal, so ``F' = D⁻¹FD⁻¹`` and each entry of Var Î1, Var Î2 and Cov(Î1, Î2) scales by the square
  of ``F``'s factor. Permuting the hidden units permutes every entry (the bounds included).
* Adding to every categorical logit a shift that depends on the input and on a parameter of its own keeps the
  softmax: ``Λ1 = 0`` and ``Σ_a u_a = 0``, so the shift's parameter has zero Fisher and zero variances, and every other
  entry (and Î1, Î2 drawn from the same seed) is unchanged.
* The inputs in any order, in mini-batches of any size (a short last one included), give the same variances,
  covariance and bounds; the data set given twice keeps the Fisher and halves the variances, the covariance and the
  bounds (``1/n²`` over ``2n`` inputs).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import torchfim

C_SCALE = 2.5


def _mlp(activation: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), activation, nn.Linear(5, 3)).double()


def _inputs(n: int = 9) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-12) -> None:
    assert float((got - want).abs().max()) <= rtol * float(want.abs().max()) + 1e-300


def _quantities(model: nn.Module, x, structure: str, backend: str) -> dict[str, torch.Tensor]:
    """Fisher, Var Î1, Var Î2, Cov(Î1, Î2) and the two bounds of ``model`` over ``x``."""
    kw = {"structure": structure, "backend": backend}
    return {"fisher": torchfim.fisher(model, x, **kw),
            "score variance": torchfim.fisher_variance(model, x, estimator="score", **kw),
            "hessian variance": torchfim.fisher_variance(model, x, estimator="hessian", **kw),
            "covariance": torchfim.fisher_covariance(model, x, **kw),
            "score bound": torchfim.variance_bound(model, x, estimator="score", **kw),
            "hessian bound": torchfim.variance_bound(model, x, estimator="hessian", **kw)}


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_rescaled_relu_layer_transforms_by_the_jacobian_and_a_permutation_permutes(backend):
    model, x = _mlp(nn.ReLU()), _inputs()
    scaled, permuted = copy.deepcopy(model), copy.deepcopy(model)
    perm = torch.tensor([3, 0, 4, 1, 2])
    with torch.no_grad():
        scaled[0].weight.mul_(C_SCALE), scaled[0].bias.mul_(C_SCALE), scaled[2].weight.div_(C_SCALE)
        permuted[0].weight.copy_(model[0].weight[perm]), permuted[0].bias.copy_(model[0].bias[perm])
        permuted[2].weight.copy_(model[2].weight[:, perm])
    with torch.no_grad():
        _close(scaled(x), model(x), 1e-15)
        _close(permuted(x), model(x), 1e-15)
    # F's factor per entry of θ' (weight and bias of layer 0: 1/c; weight of layer 2: c; its bias: 1).
    d = torch.cat([torch.full((p.numel(),), f, dtype=torch.float64)
                   for p, f in zip(model.parameters(), [1 / C_SCALE, 1 / C_SCALE, C_SCALE, 1.0])])
    index = torch.cat([torch.arange(20).reshape(5, 4)[perm].flatten(), 20 + perm,
                       25 + torch.arange(15).reshape(3, 5)[:, perm].flatten(), torch.arange(40, 43)])
    base = _quantities(model, x, "full", backend)
    moved = _quantities(scaled, x, "full", backend)
    for what in ("fisher", "score variance", "hessian variance", "covariance"):
        power = 1 if what == "fisher" else 2  # a variance scales as the square of its entry
        _close(moved[what], base[what] * (d[:, None] * d[None, :]) ** power)
    swapped = _quantities(permuted, x, "full", backend)
    for what, value in base.items():
        _close(swapped[what], value[index][:, index])


class _Shifted(nn.Module):
    """The logits of ``model`` plus ``s(x, b) = (Σx)² + b·x₀ + b²`` on every class, ``b`` a parameter (first in θ)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.b = nn.Parameter(torch.tensor(0.7, dtype=torch.float64))
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x) + (x.sum(-1, keepdim=True) ** 2 + self.b * x[:, :1] + self.b**2)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_a_shift_of_every_logit_leaves_the_categorical_fisher_and_its_variances(backend):
    model, x = _mlp(nn.Tanh()), _inputs()
    shifted = _Shifted(model)
    base, moved = _quantities(model, x, "full", backend), _quantities(shifted, x, "full", backend)
    for what in ("fisher", "score variance", "hessian variance", "covariance"):
        scale = float(base[what].abs().max())
        assert float(moved[what][0].abs().max()) <= 1e-14 * scale, what  # b's row: zero
        _close(moved[what][1:, 1:], base[what])
    for estimator in ("score", "hessian"):
        drawn = [torchfim.fisher(m, x, estimator=estimator, structure="diag", n_samples=3, backend=backend,
                                 generator=torch.Generator().manual_seed(2)) for m in (model, shifted)]
        _close(drawn[1][1:], drawn[0])


def _halved(value: torch.Tensor, what: str) -> torch.Tensor:
    return value if what == "fisher" else value / 2


@pytest.mark.parametrize("structure", ["diag", "trace", "blocks"])
def test_order_chunks_and_duplicates_of_the_inputs(structure):
    model, x = _mlp(nn.Tanh()), _inputs(11)
    flat = (lambda v: torch.cat([b.flatten() for b in v.values()])) if structure == "blocks" else (lambda v: v)
    base = {k: flat(v) for k, v in _quantities(model, x, structure, "modules").items()}
    shuffled = x[torch.randperm(11, generator=torch.Generator().manual_seed(3))]
    for inputs in (DataLoader(x, batch_size=1), DataLoader(x, batch_size=4), [x[:2], x[2:]], shuffled):
        for what, value in _quantities(model, inputs, structure, "modules").items():
            _close(flat(value), base[what])
    twice = _quantities(model, torch.cat([x, x]), structure, "modules")
    for what, value in twice.items():
        _close(flat(value), _halved(base[what], what))
