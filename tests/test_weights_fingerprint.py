"""``_processes.weights_fingerprint``, the number by which ``across_processes=True`` refuses processes holding other
weights: ``Σ_k (k + 1)(‖θ_k‖ + ½ Σθ_k / √n_k)`` over every parameter tensor (frozen ones included), in float64,
in pieces of at most 2²² numbers; NaN where it cannot be taken. Oracle: the formula by hand in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchfim._processes import same_weights, weights_fingerprint


def _by_hand(model: nn.Module) -> float:
    total = 0.0
    for k, p in enumerate(model.parameters()):
        t = p.detach().double().reshape(-1)
        total += (k + 1) * (float(t.norm()) + 0.5 * float(t.sum()) / math.sqrt(t.numel()))
    return total


def test_the_fingerprint_is_the_formula_over_every_parameter_frozen_ones_included() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.bfloat16)
    model[0].requires_grad_(False)
    assert math.isclose(weights_fingerprint(model), _by_hand(model), rel_tol=1e-12)
    before = weights_fingerprint(model)
    with torch.no_grad():
        model[0].weight[0, 0] += 0.25  # a frozen weight moved
    assert not same_weights([before, weights_fingerprint(model)])


def test_a_tensor_larger_than_a_piece_is_summed_in_pieces_to_the_same_number() -> None:
    big = nn.Embedding((1 << 20) + 3, 4)  # 2²² + 12 numbers: two pieces
    assert math.isclose(weights_fingerprint(big), _by_hand(big), rel_tol=1e-12)


def test_what_cannot_be_fingerprinted_is_nan_and_agrees_with_anything() -> None:
    assert math.isnan(weights_fingerprint(nn.LazyLinear(3)))
    assert math.isnan(weights_fingerprint(nn.Linear(3, 2, device="meta")))
    assert math.isnan(weights_fingerprint(torch.tanh))  # type: ignore[arg-type]
    assert weights_fingerprint(nn.ReLU()) == 0.0
    assert same_weights([1.0, math.nan, 1.0 + 1e-13]) and not same_weights([1.0, 1.0 + 1e-6])
