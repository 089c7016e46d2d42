"""``FisherPenalty`` on a model with a parameter its forward never uses, against plain autograd (float64).

Plain training leaves such a parameter's ``.grad`` None, and optimisers tell None (skipped) from zeros (Adam's
moments and weight decay move): the penalty gave every trainable parameter a gradient, zeros where unused, and so
broke ``DistributedDataParallel(find_unused_parameters=True)`` (:mod:`test_penalty_processes`). Here each step's
``.grad`` (both kinds, both grad methods, ``loss + pen(x)`` and ``penalised_loss``, every 1 and 2) is the autograd
gradient of the task loss plus the penalty's definition (:func:`oracles.penalty_definition`, the same labels;
on a step between computed ones the computed step's penalty gradient), and the unused parameter's stays None.
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch
import torch.nn.functional as F
from oracles import penalty_definition
from test_train_penalty import labels
from torch import nn

from torchfim.train import FisherPenalty

CASES = list(itertools.product(("batch_gradient", "trace"), ("exact", "finite_difference"), (False, True), (1, 2)))
ALPHA, LR, STEPS = 0.3, 0.1, 3


class WithUnused(nn.Module):
    """A tanh MLP with a Linear registered between its layers and never called."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.unused, self.last = nn.Linear(4, 8), nn.Linear(4, 5), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(torch.tanh(self.first(x)))


def _model() -> WithUnused:
    torch.manual_seed(0)
    return WithUnused().double()


def _data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(16, 4, dtype=torch.float64, generator=g), torch.randint(0, 3, (16,), generator=g))
            for _ in range(STEPS)]


def _definition(model: WithUnused, x: torch.Tensor, y: torch.Tensor, kind: str) -> list[torch.Tensor]:
    """The penalty's gradient on the labels ``y`` from its definition, w.r.t. the used parameters."""
    used = [p for name, p in model.named_parameters() if not name.startswith("unused")]
    _, *grads = penalty_definition(lambda rows: torch.log_softmax(model(x[rows]), -1).gather(-1, y[rows, None]).sum(),
                                   used, len(x), kind, ALPHA)
    return grads


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_a_parameter_the_forward_never_uses_gets_no_gradient(case: tuple) -> None:
    kind, grad_method, shared, every = case
    model, replay = _model(), torch.Generator().manual_seed(1)
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=grad_method, every=every,
                        generator=torch.Generator().manual_seed(1))
    used = [p for name, p in model.named_parameters() if not name.startswith("unused")]
    kept = None
    for step, (x, y) in enumerate(_data()):
        if step % every == 0:
            kept = _definition(model, x, labels(model, x, "categorical", replay), kind)
        task = torch.autograd.grad(F.cross_entropy(model(x), y), used)
        want = torch.cat([(a + b).flatten() for a, b in zip(task, kept)])
        model.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = (pen.penalised_loss(x, lambda out, y=y: F.cross_entropy(out, y), step=step) if shared
                    else F.cross_entropy(model(x), y) + pen(x, step=step))
        loss.backward()
        assert model.unused.weight.grad is None and model.unused.bias.grad is None, (step, model.unused.weight.grad)
        got = torch.cat([p.grad.flatten() for p in used])
        # exact: rounding (measured up to 4e-16); finite differences: the forward difference's error (up to 2.2e-8)
        tolerance = 1e-12 if grad_method == "exact" else 1e-6
        assert float((got - want).abs().max()) <= tolerance * float(want.abs().max()), step
        with torch.no_grad():
            for p in used:
                p -= LR * p.grad


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_a_term_back_propagated_alone_reaches_only_the_used_parameters(kind: str, grad_method: str) -> None:
    """``pen(x).backward()`` on its own, on a computed step, a reusing one and a step that adds nothing
    (``reuse_between=False``): the used parameters get the penalty's gradient (none on the last), the unused none."""
    model, (x, _) = _model(), _data()[0]
    used = [p for name, p in model.named_parameters() if not name.startswith("unused")]
    want = _definition(model, x, labels(model, x, "categorical", torch.Generator().manual_seed(1)), kind)
    for reuse_between in (True, False):
        pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=grad_method, every=2,
                            reuse_between=reuse_between, generator=torch.Generator().manual_seed(1))
        for step in range(2):
            model.zero_grad(set_to_none=True)
            term = pen(x, step=step)
            term.backward()
            assert model.unused.weight.grad is None and model.unused.bias.grad is None
            if step == 1 and not reuse_between:
                assert float(term.detach()) == 0.0 and all(p.grad is None for p in used)
                continue
            got, mean = torch.cat([p.grad.flatten() for p in used]), torch.cat([g.flatten() for g in want])
            assert float((got - mean).abs().max()) <= 1e-6 * float(mean.abs().max())


def test_a_kept_gradient_with_an_unused_parameter_saves_and_resumes(tmp_path) -> None:
    """The kept gradient holds None for the unused parameter: saved (``torch.load(weights_only=True)`` reads it) and
    resumed, the reusing step gives the saved run's gradients, and the unused parameter still none."""
    model, (x, _) = _model(), _data()[0]
    pen = FisherPenalty(model, alpha=ALPHA, every=2, generator=torch.Generator().manual_seed(1))
    pen(x, step=0).backward()
    torch.save(pen.state_dict(), tmp_path / "pen.pt")
    resumed_model = _model()
    resumed = FisherPenalty(resumed_model, alpha=ALPHA, every=2, generator=torch.Generator().manual_seed(1))
    resumed.load_state_dict(torch.load(tmp_path / "pen.pt", weights_only=True))
    for m, p in ((model, pen), (resumed_model, resumed)):
        m.zero_grad(set_to_none=True)
        p(x, step=1).backward()
    for (name, a), b in zip(model.named_parameters(), resumed_model.parameters()):
        assert (a.grad is None and b.grad is None) if name.startswith("unused") else torch.equal(a.grad, b.grad)
