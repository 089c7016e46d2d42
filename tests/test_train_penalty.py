"""torchfim.train.FisherPenalty against brute-force double backprop (float64).

Sampling-order contract relied on here (documented in FisherPenalty): on a step where the penalty
is computed it draws the labels with exactly one call ``family.sample(o.detach(), 1, generator)``
on the outputs ``o`` of the inputs it uses (the first ``sub_batch`` ones), and it draws nothing
on other steps. So a generator seeded identically, advanced by the same calls, reproduces the
labels, and the brute force below can use them.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from oracles import FAMILY_WIDTH, log_likelihood
from torch import nn

import torchfim
from torchfim.families import get_family
from torchfim.train import FisherPenalty

SEED = 123




def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def labels(model: nn.Module, x: torch.Tensor, family: str, generator: torch.Generator) -> torch.Tensor:
    """One label per input, drawn the way the penalty draws them: (B, *label_shape)."""
    with torch.no_grad():
        o = model(x)
    return get_family(family).sample(o, 1, generator)[:, 0]


def brute_penalty(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, family: str, alpha: float, kind: str
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The penalty from its definition with hand-written log-likelihoods, and its gradient."""
    params = trainable(model)
    b = len(x)
    if kind == "batch_gradient":
        o = model(x)
        nll = -sum(log_likelihood(family, o[i], y[i]) for i in range(b)) / b
        g = torch.autograd.grad(nll, params, create_graph=True)
        value = alpha * sum(t.pow(2).sum() for t in g)
    else:
        total = 0
        for i in range(b):  # one per-sample gradient at a time
            lp = log_likelihood(family, model(x[i : i + 1])[0], y[i])
            g = torch.autograd.grad(lp, params, create_graph=True)
            total = total + sum(t.pow(2).sum() for t in g)
        value = alpha * total / b
    return value.detach(), [t.detach() for t in torch.autograd.grad(value, params)]


def penalty_grad(term: torch.Tensor, model: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(term, trainable(model)))


def assert_close_list(a: list[torch.Tensor], b: list[torch.Tensor], rtol: float = 1e-10) -> None:
    assert len(a) == len(b)
    scale = max(float(t.abs().max()) for t in b)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=rtol, atol=rtol * scale)


# ------------------------------------------------------------- the formulas
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("family", tuple(FAMILY_WIDTH))
def test_value_and_gradient_match_brute_force(kind: str, family: str) -> None:
    model, x = tanh_mlp(FAMILY_WIDTH[family], seed=3), mlp_inputs(7, seed=4)
    pen = FisherPenalty(model, family=family, alpha=0.37, kind=kind, generator=torch.Generator().manual_seed(SEED))
    term = pen(x, step=0)
    assert term.dim() == 0 and term.dtype == torch.float64
    y = labels(model, x, family, torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model, x, y, family, 0.37, kind)
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    torch.testing.assert_close(pen.last_value, value, rtol=1e-10, atol=0)
    assert_close_list(penalty_grad(term, model), grads)


def test_trace_value_is_mean_of_per_sample_squared_score_norms() -> None:
    """kind='trace' is (α/B) Σᵢ ‖∇θ log p(ŷᵢ|xᵢ)‖², not α‖mean gradient‖² (≈ B times smaller)."""
    model, x = tanh_mlp(3, seed=5), mlp_inputs(16, seed=6)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    norms = []
    for i in range(len(x)):
        lp = torch.log_softmax(model(x[i : i + 1])[0], 0)[y[i]]
        norms.append(sum(g.pow(2).sum() for g in torch.autograd.grad(lp, trainable(model))))
    expected = torch.stack(norms).mean().detach()
    trace = FisherPenalty(model, alpha=1.0, kind="trace", generator=torch.Generator().manual_seed(SEED))
    batch = FisherPenalty(model, alpha=1.0, generator=torch.Generator().manual_seed(SEED))
    torch.testing.assert_close(trace(x, step=0).detach(), expected, rtol=1e-10, atol=0)
    assert float(batch(x, step=0).detach()) < 0.5 * float(expected)


