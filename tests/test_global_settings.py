"""torchfim under global torch settings a user may have switched on around the calls.

Autocast around a float64 model: torch's autocast never casts a float64 tensor (only float32, float16 and
bfloat16 ones are eligible), so a float64 model computes in float64 inside ``torch.autocast("cpu",
dtype=torch.bfloat16)``. Before, the finite-difference penalty took its step ε for bfloat16 all the same and
warned that it "computes in bfloat16": its gradient was 2-8 % off the exact one (2e-8 outside autocast) on an
MLP, a CNN and a transformer encoder. Oracle: the penalty's definition differentiated twice in float64
(``test_train_penalty.brute_penalty``) on the labels the penalty drew.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from test_train_penalty import SEED, brute_penalty, labels, penalty_grad
from test_train_penalty_fd import fd_penalty, rel_error
from torch import nn
from torch.autograd import forward_ad

import torchfim
from torchfim.errors import TorchfimError
from torchfim.train import FisherPenalty


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("build", [(tanh_mlp, mlp_inputs), (strided_cnn, cnn_inputs)], ids=["mlp", "cnn"])
def test_fd_penalty_of_a_float64_model_under_autocast_keeps_float64_accuracy(build, kind: str) -> None:
    model, x = build[0](3, seed=31), build[1](9, seed=32)
    with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        term = fd_penalty(model, "categorical", kind)(x, step=0)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model, x, y, "categorical", 0.37, kind)
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    assert rel_error(penalty_grad(term, model), grads) < 1e-5  # measured 2e-8; 2-3e-2 with the bfloat16 step
    assert not [w for w in seen if "bfloat16" in str(w.message)]



class CastsDown(nn.Module):
    """A float64 MLP whose middle layer computes in float32 (as Llama-family RMS norms do), where the caller's
    autocast does reach: that region runs in bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(self.a(x).tanh().float(), self.b.weight.float(), self.b.bias.float())
        return self.c(h.double().tanh())


def test_fd_penalty_under_autocast_keeps_the_step_of_a_region_it_reaches_in_a_float64_model() -> None:
    """Autocast left out for float64 parameters, but not what the forward computes in below them: the float32 region
    runs in bfloat16 under the caller's autocast, so the step stays bfloat16's (a float64 step: 75 % off the double
    backprop of the same passes; bfloat16's: 6 %). Oracle: ``grad_method="exact"`` under the same autocast."""
    model, x = CastsDown().double(), mlp_inputs(9)

    def gradient(method: str) -> tuple[torch.Tensor, list[str]]:
        model.zero_grad()
        pen = FisherPenalty(model, alpha=0.37, generator=torch.Generator().manual_seed(SEED), grad_method=method)
        with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
            warnings.simplefilter("always")
            pen(x, step=0).backward()
        return torch.cat([p.grad.reshape(-1) for p in model.parameters()]), [str(w.message) for w in seen]

    exact, (fd, said) = gradient("exact")[0], gradient("finite_difference")
    assert float((fd - exact).norm() / exact.norm()) < 0.25
    assert any("bfloat16" in message for message in said)

# ------------------------------------------------------------------ torch.func transforms around the calls
_OF_INPUTS = {
    "fisher": lambda m, x: torchfim.fisher(m, x, structure="trace"),
    "fisher_variance": lambda m, x: torchfim.fisher_variance(m, x, structure="trace"),
    "variance_bound": lambda m, x: torchfim.variance_bound(m, x, structure="trace"),
}
_TRANSFORMS = {
    "grad": lambda f, x: torch.func.grad(f)(x),
    "jvp": lambda f, x: torch.func.jvp(f, (x,), (torch.ones_like(x),)),
    "vmap": lambda f, x: torch.func.vmap(lambda row: f(row[None]))(x),
    "grad-of-another": lambda f, x: torch.func.grad(lambda w: w * f(x))(torch.tensor(2.0, dtype=torch.float64)),
}


