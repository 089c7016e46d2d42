"""Models compiled by ``torch.compile``, and TorchScript modules.

A model compiled in place (``model.compile()``, as torch's docs now recommend), a compiled submodule or a
compiled function that the forward calls: torchfim computes on them under torch.func's transforms and
pulls several vectors back through one graph, which compiled code cannot take (AOTAutograd's backward
donates its buffers to a single backward and cannot be differentiated again; dynamo's frames cannot be
transformed). Before, ``fisher`` raised from inside torch on ``model.compile()``, ``backend="functional"``
raised on a compiled function depending on what dynamo had compiled before, and the exact penalty raised
"does not currently support double backward". The engine and those penalties now run compiled code
eagerly, the same function; the finite-difference ``batch_gradient`` penalty, which differentiates once,
keeps it compiled. Oracles: ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from ``torch.func`` Jacobians of an uncompiled twin,
and the penalty's gradient on that twin. TorchScript modules are refused with the fix named.
"""

from __future__ import annotations

import copy
import os
import shutil
import sys
import warnings

import pytest
import torch
from cases import mlp_inputs, tanh_mlp
from clients import rel_err
from oracles import exact_fisher, penalty_definition
from test_train_penalty import labels
from torch import nn
from torch_versions import TORCH_VERSION

import torchfim
import torchfim.engine.plain_forwards as plain_forwards_module
from torchfim.errors import TorchfimError
from torchfim.train import FisherPenalty, FisherTraceMonitor

# The two tests of the stand-in for a torch without ``set_stance`` force it on this torch, where
# ``torch.compiler.disable(fn, recursive=False)`` wraps ``fn`` instead of marking its code skipped (as 2.3-2.5 do): dynamo
# then traces the stand-in inside the compiled graphs and says it cannot trace ``get_ident``; the library never
# installs it on such a torch.


class _Counting:
    """A ``torch.compile`` backend that counts the graphs it is given and runs them as they are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph.forward


class _Block(nn.Module):
    """A Linear layer and ``act``, a function its forward calls."""

    def __init__(self, act: object) -> None:
        super().__init__()
        self.linear, self.act = nn.Linear(5, 5).double(), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.linear(x))


class _Net(nn.Module):
    """A Linear layer, a :class:`_Block`, a Linear layer to 3 classes. A class of its own: dynamo compiles
    nothing of ``nn.Sequential``'s (torch's own frames), so ``compile()`` on it would test nothing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.block, self.last = nn.Linear(3, 5).double(), _Block(_scaled_tanh), nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.block(torch.tanh(self.first(x))))


def _scaled_tanh(z: torch.Tensor) -> torch.Tensor:
    return 2.0 * torch.tanh(z)


def _compiled(kind: str, backend: object = "aot_eager") -> tuple[nn.Module, nn.Module]:
    """(the compiled model, its uncompiled twin with the same parameters)."""
    torch._dynamo.reset()  # each case compiles afresh: what dynamo compiled before changed torch's failures
    twin = _Net()
    model = copy.deepcopy(twin)
    if kind == "in place":
        model.compile(backend=backend)
    elif kind == "submodule":
        model.block = torch.compile(model.block, backend=backend)
    else:  # a compiled function that a forward calls
        model.block.act = torch.compile(_scaled_tanh, backend=backend)
    return model, twin


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("kind", ["in place", "submodule", "function"])
def test_the_fisher_of_a_compiled_model_is_that_of_its_python(kind: str, backend: str) -> None:
    model, twin = _compiled(kind)
    x = mlp_inputs(7)
    model(x)  # compiled on a first call, as in training
    if kind == "function" and backend == "functional" and TORCH_VERSION < (2, 3):
        # torch 2.2 fails inside torch.func's transforms of the whole model ("Cannot access data pointer of Tensor
        # that doesn't have storage"); the per-module backend takes the model (backend="modules" above)
        with pytest.raises(TorchfimError, match="cannot batch this model through torch.func .*use backend='auto'"):
            torchfim.fisher(model, x, structure="diag", backend=backend)
        return
    want = exact_fisher(twin, x, "categorical").diagonal()
    got = torchfim.fisher(model, x, structure="diag", backend=backend)
    assert rel_err(got, want) < 1e-10


