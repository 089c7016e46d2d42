"""FisherPenalty on a sub-module of the trained model, fed the features of a trunk outside it (inputs that carry a
graph): the penalty's gradient goes to the sub-module's parameters only, as the class docstring says, and the task
loss of ``penalised_loss`` still back-propagates into the trunk. Oracle: the objective written by hand in float64,
``task(trunk, head) + α‖∇_head mean NLL(head(h.detach()), ŷ)‖²`` (resp. the trace), with the labels ``ŷ`` the penalty
drew read back."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from torchfim.train import FisherPenalty

ALPHA = 0.3


def _hand_penalty(head: nn.Module, h: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    params = list(head.parameters())
    o, y = head(h), y.reshape(-1)
    rows = [slice(None)] if kind == "batch_gradient" else [slice(i, i + 1) for i in range(len(y))]
    total = 0.0
    for r in rows:
        g = torch.autograd.grad(F.cross_entropy(o[r], y[r]), params, create_graph=True)
        total = total + sum((gi ** 2).sum() for gi in g)
    return ALPHA * total / len(rows)


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("shared", [False, True])
def test_penalty_of_a_head_sends_no_gradient_into_the_trunk(kind, grad_method, every, shared):
    torch.manual_seed(1)
    trunk = nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), nn.Tanh())
    head = nn.Linear(6, 3, dtype=torch.float64)
    params = [*trunk.parameters(), *head.parameters()]
    pen = FisherPenalty(head, alpha=ALPHA, every=every, kind=kind, grad_method=grad_method,
                        generator=torch.Generator().manual_seed(0))
    labels, draw = [], pen._outputs_and_labels
    pen._outputs_and_labels = lambda o: labels.append(draw(o)) or labels[-1]
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    h = trunk(x)
    if shared:
        loss = pen.penalised_loss(h, lambda o: F.cross_entropy(o, y), step=0)
    else:
        loss = F.cross_entropy(head(h), y) + pen(h, step=0)
    loss.backward()
    got = torch.cat([p.grad.reshape(-1) for p in params])
    objective = F.cross_entropy(head(trunk(x)), y) + _hand_penalty(head, trunk(x).detach(), labels[0], kind)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, params)])
    tol = 1e-12 if grad_method == "exact" else 1e-6  # float64 finite difference: about 1e-8 measured
    assert float((got - want).norm() / want.norm()) < tol


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("route", ["graph", "module_hook"])
def test_penalised_loss_on_a_forward_of_its_own_updates_the_buffers_once(grad_method, route):
    """Where ``penalised_loss`` takes the penalty on a forward of its own (inputs that carry a graph, or a module
    backward hook), BatchNorm's running statistics are still updated once per call, as documented, and the gradient
    is the hand-written one (batch statistics in training mode)."""
    import copy

    torch.manual_seed(2)
    trunk = nn.Linear(4, 6, dtype=torch.float64)
    head = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    twin = copy.deepcopy(head)  # the oracle's, and one plain forward's buffers
    if route == "module_hook":
        head[0].register_full_backward_hook(lambda *_: None)
    pen = FisherPenalty(head, alpha=ALPHA, grad_method=grad_method, generator=torch.Generator().manual_seed(0))
    labels, draw = [], pen._outputs_and_labels
    pen._outputs_and_labels = lambda o: labels.append(draw(o)) or labels[-1]
    x, y = torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 3, (10,))
    h = trunk(x) if route == "graph" else trunk(x).detach()
    pen.penalised_loss(h, lambda o: F.cross_entropy(o, y), step=0).backward()
    objective = F.cross_entropy(twin(h.detach()), y)  # one forward: the buffers' update
    with torch.no_grad():
        stats = [b.clone() for b in twin.buffers()]
    objective = objective + _hand_penalty(twin, h.detach(), labels[0], "batch_gradient")
    assert int(head[1].num_batches_tracked) == 1
    for got, want in zip(head.buffers(), stats):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(objective, list(twin.parameters()))])
    got = torch.cat([p.grad.reshape(-1) for p in head.parameters()])
    assert float((got - want).norm() / want.norm()) < (1e-12 if grad_method == "exact" else 1e-6)