@pytest.mark.parametrize("transform", list(_TRANSFORMS))
@pytest.mark.parametrize("call", list(_OF_INPUTS))
def test_a_call_inside_a_torch_func_transform_is_refused_with_the_fix(call: str, transform: str) -> None:
    """torchfim's results are constants: differentiated through under ``torch.func.grad`` (wrt the inputs) they
    gave a gradient of zeros and ``jvp`` a tangent of 0, without a word (the derivative of Tr F wrt x is not 0);
    ``vmap`` raised torch's "calling .item() on a Tensor", and a gradient wrt another variable torch's "element 0
    of tensors does not require grad" from inside the engine."""
    model, x = tanh_mlp(3), mlp_inputs(5)
    with pytest.raises(TorchfimError, match=r"torch\.func.*outside"):
        _TRANSFORMS[transform](lambda xx: _OF_INPUTS[call](model, xx), x)


@pytest.mark.parametrize("estimator", ["score", "hessian"])
@pytest.mark.parametrize("call", ["fisher", "fisher_variance"])
def test_a_call_inside_a_forward_mode_level_is_refused_with_the_fix(call: str, estimator: str) -> None:
    """Inside ``torch.autograd.forward_ad.dual_level()`` the results of dual inputs had no tangent (a derivative of
    0 to forward mode) without a word, and the Hessian estimator and its variance raised torch's "Nested forward
    mode AD is not supported" from inside the engine."""
    model, x = tanh_mlp(3), mlp_inputs(5)
    run = {"fisher": lambda xx: torchfim.fisher(model, xx, estimator=estimator, generator=torch.Generator()),
           "fisher_variance": lambda xx: torchfim.fisher_variance(model, xx, estimator=estimator)}[call]
    with forward_ad.dual_level(), pytest.raises(TorchfimError, match=r"dual_level.*outside"):
        run(forward_ad.make_dual(x, torch.ones_like(x)))


@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("entry", ["call", "penalised_loss"])
def test_the_penalty_inside_a_torch_func_transform_is_refused_with_the_fix(entry: str, method: str) -> None:
    """The penalty's gradient comes from autograd (``loss.backward()``); inside ``torch.func.grad`` it raised torch's
    "autograd.Function ... must override the setup_context staticmethod" from deep inside."""
    model, x = tanh_mlp(3), mlp_inputs(5)
    pen = FisherPenalty(model, generator=torch.Generator().manual_seed(0), grad_method=method)
    run = {"call": lambda xx: pen(xx, step=0),
           "penalised_loss": lambda xx: pen.penalised_loss(xx, lambda out: out.sum(), step=0)}[entry]
    with pytest.raises(TorchfimError, match=r"torch\.func.*outside"):
        torch.func.grad(run)(x)


def test_a_reused_penalty_step_inside_a_torch_func_transform_is_refused_with_the_fix() -> None:
    """A step between computed ones (``every=2``) returns the kept term's surrogate, which raised torch's
    "must override the setup_context staticmethod" inside ``torch.func.grad``."""
    model, x = tanh_mlp(3), mlp_inputs(5)
    pen = FisherPenalty(model, generator=torch.Generator().manual_seed(0), every=2)
    pen(x, step=0)
    with pytest.raises(TorchfimError, match=r"torch\.func.*outside"):
        torch.func.grad(lambda xx: pen(xx, step=1))(x)



# ------------------------------------------------------------------ a model made in inference mode
@pytest.mark.parametrize("method", ["exact", "finite_difference"])
@pytest.mark.parametrize("entry", ["call", "penalised_loss"])
def test_the_penalty_of_a_model_made_in_inference_mode_is_refused_with_the_fix(entry: str, method: str) -> None:
    """Such a model cannot be trained (tests/test_grad_modes.py measures it); the penalty raised torch's "Inference
    tensors cannot be saved for backward" from inside its forward."""
    with torch.inference_mode():
        model = tanh_mlp(3)
    with pytest.raises(TorchfimError, match=r"inference_mode.*load_state_dict"):  # at construction, or else the step
        pen = FisherPenalty(model, generator=torch.Generator().manual_seed(0), grad_method=method)
        if entry == "call":
            pen(mlp_inputs(5), step=0)
        else:
            pen.penalised_loss(mlp_inputs(5), lambda out: out.sum(), step=0)