def test_only_trainable_parameters_are_penalised() -> None:
    model, x = tanh_mlp(3, seed=7), mlp_inputs(6, seed=8)
    model[0].weight.requires_grad_(False)
    term = FisherPenalty(model, alpha=0.5, generator=torch.Generator().manual_seed(SEED))(x, step=0)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model, x, y, "categorical", 0.5, "batch_gradient")
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    term.backward()
    assert model[0].weight.grad is None
    assert_close_list([p.grad for p in trainable(model)], grads)


def test_sub_batch_uses_the_first_inputs() -> None:
    model, x = tanh_mlp(3, seed=9), mlp_inputs(12, seed=10)
    pen = FisherPenalty(model, alpha=0.2, sub_batch=5, generator=torch.Generator().manual_seed(SEED))
    term = pen(x, step=0)
    y = labels(model, x[:5], "categorical", torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model, x[:5], y, "categorical", 0.2, "batch_gradient")
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    assert_close_list(penalty_grad(term, model), grads)
    # the inputs after the first five do not matter; a batch smaller than sub_batch is used whole
    other = torch.cat([x[:5], 100 * mlp_inputs(7, seed=11)])
    same = FisherPenalty(model, alpha=0.2, sub_batch=5, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(same(other, step=0).detach(), term.detach())
    big = FisherPenalty(model, alpha=0.2, sub_batch=50, generator=torch.Generator().manual_seed(SEED))
    full = FisherPenalty(model, alpha=0.2, generator=torch.Generator().manual_seed(SEED))
    assert torch.equal(big(x, step=0).detach(), full(x, step=0).detach())


# --------------------------------------------------------------- schedule
def sgd_step(model: nn.Module, grads: list[torch.Tensor], lr: float = 0.5) -> None:
    with torch.no_grad():
        for p, g in zip(trainable(model), grads):
            p -= lr * g + 0.01  # move the parameters so a recomputation would differ


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_every_with_reuse_applies_cached_gradient_between(kind: str) -> None:
    every, alpha = 3, 0.4
    model, x = tanh_mlp(3, seed=12), mlp_inputs(8, seed=13)
    pen = FisherPenalty(model, alpha=alpha, every=every, kind=kind, generator=torch.Generator().manual_seed(SEED))
    replay = torch.Generator().manual_seed(SEED)
    cached_value, cached_grads = None, None
    for step in range(8):
        term = pen(x, step=step)
        got = penalty_grad(term, model)
        if step % every == 0:
            y = labels(model, x, "categorical", replay)  # the penalty's own draw for this step
            cached_value, cached_grads = brute_penalty(model, x, y, "categorical", alpha, kind)
            torch.testing.assert_close(term.detach(), cached_value, rtol=1e-10, atol=0)
            assert_close_list(got, cached_grads)
            assert pen.last_step == step
        else:
            # the surrogate: exactly the cached value and exactly the cached gradient, although
            # the parameters moved since (the penalty's own gradient here would differ)
            assert torch.equal(term.detach(), pen.last_value)
            torch.testing.assert_close(pen.last_value, cached_value, rtol=1e-10, atol=0)
            assert_close_list(got, cached_grads)
            y_now = labels(model, x, "categorical", torch.Generator().manual_seed(0))
            fresh = brute_penalty(model, x, y_now, "categorical", alpha, kind)[1]
            assert max(float((a - b).abs().max()) for a, b in zip(fresh, cached_grads)) > 1e-6
            assert pen.last_step == step - step % every
        sgd_step(model, got)


def test_every_without_reuse_is_exactly_zero_between() -> None:
    model, x = tanh_mlp(3, seed=14), mlp_inputs(8, seed=15)
    pen = FisherPenalty(model, alpha=0.4, every=4, reuse_between=False, generator=torch.Generator().manual_seed(SEED))
    replay = torch.Generator().manual_seed(SEED)
    for step in range(9):
        for p in model.parameters():
            p.grad = None
        term = pen(x, step=step)
        term.backward()  # supports backward on every step
        if step % 4 == 0:
            y = labels(model, x, "categorical", replay)
            value, grads = brute_penalty(model, x, y, "categorical", 0.4, "batch_gradient")
            torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
            assert_close_list([p.grad for p in model.parameters()], grads)
        else:
            assert float(term.detach()) == 0.0 and term.requires_grad
            assert all(p.grad is None for p in model.parameters())  # it adds nothing: no gradient, as a constant
        sgd_step(model, [torch.zeros_like(p) for p in model.parameters()])


def test_before_first_computed_step_the_term_is_zero() -> None:
    model, x = tanh_mlp(3, seed=16), mlp_inputs(8, seed=17)
    pen = FisherPenalty(model, every=10, generator=torch.Generator().manual_seed(SEED))
    term = pen(x, step=3)
    assert float(term.detach()) == 0.0 and pen.last_value is None and pen.last_step is None
    assert all(g is None for g in torch.autograd.grad(term, trainable(model), allow_unused=True))
    term = pen(x, step=10)
    term.backward()
    assert float(term.detach()) > 0 and pen.last_step == 10


def test_every_one_draws_fresh_labels_each_step() -> None:
    model, x = tanh_mlp(3, seed=18), mlp_inputs(8, seed=19)
    pen = FisherPenalty(model, alpha=1.0, every=1, generator=torch.Generator().manual_seed(SEED))
    replay = torch.Generator().manual_seed(SEED)
    values = []
    for step in range(4):
        term = pen(x, step=step)
        y = labels(model, x, "categorical", replay)
        value = brute_penalty(model, x, y, "categorical", 1.0, "batch_gradient")[0]
        torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
        values.append(float(term.detach()))
    assert len(set(values)) > 1


# ------------------------------------------------------------ normalisation
@pytest.mark.parametrize("kind,scale", [("batch_gradient", 16), ("trace", 1)])
def test_expected_value_is_alpha_trace_over_batch(kind: str, scale: int) -> None:
    """E[value] = α·Tr(F)/B for batch_gradient (paper digest §1.5) and α·Tr(F) for trace.

    Over R independent label draws the mean of scale·value/α must agree with the exact Tr(F) on
    the batch within 4 of its own Monte-Carlo standard error (a 4σ band: false-alarm rate ≈ 6e-5;
    the seeds are fixed, so the test is deterministic). Dividing by B instead of B² (or not
    sampling labels from the model) shifts the mean by many standard errors.
    """
    b, alpha, reps = 16, 0.25, 300
    model, x = tanh_mlp(3, seed=20), mlp_inputs(b, seed=21)
    exact = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    pen = FisherPenalty(model, alpha=alpha, kind=kind, generator=torch.Generator().manual_seed(SEED))
    draws = torch.tensor([float(pen(x, step=0).detach()) * scale / alpha for _ in range(reps)], dtype=torch.float64)
    mean, se = float(draws.mean()), float(draws.std() / math.sqrt(reps))
    assert abs(mean - exact) < 4 * se, (mean, exact, se)
    assert se < 0.2 * exact  # the test has power: the band is narrower than a 20 % error


# ------------------------------------------------------------- float32 / devices
def test_float32_works_and_matches_float64() -> None:
    model64, x64 = tanh_mlp(3, seed=22), mlp_inputs(10, seed=23)
    model32 = tanh_mlp(3, seed=22).float()
    for kind in ("batch_gradient", "trace"):
        pen = FisherPenalty(model32, alpha=0.3, kind=kind, generator=torch.Generator().manual_seed(SEED))
        term = pen(x64.float(), step=0)  # float64 inputs would also be cast to the model's dtype
        assert term.dtype == torch.float32 and torch.isfinite(term)
        y = labels(model32, x64.float(), "categorical", torch.Generator().manual_seed(SEED))
        value, grads = brute_penalty(model64, x64, y, "categorical", 0.3, kind)
        torch.testing.assert_close(term.detach().double(), value, rtol=1e-4, atol=0)
        assert_close_list([g.double() for g in penalty_grad(term, model32)], grads, rtol=1e-4)
    # inputs in another dtype are cast to the model's
    pen = FisherPenalty(model32, generator=torch.Generator().manual_seed(SEED))
    assert pen(x64, step=0).dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    model, x = tanh_mlp(3, seed=24), mlp_inputs(8, seed=25)
    cpu = FisherPenalty(model, alpha=0.3, generator=torch.Generator().manual_seed(SEED))(x, step=0)
    gpu_model = tanh_mlp(3, seed=24).cuda()
    for generator in (torch.Generator().manual_seed(SEED), torch.Generator("cuda").manual_seed(SEED)):
        term = FisherPenalty(gpu_model, alpha=0.3, generator=generator)(x, step=0)
        assert term.device.type == "cuda"
        term.backward()
    gpu = FisherPenalty(gpu_model, alpha=0.3, generator=torch.Generator().manual_seed(SEED))(x, step=0)
    torch.testing.assert_close(gpu.detach().cpu(), cpu.detach(), rtol=1e-8, atol=0)


def test_in_a_training_loop_the_penalty_lowers_the_trace() -> None:
    """Smoke test of the intended use: with a large α, training drives Tr(F) down."""
    model, x = tanh_mlp(3, seed=26), mlp_inputs(32, seed=27)
    before = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    pen = FisherPenalty(model, alpha=1.0, every=2, kind="trace", generator=torch.Generator().manual_seed(SEED))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(40):
        opt.zero_grad()
        pen(x, step=step).backward()
        opt.step()
    after = float(torchfim.fisher(model, x, estimator="exact", structure="trace"))
    assert after < 0.5 * before


# --------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"alpha": -0.1}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"every": 0}, "every"),
        ({"every": 2.5}, "every"),
        ({"kind": "hessian"}, "kind"),
        ({"sub_batch": 0}, "sub_batch"),
        ({"family": "nope"}, "family"),
        ({"reuse_between": "yes"}, "reuse_between"),
        ({"generator": 3}, "generator"),
    ],
)
def test_bad_arguments_raise(kwargs: dict, match: str) -> None:
    with pytest.raises(torchfim.TorchfimError, match=match):
        FisherPenalty(tanh_mlp(3), **kwargs)


