"""``_processes.weights_fingerprint``, the number by which ``across_processes=True`` refuses processes holding other
weights: ``Σ_k (k + 1)(‖θ_k‖ + (½ Σᵢ θ_ki + ¼ Σᵢ wᵢ θ_ki) / √n_k)``, ``wᵢ = ((i mod m) + 1)/m`` with
``m = min(n_k, 65521)``, over every parameter
tensor (frozen ones included), in float64, in pieces of at most 2²² numbers; NaN where it cannot be taken. Oracle:
the formula by hand in float64.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from torchfim._processes import same_weights, weights_fingerprint


def _by_hand(model: nn.Module, placed: bool = True) -> float:
    """The formula; without ``placed``, the one before the term by place (which no reordering moves)."""
    total = 0.0
    for k, p in enumerate(model.parameters()):
        t = p.detach().double().reshape(-1)
        period = min(t.numel(), 65521)
        weights = (torch.arange(t.numel(), dtype=torch.float64) % period + 1) / period
        term = 0.5 * float(t.sum()) + (0.25 * float((weights * t).sum()) if placed else 0.0)
        total += (k + 1) * (float(t.norm()) + term / math.sqrt(t.numel()))
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


def test_entries_in_another_order_are_told_apart() -> None:
    """A transposed square weight, shuffled entries and rows in another order: the same norm and sum, so the
    fingerprint without its term by place (the one before) could not tell them apart."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(14, 14), nn.Tanh(), nn.Linear(14, 3))  # rows of 14: a period of 7 missed them
    before = weights_fingerprint(model)
    for reorder in (lambda w: w.T.clone(), lambda w: w.reshape(-1)[torch.randperm(w.numel())].reshape(w.shape),
                    lambda w: w[torch.randperm(w.shape[0])]):
        other = nn.Sequential(nn.Linear(14, 14), nn.Tanh(), nn.Linear(14, 3))
        other.load_state_dict(model.state_dict())
        with torch.no_grad():
            other[0].weight.copy_(reorder(model[0].weight))
        assert math.isclose(_by_hand(other, placed=False), _by_hand(model, placed=False), rel_tol=1e-12)
        assert math.isclose(weights_fingerprint(other), _by_hand(other), rel_tol=1e-12)
        assert not same_weights([before, weights_fingerprint(other)])
