"""FisherPenalty.penalised_loss against brute force: the task loss and the penalty from one shared forward.

Oracles (float64): the task gradient by autograd at θ, the penalty value and gradient of
``test_train_penalty.brute_penalty`` (hand-written log-likelihoods, double backprop) on the labels
the penalty draws (the same sampling contract: one ``family.sample(o.detach(), 1, generator)``
call per computed step, on the outputs of the first ``sub_batch`` inputs).
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from oracles import FAMILY_WIDTH
from test_train_penalty import SEED, brute_penalty, labels, trainable
from torch import nn

import torchfim
from torchfim.families import get_family
from torchfim.train import FisherPenalty

MODELS = {"tanh_mlp": (tanh_mlp, mlp_inputs), "strided_cnn": (strided_cnn, cnn_inputs)}
ALPHA = 0.37


def rel_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((s.double() - t.double()).pow(2).sum()) for s, t in zip(a, b))
    return math.sqrt(num / sum(float(t.double().pow(2).sum()) for t in b))


def squared_task(width: int, n: int, seed: int = 50):
    """A task loss for any family: mean squared distance of the outputs to fixed random targets."""
    target = torch.randn(n, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return lambda out: (out - target.to(out.dtype)).pow(2).mean()


def grads_of(loss: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return [g.detach() for g in torch.autograd.grad(loss, trainable(model))]


def penalty(model: nn.Module, family: str = "categorical", **kw) -> FisherPenalty:
    kw.setdefault("grad_method", "finite_difference")
    return FisherPenalty(model, family=family, alpha=ALPHA, generator=torch.Generator().manual_seed(SEED), **kw)


def exact_total(model64: nn.Module, x64: torch.Tensor, y: torch.Tensor, family: str, task, kind: str = "batch_gradient",
                alpha: float = ALPHA):
    """``task(θ) + α‖g‖²`` and its gradient ``∇task(θ) + ∇(α‖g‖²)(θ)`` (autograd, double backprop)."""
    task_value = task(model64(x64))
    value, pen_grads = brute_penalty(model64, x64, y, family, alpha, kind)
    return task_value.detach() + value, [a + b for a, b in zip(grads_of(task_value, model64), pen_grads)]


# ------------------------------------------------------------------ accuracy
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("which", tuple(MODELS))
def test_fd_total_gradient_matches_double_backprop(which: str, dtype: torch.dtype) -> None:
    """The gradient of penalised_loss is ∇task(θ) + ∇(α‖g‖²)(θ) up to the forward difference and the
    task gradient taken at θ' = θ + εĝ; both errors are O(ε), with ε = 0.1·√eps·(1 + ‖θ‖).

    Measured relative errors: about 4e-8 (float64) and 1e-3 (float32); bounds 1e-4 and 5 %.
    """
    make_model, make_inputs = MODELS[which]
    model64, x64 = make_model(3, seed=51), make_inputs(9, seed=52)
    targets = torch.randint(0, 3, (9,), generator=torch.Generator().manual_seed(53))
    def task(out):
        return torch.nn.functional.cross_entropy(out, targets)

    model = copy.deepcopy(model64).to(dtype)
    loss = penalty(model).penalised_loss(x64.to(dtype), task, step=0)
    assert loss.dtype == dtype and loss.dim() == 0
    y = labels(model, x64.to(dtype), "categorical", torch.Generator().manual_seed(SEED))
    value, grads = exact_total(model64, x64, y, "categorical", task)
    torch.testing.assert_close(loss.detach().double(), value, rtol=1e-7 if dtype == torch.float64 else 1e-4, atol=0)
    error = rel_error(grads_of(loss, model), grads)
    assert error < (1e-4 if dtype == torch.float64 else 0.05)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("family", tuple(FAMILY_WIDTH))
def test_fd_penalty_part_alone_is_within_tolerance(family: str, dtype: torch.dtype) -> None:
    """With a task loss that is 0 (and has zero gradient) what is left is the penalty's gradient:
    within 1 % (float64; measured ~1e-7) and 5 % (float32; ~1e-3) of double backprop."""
    model64, x64 = tanh_mlp(FAMILY_WIDTH[family], seed=54), mlp_inputs(9, seed=55)
    model = copy.deepcopy(model64).to(dtype)
    loss = penalty(model, family).penalised_loss(x64.to(dtype), lambda out: 0.0 * out.sum(), step=0)
    y = labels(model, x64.to(dtype), family, torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model64, x64, y, family, ALPHA, "batch_gradient")
    torch.testing.assert_close(loss.detach().double(), value, rtol=1e-10 if dtype == torch.float64 else 1e-4, atol=0)
    error = rel_error(grads_of(loss, model), grads)
    assert error < {torch.float64: 0.01, torch.float32: 0.05}[dtype]
    if dtype == torch.float64:
        assert error < 1e-5


def test_fd_gradient_is_the_formula_at_the_shifted_parameters() -> None:
    """With fd_step = h: ∇task(θ + hĝ) + 2α (∇L(θ + hĝ) − ∇L(θ))‖g‖/h, exactly, even for a large h
    (where the task gradient is visibly not the one at θ)."""
    model, x = tanh_mlp(3, seed=56), mlp_inputs(8, seed=57)
    task = squared_task(3, 8)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    def nll(m):
        return get_family("categorical").nll(m(x), y[:, None])

    g = grads_of(nll(model), model)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
    for h in (1e-3, 0.3):
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(trainable(moved), g):
                p += (h / norm) * t
        expected = [a + 2 * ALPHA * (b - c) * norm / h
                    for a, b, c in zip(grads_of(task(moved(x)), moved), grads_of(nll(moved), moved), g)]
        loss = penalty(model, fd_step=h).penalised_loss(x, task, step=0)
        got = grads_of(loss, model)
        assert rel_error(got, expected) < 1e-10
        torch.testing.assert_close(loss.detach(), task(moved(x)).detach() + ALPHA * norm**2, rtol=1e-12, atol=0)
    at_theta = [a + b for a, b in zip(grads_of(task(model(x)), model),
                                      brute_penalty(model, x, y, "categorical", ALPHA, "batch_gradient")[1])]
    assert rel_error(got, at_theta) > 0.01  # so h was really used, on the task gradient too


def test_task_gradient_error_is_eps_times_task_hessian_along_the_direction() -> None:
    """The task part of the gradient is ∇task(θ') = ∇task(θ) + ε H_task ĝ + O(ε²): in float64 the
    whole error matches ε‖H_task ĝ‖ to 10 % (with a large loss Hessian and tiny α it dominates)."""
    model, x = tanh_mlp(3, seed=58), mlp_inputs(8, seed=59)
    task = squared_task(3, 8)
    pen = FisherPenalty(model, alpha=1e-6, grad_method="finite_difference", fd_step=1e-5,
                        generator=torch.Generator().manual_seed(SEED))
    got = grads_of(pen.penalised_loss(x, task, step=0), model)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    _, exact = exact_total(model, x, y, "categorical", task, alpha=1e-6)
    g = grads_of(get_family("categorical").nll(model(x), y[:, None]), model)
    norm = math.sqrt(sum(float(t.pow(2).sum()) for t in g))
    params = trainable(model)
    task_grad = torch.autograd.grad(task(model(x)), params, create_graph=True)
    hvp = torch.autograd.grad(task_grad, params, [t / norm for t in g])
    predicted = 1e-5 * math.sqrt(sum(float(t.pow(2).sum()) for t in hvp))
    error = math.sqrt(sum(float((a - b).pow(2).sum()) for a, b in zip(got, exact)))
    assert 0.9 * predicted < error < 1.1 * predicted


# ----------------------------------------------------------- other methods
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_every_kind_and_method_gives_task_plus_penalty(kind: str, grad_method: str) -> None:
    """Exact: ∇task + double-backprop penalty to 1e-10; finite difference: to 1e-5 (float64)."""
    model, x = tanh_mlp(3, seed=60), mlp_inputs(7, seed=61)
    task = squared_task(3, 7)
    loss = penalty(model, kind=kind, grad_method=grad_method).penalised_loss(x, task, step=0)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    value, grads = exact_total(model, x, y, "categorical", task, kind)
    torch.testing.assert_close(loss.detach(), value, rtol=1e-8, atol=0)
    assert rel_error(grads_of(loss, model), grads) < (1e-10 if grad_method == "exact" else 1e-5)


def test_sub_batch_penalises_the_first_rows_and_the_task_sees_all() -> None:
    model, x = tanh_mlp(3, seed=62), mlp_inputs(10, seed=63)
    task = squared_task(3, 10)
    loss = penalty(model, sub_batch=4).penalised_loss(x, task, step=0)
    y = labels(model, x[:4], "categorical", torch.Generator().manual_seed(SEED))
    value, pen_grads = brute_penalty(model, x[:4], y, "categorical", ALPHA, "batch_gradient")
    task_value = task(model(x))
    expected = [a + b for a, b in zip(grads_of(task_value, model), pen_grads)]
    torch.testing.assert_close(loss.detach(), task_value.detach() + value, rtol=1e-8, atol=0)
    assert rel_error(grads_of(loss, model), expected) < 1e-5


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_every_reuses_the_cached_penalty_gradient(grad_method: str) -> None:
    """every=3: step 0 computes; steps 1, 2 give ∇task(θ) + the step-0 penalty gradient exactly."""
    model, x = tanh_mlp(3, seed=64), mlp_inputs(8, seed=65)
    task = squared_task(3, 8)
    pen = penalty(model, every=3, grad_method=grad_method)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    value, pen_grads = brute_penalty(model, x, y, "categorical", ALPHA, "batch_gradient")
    first = pen.penalised_loss(x, task, step=0)
    expected = [a + b for a, b in zip(grads_of(task(model(x)), model), pen_grads)]
    assert rel_error(grads_of(first, model), expected) < (1e-10 if grad_method == "exact" else 1e-5)
    cached = pen._kept.grads
    assert rel_error(cached, pen_grads) < (1e-10 if grad_method == "exact" else 1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.05  # the task gradient moves with θ; the reused penalty gradient does not
    for step in (1, 2):
        loss = pen.penalised_loss(x, task, step=step)
        torch.testing.assert_close(loss.detach(), task(model(x)).detach() + value, rtol=1e-10, atol=0)
        want = [a + c for a, c in zip(grads_of(task(model(x)), model), cached)]
        assert rel_error(grads_of(loss, model), want) < 1e-12
        model.zero_grad(set_to_none=True)  # the usual loss.backward() into .grad: the same gradient
        pen.penalised_loss(x, task, step=step).backward()
        assert rel_error([p.grad for p in trainable(model)], want) < 1e-12
    assert pen.last_step == 0


def test_without_reuse_or_before_the_first_computed_step_only_the_task_is_left() -> None:
    model, x = tanh_mlp(3, seed=66), mlp_inputs(8, seed=67)
    task = squared_task(3, 8)
    no_reuse = penalty(model, every=3, reuse_between=False)
    no_reuse.penalised_loss(x, task, step=0)  # computed, but not reused
    for pen, step in ((penalty(model, every=3), 1), (no_reuse, 4)):
        loss = pen.penalised_loss(x, task, step=step)
        torch.testing.assert_close(loss.detach(), task(model(x)).detach(), rtol=0, atol=0)
        assert rel_error(grads_of(loss, model), grads_of(task(model(x)), model)) == 0.0


def test_a_scaled_loss_scales_every_part_of_the_gradient() -> None:
    """(s·loss).backward() gives s times the gradient, the constant −c·g part included (as with a
    gradient scaler); a surrogate that ignored its incoming gradient would be off by (s − 1)·c·g."""
    model, x = tanh_mlp(3, seed=68), mlp_inputs(8, seed=69)
    task = squared_task(3, 8)
    once = grads_of(penalty(model).penalised_loss(x, task, step=0), model)
    scaled = grads_of(1024.0 * penalty(model).penalised_loss(x, task, step=0), model)
    assert rel_error([s / 1024.0 for s in scaled], once) < 1e-12


def bn_dropout_mlp() -> nn.Module:
    torch.manual_seed(70)
    return nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)).double()


def test_fd_in_train_mode_replays_dropout_and_updates_batchnorm_once() -> None:
    """BatchNorm + Dropout in training mode: the same gradient as the exact penalised loss with the
    same Dropout mask (seeded identically); running statistics moved once (by the batch at θ',
    so within O(ε) of one forward at θ); torch's RNG left where the exact method leaves it."""
    model, x = bn_dropout_mlp(), mlp_inputs(16, seed=71)
    task = squared_task(3, 16)
    reference = copy.deepcopy(model)
    torch.manual_seed(5)
    reference(x)
    exact_model = copy.deepcopy(model)
    torch.manual_seed(5)
    exact = penalty(exact_model, grad_method="exact").penalised_loss(x, task, step=0)
    exact_grads, exact_rng = grads_of(exact, exact_model), torch.get_rng_state()
    torch.manual_seed(5)
    loss = penalty(model).penalised_loss(x, task, step=0)
    assert torch.equal(torch.get_rng_state(), exact_rng)
    torch.testing.assert_close(loss.detach(), exact.detach(), rtol=1e-7, atol=0)
    assert rel_error(grads_of(loss, model), exact_grads) < 1e-5
    for got, want, done in zip(model.buffers(), reference.buffers(), exact_model.buffers()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(done, want, rtol=1e-12, atol=0)


def test_parameters_untouched_and_under_no_grad_the_value_is_right() -> None:
    model, x = tanh_mlp(3, seed=72), mlp_inputs(8, seed=73)
    task = squared_task(3, 8)
    before = [p.detach().clone() for p in model.parameters()]
    pen = penalty(model, every=2)
    with torch.no_grad():
        loss = pen.penalised_loss(x, task, step=0)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    value, _ = brute_penalty(model, x, y, "categorical", ALPHA, "batch_gradient")
    torch.testing.assert_close(loss.detach(), task(model(x)).detach() + value, rtol=1e-8, atol=0)
    # an evaluation: nothing kept for the next steps, last_value and last_step as before the call
    assert pen._kept.grads is None and pen.last_value is None and pen.last_step is None


@pytest.mark.parametrize("call", ["term", "penalised_loss"])
def test_an_evaluation_between_computed_steps_is_the_penalty_of_its_inputs(call: str) -> None:
    """Under ``torch.no_grad()`` at steps 1 and 2 of ``every=3`` (a validation batch), the penalty of the validation
    inputs, on labels from the generator where training left it: it returned the training batch's kept value (0
    without reuse), whatever the inputs (a review)."""
    model, x, val = tanh_mlp(3, seed=64), mlp_inputs(8, seed=65), mlp_inputs(8, seed=66)
    task = squared_task(3, 8)
    for reuse in (True, False):
        pen = penalty(model, every=3, reuse_between=reuse)
        pen.penalised_loss(x, task, step=0).backward()
        g = torch.Generator().manual_seed(SEED)
        labels(model, x, "categorical", g)  # the training step's draw
        value, _ = brute_penalty(model, val, labels(model, val, "categorical", g), "categorical", ALPHA,
                                 "batch_gradient")
        with torch.no_grad():
            for step in (1, 2):
                got = pen(val, step=step) if call == "term" else pen.penalised_loss(val, task, step=step) - task(model(val))
                # penalised_loss takes the task loss at θ + εĝ: off by ε‖∇task‖ (about 1e-10 here)
                torch.testing.assert_close(got, value, rtol=1e-10 if call == "term" else 1e-8, atol=0)
        assert pen.last_step == 0


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_the_gradients_autograd_grad_returns_are_the_callers(grad_method: str) -> None:
    """``torch.autograd.grad`` of a reusing step's term returned the kept tensors themselves: scaling them in place
    (a review: by 0.5 after each call) halved the penalty gradient of every later reusing step."""
    model, x = tanh_mlp(3, seed=64), mlp_inputs(8, seed=65)
    pen = penalty(model, every=4, grad_method=grad_method)
    pen(x, step=0).backward()
    kept = [g.clone() for g in pen._kept.grads]
    for step in (1, 2, 3):
        grads = torch.autograd.grad(pen(x, step=step), trainable(model))
        assert rel_error(list(grads), kept) == 0.0
        for g in grads:
            g.mul_(0.5)
    assert all(torch.equal(a, b) for a, b in zip(pen._kept.grads, kept))


def test_bad_calls_raise() -> None:
    model, x = tanh_mlp(3), mlp_inputs(4)
    pen = penalty(model)
    with pytest.raises(torchfim.TorchfimError, match="step"):
        pen.penalised_loss(x, lambda out: out.sum())
    with pytest.raises(torchfim.TorchfimError, match="task_loss must be a function"):
        pen.penalised_loss(x, 3.0, step=0)
    with pytest.raises(torchfim.TorchfimError, match="scalar task loss"):
        pen.penalised_loss(x, lambda out: out.pow(2).mean(1), step=0)
    with pytest.raises(torchfim.TorchfimError, match="inputs"):
        pen.penalised_loss([1.0], lambda out: out.sum(), step=0)
    with pytest.raises(torchfim.TorchfimError, match="model must be a torch.nn.Module"):
        pen.penalised_loss(x, lambda out: out.sum(), step=0, model=lambda x: x)
    with pytest.raises(torchfim.TorchfimError, match="trainable parameters are not the penalty's"):
        pen.penalised_loss(x, lambda out: out.sum(), step=0, model=tanh_mlp(3))
    with pytest.raises(torchfim.TorchfimError, match="scalar task loss"):
        pen.penalised_loss(x, lambda out: out.pow(2).mean(1), step=0, model=_Counting(model))
    assert pen.model is model  # the module run is the penalty's own again


class _Counting(nn.Module):
    """A wrapper of the model that counts its forwards (as DistributedDataParallel wraps one)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module, self.calls = module, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.module(x)


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("every", [1, 2])
def test_a_wrapper_passed_as_model_is_the_module_run(kind: str, grad_method: str, every: int) -> None:
    """``model=wrapper``: the loss's forwards go through the wrapper (as DDP needs them to), and the loss and
    its gradient are the ones without it, bit for bit; the penalty's own model is kept."""
    model, x = tanh_mlp(3, seed=64), mlp_inputs(6, seed=65)
    task, wrapper = squared_task(3, 6), _Counting(model)
    plain, wrapped = (penalty(model, kind=kind, grad_method=grad_method, every=every) for _ in range(2))
    for step in range(2):
        want = plain.penalised_loss(x, task, step=step)
        calls = wrapper.calls
        got = wrapped.penalised_loss(x, task, step=step, model=wrapper)
        assert wrapper.calls > calls and wrapped.model is model
        assert torch.equal(got, want)
        assert all(torch.equal(a, b) for a, b in zip(grads_of(got, model), grads_of(want, model)))


@pytest.mark.parametrize("fd_step", [None, 1e-3])
def test_fd_step_scalars_are_the_formula_as_host_numbers_and_as_tensors(fd_step: float | None) -> None:
    """``(ε/‖g‖, 2α‖g‖/ε, α‖g‖²)`` with ``ε = 0.1·√eps·(1 + ‖θ‖)`` (or the given step): the CPU path
    (Python numbers) and the accelerator path (0-dim tensors, run here on CPU) agree with the formula,
    and a zero gradient is not moved."""
    from torchfim.train.finite_difference import FD_STEP_SCALE, _fd_scalars

    torch.manual_seed(SEED)
    params = [torch.randn(4, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [torch.randn_like(p) for p in params]
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
    theta = math.sqrt(sum(float((p * p).sum()) for p in params))
    step = fd_step if fd_step is not None else FD_STEP_SCALE * math.sqrt(torch.finfo(torch.float64).eps) * (1 + theta)
    want = (step / norm, 2 * 0.3 * norm / step, 0.3 * norm**2)
    for host in (True, False):
        got = _fd_scalars(grads, params, fd_step, 0.3, torch.float64, host=host)
        assert all(math.isclose(float(a), b, rel_tol=1e-12) for a, b in zip(got, want))
        zero = _fd_scalars([torch.zeros_like(p) for p in params], params, fd_step, 0.3, torch.float64, host=host)
        assert [float(v) for v in zero] == [0.0, 0.0, 0.0]


def test_cached_penalty_gradient_is_coef_times_the_gradient_difference() -> None:
    """``c·(∇L(θ') − g)`` from one seeded backward and one fused subtraction, with ``c`` a number (CPU)
    and a 0-dim tensor (accelerators), against autograd and explicit arithmetic; a parameter the
    loss does not use gets exactly ``−c·g``."""
    from torchfim.train.finite_difference import penalty_gradient

    model, x = tanh_mlp(3, seed=74), mlp_inputs(8, seed=75)
    unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    params = [*trainable(model), unused]
    g = [torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(76)) for p in params]
    nll = model(x).logsumexp(1).mean()
    grads = torch.autograd.grad(nll, params[:-1], retain_graph=True) + (torch.zeros_like(unused),)
    want = [0.7 * (a - b) for a, b in zip(grads, g)]
    for coef in (0.7, torch.tensor(0.7, dtype=torch.float64)):
        got = penalty_gradient(nll, params, g, coef)
        assert rel_error(got, want) < 1e-14
    assert nll.grad_fn is not None and torch.autograd.grad(nll, params[0])[0] is not None  # graph kept


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_a_training_step_raises_no_warning(grad_method: str) -> None:
    """The output check reads a number from outputs that carry a graph: torch warned on every step before."""
    model = tanh_mlp(3)
    pen = FisherPenalty(model, alpha=0.1, grad_method=grad_method, generator=torch.Generator().manual_seed(SEED))
    x = mlp_inputs(8)
    y = torch.zeros(8, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pen.penalised_loss(x, lambda out: nn.functional.cross_entropy(out, y), step=0).backward()
        (nn.functional.cross_entropy(model(x), y) + pen(x, step=1)).backward()


def test_a_gradient_computed_on_a_small_last_batch_and_reused_is_named() -> None:
    """every=10 with an epoch's last, smaller mini-batch: a computed step falling there kept a gradient about B/b
    times a whole batch's for the next 9 steps (the explosion study's late collapses, found in a review). Named once,
    with the fix; not for every=1, nor for an evaluation's batch."""
    model, x = tanh_mlp(3, seed=64), mlp_inputs(16, seed=65)
    task = squared_task(3, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = penalty(model, every=1)
        for step, rows in enumerate((16, 2, 16)):
            quiet.penalised_loss(x[:rows], lambda out, r=rows: task(torch.cat([out, out.new_zeros(16 - r, 3)])),
                                 step=step)
        pen = penalty(model, every=3)
        pen(x, step=0).backward()
        with torch.no_grad():
            pen(x[:2], step=3)  # an evaluation on a small batch
    with pytest.warns(RuntimeWarning, match=r"computed its gradient on a mini-batch of 2 inputs \(against 16 before\) "
                                            r"and reuses it for the next 2 steps.*drop_last=True"):
        pen(x[:2], step=3).backward()