def test_compiled_code_runs_eagerly_inside_torchfim_only() -> None:
    """No graph reaches the compiler while torchfim computes (the stance is force_eager), and the
    caller's stance is back afterwards: the model's next call compiles."""
    counting, x = _Counting(), mlp_inputs(7)
    model, _ = _compiled("in place", counting)
    torchfim.fisher(model, x, structure="diag")
    FisherTraceMonitor(model, x, every=1).step(0)
    assert counting.graphs == 0
    model(x)
    assert counting.graphs > 0


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # see the note above _Counting
@pytest.mark.parametrize("kind", ["in place", "submodule"])
def test_without_set_stance_modules_compiled_run_their_python_in_the_mode_only(kind: str) -> None:
    """What :func:`eager_compiled` does on a torch without ``torch.compiler.set_stance`` (< 2.6), forced here: within
    the block no graph reaches the compiler and the exact penalty's double backprop goes through; the next call
    outside compiles."""
    counting, x = _Counting(), mlp_inputs(7)
    model, twin = _compiled(kind, counting)
    with plain_forwards_module._eager_module_calls():
        out = model(x)
        grads = torch.autograd.grad(out.square().sum(), list(model.parameters()), create_graph=True)
        torch.autograd.grad(sum(g.square().sum() for g in grads), list(model.parameters()))
    assert counting.graphs == 0 and torch.equal(out, twin(x))
    model(x)
    assert counting.graphs > 0


@pytest.mark.filterwarnings("ignore:Dynamo does not know how to trace")  # see the note above _Counting
def test_without_set_stance_a_wrapper_keeps_its_hooks_and_a_disabled_one_is_left_alone() -> None:
    """Forced as above. A wrapper from ``torch.compile`` with a hook of its own keeps torch's call (calling the module
    inside would skip the hook: a penalty on another function, its task loss too); one from ``torch._dynamo.disable``
    (how torch 2.3 wraps its compiled graphs) is left to torch, whose wrapper keeps dynamo out of the frames below."""
    x = mlp_inputs(7)
    _, twin = _compiled("in place")
    hooked = torch.compile(copy.deepcopy(twin), backend="aot_eager")
    for net in (hooked, twin):
        net.register_forward_hook(lambda module, args, out: 2 * out)
    disabled = torch._dynamo.disable(copy.deepcopy(twin))
    bare = torch.compile(copy.deepcopy(twin), backend="aot_eager")
    assert [plain_forwards_module._bare_compile_wrapper(m) for m in (hooked, disabled, bare)] == [False, False, True]
    with plain_forwards_module._eager_module_calls():
        assert torch.allclose(hooked(x), twin(x), rtol=1e-12, atol=0)
        assert torch.equal(disabled(x), bare(x))


@pytest.mark.parametrize(("kind", "grad_method"), [("batch_gradient", "exact"), ("trace", "exact"),
                                                    ("trace", "finite_difference")])
