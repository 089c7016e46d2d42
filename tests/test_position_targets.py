"""Class labels for outputs with several position dims ``(B, H, W, C)``: read in the outputs' position order, as
``(B, H, W)``, flattened ``(B, H·W)`` or with a trailing 1; another shape with as many entries, ``(B, W, H)``, would
pair labels with other positions, and is refused (the empirical estimator) or not read (the -100s of the others).
Oracles in float64 from the per-position Jacobians of :func:`oracles.flat_function`."""

from __future__ import annotations

import warnings

import pytest
import torch
from oracles import flat_function
from torch import Tensor, nn
from torch.func import jacrev

import torchfim
from torchfim import TorchfimError

B, H, W, C = 2, 2, 3, 3


def _problem() -> tuple[nn.Module, Tensor, Tensor]:
    """A Linear on the last dim (one output vector per position), inputs ``(B, H, W, 2)``, labels ``(B, H, W)`` with
    a -100 at an asymmetric position."""
    torch.manual_seed(0)
    model, x = nn.Linear(2, C).double(), torch.randn(B, H, W, 2, dtype=torch.float64)
    y = torch.randint(0, C, (B, H, W))
    y[0, 0, 2] = -100
    return model, x, y


def _oracles(model: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """The traces of the per-position empirical Fisher and of the exact Fisher over the positions whose label is not
    -100: ``(1/B) Σᵢ Σₜ ‖gᵢₜ‖²`` and ``(1/B) Σᵢ Σₜ tr(Jᵢₜᵀ Λᵢₜ Jᵢₜ)``."""
    f, theta = flat_function(model)
    jac = jacrev(lambda th: f(th, x).reshape(B, H, W, C))(theta)  # (B, H, W, C, P)
    probs = f(theta, x).reshape(B, H, W, C).softmax(-1)
    kept = y != -100
    score = jac.gather(3, y.clamp(0).reshape(B, H, W, 1, 1).expand(-1, -1, -1, -1, jac.shape[-1])).squeeze(3)
    score = score - torch.einsum("bhwc,bhwcp->bhwp", probs, jac)
    lam = torch.diag_embed(probs) - probs.unsqueeze(-1) * probs.unsqueeze(-2)
    exact = torch.einsum("bhwcp,bhwcd,bhwdp->bhw", jac, lam, jac)
    return float((score**2).sum(-1)[kept].sum() / B), float(exact[kept].sum() / B)


@pytest.mark.parametrize("shape", [(B, H, W), (B, H * W), (B, H, W, 1)], ids=["positions", "flattened", "trailing-1"])
def test_labels_in_the_outputs_position_order_equal_the_oracle(shape: tuple) -> None:
    model, x, y = _problem()
    empirical, exact = _oracles(model, x, y)
    got = torchfim.fisher(model, x, estimator="empirical", targets=y.reshape(shape), structure="trace",
                          empirical_per="position", class_dim=-1)
    assert float(got) == pytest.approx(empirical, rel=1e-12)
    assert float(torchfim.fisher(model, [(x, y.reshape(shape))], structure="trace", class_dim=-1)) == pytest.approx(exact, rel=1e-12)


def test_labels_with_the_position_dims_swapped_are_refused_or_not_read() -> None:
    """They were accepted (only the number of entries was compared): the empirical trace 0.59× the oracle, and the
    exact Fisher left out the position that the swapped -100 fell on (a review)."""
    model, x, y = _problem()
    swapped = y.transpose(1, 2).contiguous()  # (B, W, H)
    with pytest.raises(TorchfimError, match=r"e\.g\. \(2, 2, 3\) or, flattened, \(2, 6\), got \(2, 3, 2\)"):
        torchfim.fisher(model, x, estimator="empirical", targets=swapped, structure="trace", empirical_per="position", class_dim=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = torchfim.fisher(model, [(x, swapped)], structure="trace", class_dim=-1)
    assert any("do not fit outputs" in str(w.message) for w in caught)
    _, every_position = _oracles(model, x, torch.zeros_like(y))  # no -100 read: every position counts
    assert float(got) == pytest.approx(every_position, rel=1e-12)
