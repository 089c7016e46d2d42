"""FisherPenalty(grad_method="finite_difference") against double backprop, and the no_grad fix.

The oracle is the brute-force penalty of ``test_train_penalty`` (hand-written log-likelihoods,
double backprop in float64) on the labels the penalty draws (same sampling-order contract: one
``family.sample(o.detach(), 1, generator)`` call per computed step).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from oracles import FAMILY_WIDTH
from test_train_penalty import (
    SEED,
    assert_close_list,
    brute_penalty,
    labels,
    penalty_grad,
    trainable,
)
from torch import nn

import torchfim
from torchfim.families import get_family
from torchfim.train import FisherPenalty

MODELS = {"tanh_mlp": (tanh_mlp, mlp_inputs), "strided_cnn": (strided_cnn, cnn_inputs)}
#: The acceptance bounds on the relative error ‖fd − exact‖/‖exact‖.
TOLERANCE = {torch.float64: 0.01, torch.float32: 0.05}


def rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((s.double() - t.double()).pow(2).sum()) for s, t in zip(a, b))
    return math.sqrt(num / sum(float(t.double().pow(2).sum()) for t in b))


def fd_penalty(model: nn.Module, family: str, kind: str, **kw) -> FisherPenalty:
    return FisherPenalty(model, family=family, alpha=0.37, kind=kind, grad_method="finite_difference",
                         generator=torch.Generator().manual_seed(SEED), **kw)


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("family", tuple(FAMILY_WIDTH))
@pytest.mark.parametrize("which", tuple(MODELS))
def test_fd_gradient_is_within_tolerance_of_the_exact_one(which: str, family: str, kind: str, dtype: torch.dtype) -> None:
    """Value exactly α‖g‖² (resp. the trace value); gradient within 1 % (float64) / 5 % (float32).

    The oracle is float64 double backprop on the same labels. The measured errors are about 1e-7
    (float64) and 2e-3 (float32); a wrong factor (2, ‖g‖, 1/B) or a direction other than ĝ would
    be off by far more than the tolerance.
    """
    make_model, make_inputs = MODELS[which]
    model64, x64 = make_model(FAMILY_WIDTH[family], seed=31), make_inputs(9, seed=32)
    model = copy.deepcopy(model64).to(dtype)
    term = fd_penalty(model, family, kind)(x64.to(dtype), step=0)
    assert term.dtype == dtype
    y = labels(model, x64.to(dtype), family, torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model64, x64, y, family, 0.37, kind)
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(term.detach().double(), value, rtol=rtol, atol=0)
    assert rel_error(penalty_grad(term, model), grads) < TOLERANCE[dtype]
    if dtype == torch.float64:  # the informative figure: far inside the bound
        assert rel_error(penalty_grad(term, model), grads) < 1e-5


def shifted_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, family: str, direction: list[torch.Tensor], h: float) -> list[torch.Tensor]:
    """∇θ (1/B) Σ −log p(yᵢ|xᵢ) at θ + h·direction, on a copy of the model moved in place."""
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p, d in zip(trainable(moved), direction):
            p += h * d
    return [g.detach() for g in torch.autograd.grad(get_family(family).nll(moved(x), y[:, None]), trainable(moved))]


def test_fd_gradient_is_the_forward_difference_formula_with_the_given_step() -> None:
    """With fd_step = h the gradient is 2α (∇L(θ + h ĝ) − ∇L(θ))‖g‖/h, whatever h is."""
    model, x = tanh_mlp(3, seed=33), mlp_inputs(8, seed=34)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    nll = get_family("categorical").nll(model(x), y[:, None])
    g = [t.detach() for t in torch.autograd.grad(nll, trainable(model))]
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
    for h in (1e-3, 0.3):  # a large step: far from H g, but still exactly the formula
        term = fd_penalty(model, "categorical", "batch_gradient", fd_step=h)(x, step=0)
        plus = shifted_gradient(model, x, y, "categorical", [t / norm for t in g], h)
        expected = [2 * 0.37 * (a - b) * norm / h for a, b in zip(plus, g)]
        assert_close_list(penalty_grad(term, model), expected, rtol=1e-8)
    exact = brute_penalty(model, x, y, "categorical", 0.37, "batch_gradient")[1]
    assert rel_error(expected, exact) > 0.01  # so the step was really used (h = 0.3 is visibly off)


def test_fd_leaves_parameters_untouched_and_an_outer_graph_usable() -> None:
    """No in-place change of θ: a task loss built before the penalty still back-propagates."""
    model, x = tanh_mlp(3, seed=35), mlp_inputs(8, seed=36)
    before = [p.detach().clone() for p in model.parameters()]
    task = model(x).logsumexp(1).mean()  # its graph saved the weights
    pen = fd_penalty(model, "categorical", "batch_gradient")
    (task + pen(x, step=0)).backward()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def bn_dropout_mlp() -> nn.Module:
    torch.manual_seed(37)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()


def test_fd_in_train_mode_replays_dropout_and_updates_batchnorm_once() -> None:
    """BatchNorm + Dropout in training mode: same gradient as double backprop with the same mask.

    Seeding torch's RNG identically before each call gives the exact penalty and the finite
    difference the same Dropout mask in their first pass; the finite difference's second pass
    must replay it (a fresh mask would be off by O(1)). Running statistics move once, as after
    one forward of the batch, and torch's RNG ends where the exact penalty leaves it.
    """
    model, x = bn_dropout_mlp(), mlp_inputs(16, seed=38)
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    reference(x)  # one training-mode forward: the expected running statistics
    ref_buffers = [b.clone() for b in reference.buffers()]

    exact_model = copy.deepcopy(model)
    torch.manual_seed(5)
    exact = FisherPenalty(exact_model, alpha=0.37, generator=torch.Generator().manual_seed(SEED))(x, step=0)
    exact_grads, exact_rng = penalty_grad(exact, exact_model), torch.get_rng_state()
    torch.manual_seed(5)
    term = fd_penalty(model, "categorical", "batch_gradient")(x, step=0)
    assert torch.equal(torch.get_rng_state(), exact_rng)
    torch.testing.assert_close(term.detach(), exact.detach(), rtol=1e-12, atol=0)
    assert rel_error(penalty_grad(term, model), exact_grads) < 1e-5
    for got, want in zip(model.buffers(), ref_buffers):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_fd_with_every_caches_its_gradient(kind: str) -> None:
    model, x = tanh_mlp(3, seed=39), mlp_inputs(8, seed=40)
    pen = fd_penalty(model, "categorical", kind, every=3)
    first = pen(x, step=0)
    got0 = penalty_grad(first, model)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    grads = brute_penalty(model, x, y, "categorical", 0.37, kind)[1]
    assert rel_error(got0, grads) < 1e-5
    with torch.no_grad():
        for p in model.parameters():
            p += 0.05  # a recomputation would differ
    for step in (1, 2):
        term = pen(x, step=step)
        assert torch.equal(term.detach(), pen.last_value) and pen.last_step == 0
        assert_close_list(penalty_grad(term, model), got0, rtol=0)


# ------------------------------------------------------------------ no_grad
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_under_no_grad_the_value_is_right(kind: str, grad_method: str) -> None:
    """Regression (issue 11 item 9): under torch.no_grad() the penalty was 0 and last_value 0."""
    model, x = tanh_mlp(3, seed=41), mlp_inputs(8, seed=42)
    pen = FisherPenalty(model, alpha=0.37, kind=kind, every=3, grad_method=grad_method,
                        generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        term = pen(x, step=0)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model, x, y, "categorical", 0.37, kind)
    assert float(value) > 0
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    assert pen.last_value is None  # an evaluation leaves the training state as it was
    # a call with gradients off evaluates: it keeps no gradient for the next steps, and draws as if it had not run
    assert all(g is None for g in torch.autograd.grad(pen(x, step=1), list(model.parameters()), allow_unused=True))
    term = pen(x, step=3)
    term.backward()
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    assert rel_error(penalty_grad(pen(x, step=4), model), grads) < (1e-10 if grad_method == "exact" else 1e-5)


@pytest.mark.parametrize("shared", [False, True])
def test_a_validation_call_under_no_grad_leaves_the_training_penalty_alone(shared: bool) -> None:
    """A loop that computes its validation loss with the penalty at the current step number, under
    ``torch.no_grad()``, after the training step: the steps after reuse the training batch's gradient and the labels
    the generator gives them are as without the validation call (before, the validation batch's gradient replaced
    the kept one and its draw shifted the generator)."""
    torch.manual_seed(0)
    model, x, x_val = tanh_mlp(3, seed=41), mlp_inputs(8, seed=42), mlp_inputs(8, seed=43)

    def run(validate: bool) -> tuple[list[list[torch.Tensor]], list[torch.Tensor], dict]:
        pen = FisherPenalty(copy.deepcopy(model), alpha=0.37, every=3, generator=torch.Generator().manual_seed(SEED))
        call = ((lambda inputs, step: pen.penalised_loss(inputs, lambda o: o.sum() * 0, step=step)) if shared
                else (lambda inputs, step: pen(inputs, step=step)))
        grads, values = [], []
        for step in range(5):
            term = call(x, step)
            grads.append(penalty_grad(term, pen.model))
            if validate:
                with torch.no_grad():
                    call(x_val, step)
            values.append(pen.last_value)
        return grads, values, pen.state_dict()

    (plain, plain_values, plain_state), (validated, values, state) = run(False), run(True)
    for a, b in zip(plain, validated):
        assert rel_error(b, a) == 0
    assert all(torch.equal(a, b) for a, b in zip(plain_values, values))  # a resumed run reuses the training value
    assert torch.equal(state["last_value"], plain_state["last_value"]) and state["last_step"] == plain_state["last_step"]
    assert all(torch.equal(state["cache"][n], plain_state["cache"][n]) for n in plain_state["cache"])


# --------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"grad_method": "central"}, "grad_method"),
        ({"fd_step": 1e-3}, "fd_step"),  # with the exact method
        ({"grad_method": "finite_difference", "fd_step": 0.0}, "fd_step"),
        ({"grad_method": "finite_difference", "fd_step": -1e-3}, "fd_step"),
        ({"grad_method": "finite_difference", "fd_step": float("nan")}, "fd_step"),
        ({"grad_method": "finite_difference", "fd_step": True}, "fd_step"),
        ({"grad_method": "finite_difference", "fd_step": torch.tensor([1e-3])}, "fd_step"),
        ({"alpha": torch.tensor(True)}, "alpha must be a finite number"),
    ],
)
def test_bad_fd_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(torchfim.TorchfimError, match=match):
        FisherPenalty(tanh_mlp(3), **kwargs)


def test_alpha_and_fd_step_take_numpy_scalars_and_0_dim_tensors() -> None:
    """``alpha=np.float32(0.25)`` or ``fd_step=torch.tensor(0.5)`` were refused as not numbers; now the float they
    hold."""
    import numpy as np

    pen = FisherPenalty(tanh_mlp(3), alpha=np.float32(0.25), grad_method="finite_difference", fd_step=torch.tensor(0.5))
    assert (pen.alpha, pen.fd_step) == (0.25, 0.5) and type(pen.alpha) is float and type(pen.fd_step) is float


def test_fd_trace_refuses_dropout_in_train_mode() -> None:
    with pytest.raises(torchfim.TorchfimError, match="eval"):
        fd_penalty(bn_dropout_mlp(), "categorical", "trace")(mlp_inputs(8), step=0)
