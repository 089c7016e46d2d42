"""``fisher(estimator="empirical", empirical_per="position")``: the empirical Fisher of each position's true label,
``(1/n) Σᵢ Σ_{t∈Uᵢ} g_{it} g_{it}ᵀ`` with ``g_{it} = ∇_θ log p(y_{it} | xᵢ)_t``, against float64 brute force (a
Jacobian of every observed position's log-likelihood), against the per-input empirical Fisher it differs from, and
against curvlinops' ``EFLinearOperator``, which flattens the positions into its batch."""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from cases import token_model
from oracles import blocks, flat_function
from torch import Tensor, nn
from torch.func import jacrev

import torchfim
from torchfim import TorchfimError

N, T, C = 5, 6, 3


def batch() -> tuple[Tensor, Tensor, Tensor]:
    """Tokens ``(N, T)``, right padding (lengths 6, 4, 5, 2, 6) and targets with a ``-100`` at an observed
    position (the loss scores nothing there) and junk in the padding."""
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 5, (N, T), generator=g)
    mask = torch.arange(T) < torch.tensor([6, 4, 5, 2, 6]).unsqueeze(1)
    y = torch.randint(0, C, (N, T), generator=g).masked_fill(~mask, 7)
    y[0, 2] = -100
    return x, mask, y


def per_position_oracle(model: nn.Module, x: Tensor, mask: Tensor, y: Tensor) -> Tensor:
    """``(1/n) Σᵢ Σₜ gᵢₜgᵢₜᵀ`` over the positions the mask keeps and whose label is not -100, dense ``(P, P)``."""
    f, theta = flat_function(model)
    observed = mask & (y != -100)

    def log_likelihoods(th: Tensor) -> Tensor:
        logits = f(th, x).reshape(N, T, C).log_softmax(-1)
        return logits.gather(-1, y.clamp(0, C - 1).unsqueeze(-1)).squeeze(-1)  # (N, T)

    g = jacrev(log_likelihoods)(theta)[observed]  # (observed positions, P)
    return g.T @ g / N


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("structure", ["full", "diag", "trace", "blocks"])
def test_per_position_empirical_fisher_is_brute_force(structure: str, backend: str) -> None:
    model = token_model(C)
    x, mask, y = batch()
    want = per_position_oracle(model, x, mask, y)
    got = torchfim.fisher(model, x, estimator="empirical", structure=structure, targets=y, mask=mask,
                          empirical_per="position", backend=backend)
    if structure == "full":
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    elif structure == "diag":
        torch.testing.assert_close(got, want.diagonal(), rtol=1e-10, atol=1e-12)
    elif structure == "trace":
        torch.testing.assert_close(got, want.trace(), rtol=1e-10, atol=0.0)
    else:
        for name, block in blocks(want, model).items():
            torch.testing.assert_close(got[name], block, rtol=1e-10, atol=1e-12)


def test_per_position_differs_from_per_input_by_the_cross_terms() -> None:
    """The per-input empirical Fisher less the per-position one is ``(1/n) Σᵢ Σ_{t≠s} gᵢₜgᵢₛᵀ``, not 0: a
    test that would pass if the option were ignored fails here."""
    model = token_model(C)
    x, mask, y = batch()
    per_input = torchfim.fisher(model, x, estimator="empirical", structure="full", targets=y, mask=mask)
    per_position = torchfim.fisher(model, x, estimator="empirical", structure="full", targets=y, mask=mask,
                                   empirical_per="position")
    f, theta = flat_function(model)
    observed = (mask & (y != -100)).to(torch.float64)

    def log_likelihoods(th: Tensor) -> Tensor:
        logits = f(th, x).reshape(N, T, C).log_softmax(-1)
        return logits.gather(-1, y.clamp(0, C - 1).unsqueeze(-1)).squeeze(-1) * observed

    g = jacrev(log_likelihoods)(theta)  # (N, T, P), zero where unobserved
    summed = g.sum(1)
    cross = (summed.T @ summed - torch.einsum("ntp,ntq->pq", g, g)) / N
    assert cross.norm() > 0.1 * per_position.norm()
    torch.testing.assert_close(per_input - per_position, cross, rtol=1e-9, atol=1e-12)


def test_padded_positions_and_long_vocabularies_come_in_blocks() -> None:
    """The columns go in blocks of a few positions (the budget below holds two); a block of positions that no
    input observes is skipped, and the result is the same as in one block."""
    from torchfim.families import Categorical, Positions

    o = torch.randn(3, 4 * C, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    u = torch.randn(3, 4 * C, dtype=torch.float64)
    fam = Positions(Categorical(), 4, mask)
    pieces = list(fam.placed_columns(o, u, max_entries=2 * 3 * 4 * C))
    assert [p.shape[-1] for p in pieces] == [2]  # positions 2 and 3 are nobody's: left out
    columns = pieces[0].reshape(3, 4, C, 2)
    kept = mask.unsqueeze(-1).to(u.dtype) * u.reshape(3, 4, C)
    torch.testing.assert_close(columns[:, 0, :, 0], kept[:, 0])
    torch.testing.assert_close(columns[:, 1, :, 1], kept[:, 1])
    assert columns[:, 0, :, 1].abs().sum() == 0 and columns[:, 1, :, 0].abs().sum() == 0


def test_outputs_without_positions_are_the_same_either_way() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, C)).double()
    x = torch.randn(7, 3, dtype=torch.float64)
    y = torch.randint(0, C, (7,))
    per_input = torchfim.fisher(model, x, estimator="empirical", structure="full", targets=y)
    per_position = torchfim.fisher(model, x, estimator="empirical", structure="full", targets=y,
                                   empirical_per="position")
    torch.testing.assert_close(per_position, per_input, rtol=1e-12, atol=0.0)


def test_other_estimators_and_unknown_values_are_refused() -> None:
    model = token_model(C)
    x, _, _ = batch()
    with pytest.raises(TorchfimError, match="empirical_per='position' chooses the observation"):
        torchfim.fisher(model, x, estimator="score", empirical_per="position")
    with pytest.raises(TorchfimError, match="unknown empirical_per 'token'"):
        torchfim.fisher(model, x, estimator="empirical", empirical_per="token")


class ClassesFirst(nn.Module):
    """The token model's logits as ``CrossEntropyLoss`` takes them: ``(N, C, T)``."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = token_model(C)

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).transpose(1, 2)


def test_curvlinops_empirical_fisher_of_tokens() -> None:
    """curvlinops' ``EFLinearOperator`` with a summed ``CrossEntropyLoss`` is ``Σᵢₜ gᵢₜgᵢₜᵀ`` over the tokens it
    flattens into its batch (a -100 label scores nothing): ``N`` times the per-position empirical Fisher."""
    curvlinops = clients.need("curvlinops")
    model = ClassesFirst()
    x, _, y = batch()
    y = torch.where(y == 7, torch.full_like(y, -100), y)  # curvlinops has no mask: the padding's labels say it
    params = [p for p in model.parameters() if p.requires_grad]
    operator = curvlinops.EFLinearOperator(model, nn.CrossEntropyLoss(reduction="sum"), params,
                                           [(x[:2], y[:2]), (x[2:], y[2:])])
    theirs = operator @ torch.eye(sum(p.numel() for p in params), dtype=torch.float64)
    ours = torchfim.fisher(model, x, estimator="empirical", structure="full", targets=y, class_dim=1,
                           empirical_per="position")
    assert clients.rel_err(theirs, N * ours) < 1e-12