@pytest.mark.parametrize("compiled", ["in place", "submodule"])
def test_penalties_that_differentiate_twice_run_a_compiled_model_eagerly(compiled: str, kind: str,
                                                                         grad_method: str) -> None:
    """The exact penalty raised "torch.compile with aot_autograd does not currently support double
    backward"; its gradient is now the uncompiled twin's, with a warning that names the cheaper choice."""
    model, twin = _compiled(compiled)
    x, y = mlp_inputs(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    grads = []
    for net in (twin, model):
        pen = FisherPenalty(net, alpha=0.3, kind=kind, grad_method=grad_method,
                            generator=torch.Generator().manual_seed(2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pen.penalised_loss(x, lambda o: nn.functional.cross_entropy(o, y), step=0).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
        warned = [str(w.message) for w in caught if "compiled" in str(w.message)]
        assert (net is model) == bool(warned)
    assert warned and "grad_method='finite_difference'" in warned[0]
    assert rel_err(grads[1], grads[0]) < 1e-12


def test_the_finite_difference_penalty_keeps_a_compiled_model_compiled() -> None:
    counting, x, y = _Counting(), mlp_inputs(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    model, twin = _compiled("in place", counting)
    grads = []
    for net in (twin, model):
        pen = FisherPenalty(net, alpha=0.3, grad_method="finite_difference", generator=torch.Generator().manual_seed(2))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pen.penalised_loss(x, lambda o: nn.functional.cross_entropy(o, y), step=0).backward()
        assert not [w for w in caught if "compiled" in str(w.message)]  # it runs compiled
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert counting.graphs > 0
    assert rel_err(grads[1], grads[0]) < 1e-12


def _inductor_compiles() -> bool:
    """Whether inductor can compile for the CPU here: it needs a C++ compiler."""
    compiler = os.environ.get("CXX", "clang++" if sys.platform == "darwin" else "g++")
    return sys.platform != "win32" and shutil.which(compiler) is not None


def _task_and_penalty(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """The gradient of the cross-entropy on the targets ``t`` plus that of the penalty on the labels ``y``, from the
    penalty's definition, flattened."""
    params = list(model.parameters())
    task = torch.autograd.grad(nn.functional.cross_entropy(model(x), t), params)
    _, *penalty = penalty_definition(lambda rows: torch.log_softmax(model(x[rows]), -1).gather(-1, y[rows, None]).sum(),
                                     params, len(x), "batch_gradient", alpha)
    return torch.cat([(a + b).reshape(-1) for a, b in zip(task, penalty)])


@pytest.mark.skipif(not _inductor_compiles(), reason="inductor needs a C++ compiler")
@pytest.mark.parametrize("every", [1, 3])
def test_the_finite_difference_penalised_loss_runs_on_an_inductor_model(every: int) -> None:
    """``penalised_loss(grad_method="finite_difference", every=3)`` on a model compiled by inductor (which donates the
    buffers of its backward to a single backward) raised "compiled with non-empty donated buffers" on its first
    computed step (a review): its cached gradient back-propagates the perturbed pass twice. Steps 0 and 1 (computed,
    then reused with every=3): the task gradient at θ plus the penalty's from its definition (float64, uncompiled), on
    the labels a generator seeded alike draws from the float32 model's outputs."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(10, 32), nn.Tanh(), nn.Linear(32, 4))
    eager, twin = copy.deepcopy(net), copy.deepcopy(net).double()
    x, t = torch.randn(16, 10), torch.randint(0, 4, (16,))
    pen = FisherPenalty(torch.compile(net), alpha=0.3, every=every, grad_method="finite_difference",
                        generator=torch.Generator().manual_seed(2))
    draws = torch.Generator().manual_seed(2)
    for step in range(2):
        if step % every == 0:
            want = _task_and_penalty(twin, x.double(), t, labels(eager, x, "categorical", draws), 0.3)
        net.zero_grad()
        pen.penalised_loss(x, lambda o: nn.functional.cross_entropy(o, t), step=step).backward()
        got = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).double()
        assert rel_err(got, want) < 2e-3  # measured 6e-4 to 9e-4: float32's forward difference


def _scripted_inside() -> nn.Module:
    model = tanh_mlp(3, hidden=5)
    model[2] = torch.jit.script(nn.Sequential(nn.Linear(5, 5), nn.Tanh()).double())
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")  # torch's deprecation notice
@pytest.mark.parametrize(("how", "named"), [("script", "the model is"), ("trace", "the model is"),
                                            ("inside", "its module '2' is")])
def test_torchscript_modules_are_refused_with_the_fix(how: str, named: str) -> None:
    """Before: "register_forward_hook is not supported on ScriptModules" (script) or an AttributeError
    ('_CachedForward', trace) from inside torch."""
    x = mlp_inputs(7)
    model = {"script": lambda: torch.jit.script(tanh_mlp(3)), "trace": lambda: torch.jit.trace(tanh_mlp(3), x),
             "inside": _scripted_inside}[how]()
    for compute in (lambda: torchfim.fisher(model, x), lambda: FisherPenalty(model, kind="trace")):
        with pytest.raises(TorchfimError, match=rf"{named} TorchScript .* pass the Python nn.Module"):
            compute()


def test_the_batch_gradient_penalty_takes_a_torchscript_model() -> None:
    """It only calls the model and differentiates: TorchScript takes both, so it is not refused."""
    x, y = mlp_inputs(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    twin = tanh_mlp(3, hidden=5)
    grads = []
    for net in (twin, torch.jit.script(copy.deepcopy(twin))):
        pen = FisherPenalty(net, alpha=0.3, generator=torch.Generator().manual_seed(2))
        pen.penalised_loss(x, lambda o: nn.functional.cross_entropy(o, y), step=0).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    assert rel_err(grads[1], grads[0]) < 1e-12
