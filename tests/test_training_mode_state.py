"""Models whose forward in training mode updates their own state.

Spectral norm divides a weight by ``σ = uᵀ W v`` after moving its buffers ``u, v`` by a step of the power
method, in place, on every forward in training mode (:mod:`torchfim.engine.derivative_settings`). The
Fisher's forwards and the finite-difference penalty's second pass must all see one ``σ``: the oracle is
a copy of the model after one training-mode forward (``u, v`` moved once), then put in eval mode, so that
its forwards hold ``σ``. A state update the engine cannot pause is named in the error.
"""

from __future__ import annotations

import copy

import pytest
import torch
from engine_checks import assert_equals_dense
from oracles import exact_fisher
from test_penalised_loss import grads_of, rel_error, squared_task
from test_train_penalty import SEED, brute_penalty, labels, penalty_grad
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

import torchfim
from torchfim.errors import TorchfimError
from torchfim.train import FisherPenalty

SPELLINGS = {"parametrization": spectral_norm, "hook": torch.nn.utils.spectral_norm}


def spectral_mlp(spelling: str) -> nn.Module:
    """Two spectral-normed layers in training mode, with ``u, v`` far from converged (one step moves them)."""
    torch.manual_seed(3)
    wrap = SPELLINGS[spelling]
    return nn.Sequential(wrap(nn.Linear(4, 8)), nn.Tanh(), wrap(nn.Linear(8, 3))).double().train()


def after_one_forward(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """A copy of ``model`` after one training-mode forward of ``x``, in eval mode: ``σ`` held."""
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference(x)
    return reference.eval()


def buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b.detach().clone() for b in model.buffers()]


def inputs(n: int = 12) -> torch.Tensor:
    return torch.randn(n, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("structure", ["diag", "full"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_the_fisher_of_a_spectral_normed_model_in_training_mode_holds_sigma(spelling: str, structure: str,
                                                                            backend: str) -> None:
    """The Fisher at σ from the stored u, v (as in eval mode), and the user's u, v left as they were.

    Before: the power iteration moved between the engine's forwards, which the independence check
    took for samples mixing, and refused the model.
    """
    model, x = spectral_mlp(spelling), inputs()
    before = buffers(model)
    full = exact_fisher(copy.deepcopy(model).eval(), x, "categorical")
    assert_equals_dense(torchfim.fisher(model, x, structure=structure, backend=backend), full, model, structure)
    assert all(torch.equal(a, b) for a, b in zip(buffers(model), before))
    assert model.training


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_the_penalty_on_a_spectral_normed_model_in_training_mode_sees_one_sigma(spelling: str, kind: str,
                                                                               grad_method: str) -> None:
    """Value and gradient of the penalty at σ as its first forward leaves it; u, v moved once.

    Before, the finite difference's second pass moved u, v by another step, so ∇L(θ + εĝ) − ∇L(θ)
    held a change of σ far larger than ε: relative errors of 1e3 to 1e6.
    """
    model, x = spectral_mlp(spelling), inputs()
    reference = after_one_forward(model, x)
    y = labels(reference, x, "categorical", torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(reference, x, y, "categorical", 0.37, kind)
    term = FisherPenalty(model, alpha=0.37, kind=kind, grad_method=grad_method,
                         generator=torch.Generator().manual_seed(SEED))(x, step=0)
    torch.testing.assert_close(term.detach(), value.detach(), rtol=1e-10, atol=0)
    assert rel_error(penalty_grad(term, model), list(grads)) < (1e-10 if grad_method == "exact" else 1e-6)
    assert all(torch.equal(a, b) for a, b in zip(buffers(model), buffers(reference)))


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("spelling", list(SPELLINGS))
def test_the_penalised_loss_on_a_spectral_normed_model_in_training_mode_sees_one_sigma(spelling: str, kind: str,
                                                                                      every: int) -> None:
    """The finite difference's two passes against the exact penalised loss at σ as one forward leaves it."""
    model, x = spectral_mlp(spelling), inputs()
    task = squared_task(3, len(x))
    reference = after_one_forward(model, x)
    exact = FisherPenalty(reference, alpha=0.37, kind=kind, every=every, generator=torch.Generator().manual_seed(SEED))
    want = grads_of(exact.penalised_loss(x, task, step=0), reference)
    fd = FisherPenalty(model, alpha=0.37, kind=kind, every=every, grad_method="finite_difference",
                       generator=torch.Generator().manual_seed(SEED))
    assert rel_error(grads_of(fd.penalised_loss(x, task, step=0), model), want) < 1e-6
    assert all(torch.equal(a, b) for a, b in zip(buffers(model), buffers(reference)))


class _CountedCalls(nn.Module):
    """A layer whose output depends on how often it ran in training mode: state no forward may share."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.calls += 1
        return self.lin(x) * (1 + 0.1 * self.calls)


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_a_forward_that_updates_the_model_state_is_named_with_the_fix(backend: str) -> None:
    """Not "the samples mix" (they do not): the buffer that changes, and model.eval()."""
    model = nn.Sequential(_CountedCalls()).double()
    with pytest.raises(TorchfimError, match=r"updates its buffer '0.calls' in place.*model.eval\(\)"):
        torchfim.fisher(model, inputs(), structure="diag", backend=backend)
    model.eval()
    full = exact_fisher(model, inputs(), "categorical")
    assert_equals_dense(torchfim.fisher(model, inputs(), structure="diag", backend=backend), full, model, "diag")