def test_bad_calls_raise() -> None:
    model, x = tanh_mlp(3), mlp_inputs(4)
    pen = FisherPenalty(model)
    with pytest.raises(torchfim.TorchfimError, match="step=step"):
        pen(x)
    with pytest.raises(torchfim.TorchfimError, match="step"):
        pen(x, step=-1)
    with pytest.raises(torchfim.TorchfimError, match="Tensor"):
        pen([x], step=0)
    with pytest.raises(torchfim.TorchfimError, match="non-empty"):
        pen(x[:0], step=0)
    with pytest.raises(torchfim.TorchfimError, match="2 logits"):
        FisherPenalty(tanh_mlp(1))(x, step=0)
    frozen = tanh_mlp(3).requires_grad_(False)
    with pytest.raises(torchfim.TorchfimError, match="requires_grad"):
        FisherPenalty(frozen)


def test_trace_kind_refuses_dropout_in_train_mode_but_batch_gradient_works() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()
    x = mlp_inputs(8)
    with pytest.raises(torchfim.TorchfimError, match=r"eval.*; or use FisherPenalty\(kind='batch_gradient'\)"):
        FisherPenalty(model, kind="trace")(x, step=0)
    with pytest.raises(torchfim.TorchfimError, match=r"eval.*; or use FisherPenalty\(kind='batch_gradient'\)"):
        FisherPenalty(model, kind="trace").penalised_loss(x, lambda out: out.sum(), step=0)
    term = FisherPenalty(model, generator=torch.Generator().manual_seed(0))(x, step=0)
    term.backward()
    assert torch.isfinite(term)
    model.eval()
    assert torch.isfinite(FisherPenalty(model, kind="trace")(x, step=0))
