"""A layer whose forward is set on the instance (``layer.forward = types.MethodType(f, layer)``) and departs from its
class's on some inputs only: a clamp of the output that binds on later rows, not on the first two that the coverage
check compares with autograd.

Before, the layer kept the rule that follows its class's forward (Linear, Conv, Embedding, the norms, eval-mode
BatchNorm), and its Fisher came out 11-130% off (relative Frobenius error), silently. Now every call of such a layer is
compared with the class forward on the same inputs; where the outputs differ, the layer gets its generic rule
(``torch.func`` over the forward that runs). A forward that only wraps the class's (``accelerate``'s hooks) keeps the
layer's own rule. The oracle is the definition ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from ``torch.func`` Jacobians of the whole model,
in float64.
"""

from __future__ import annotations

import functools
import types

import clients
import pytest
import torch
from engine_checks import assert_quietly_equals_dense_over, module_rules
from oracles import exact_fisher
from torch import Tensor, nn

import torchfim
from torchfim.engine.modules import GenericRule


def _clamped(self: nn.Module, x: Tensor) -> Tensor:
    return type(self).forward(self, x).clamp(max=1.0)


def _rms_norm() -> nn.Module:
    return nn.RMSNorm(4, eps=1e-3)  # with torch's default ε (the dtype's), x̂ is the same at any scale of x


#: name → (the layer, an input of 6 rows, the width of its output flattened).
LAYERS = {
    "linear": (lambda: nn.Linear(4, 4), lambda: torch.randn(6, 4), 4),
    "conv": (lambda: nn.Conv2d(4, 4, 1), lambda: torch.randn(6, 4, 2, 2), 16),
    "embedding": (lambda: nn.Embedding(7, 4), lambda: torch.randint(0, 7, (6, 3)), 12),
    "layer-norm": (lambda: nn.LayerNorm(4), lambda: torch.randn(6, 4), 4),
    "rms-norm": (_rms_norm, lambda: torch.randn(6, 4), 4),
    "group-norm": (lambda: nn.GroupNorm(2, 4), lambda: torch.randn(6, 4, 2, 2), 16),
    "batch-norm-1d": (lambda: nn.BatchNorm1d(4), lambda: torch.randn(6, 4), 4),
    "batch-norm-2d": (lambda: nn.BatchNorm2d(4), lambda: torch.randn(6, 4, 2, 2), 16),
}


def _model(name: str) -> tuple[nn.Module, nn.Module]:
    """The layer ``name`` before a head."""
    torch.manual_seed(0)
    layer = LAYERS[name][0]()
    with torch.no_grad():
        if isinstance(layer, nn.modules.batchnorm._BatchNorm):
            layer.running_mean.uniform_(-0.2, 0.2)
            layer.running_var.uniform_(0.5, 2.0)
        if getattr(layer, "weight", None) is not None and name != "embedding":
            layer.weight.uniform_(0.8, 1.2)
    return nn.Sequential(layer, nn.Flatten(), nn.Linear(LAYERS[name][2], 3)).double().eval(), layer


def _inputs(name: str) -> Tensor:
    """Six inputs, the first two so small that the layer's outputs stay under the clamp (a norm's too: their variance is
    far under its ε), the others large; for the lookup, ids of rows under the clamp first, then of rows above it."""
    if name == "embedding":
        return torch.cat([torch.randint(0, 2, (2, 3)), torch.randint(2, 7, (4, 3))])
    x = LAYERS[name][1]().double()
    return x * torch.tensor([1e-4, 1e-4, 4.0, 4.0, 4.0, 4.0], dtype=x.dtype).reshape(-1, *[1] * (x.dim() - 1))


@pytest.mark.parametrize("name", list(LAYERS))
def test_an_instance_forward_departing_on_later_rows_gets_the_generic_rule(name: str) -> None:
    model, layer = _model(name)
    x = _inputs(name)
    if name == "embedding":
        with torch.no_grad():
            layer.weight[:2] *= 0.1
            layer.weight[2:] = layer.weight[2:].abs() + 1.5
    layer.forward = types.MethodType(_clamped, layer)
    with torch.no_grad():
        clamps = [bool((layer(x[i : i + 1]) >= 1.0).any()) for i in range(len(x))]
    assert clamps[:2] == [False, False] and any(clamps[2:])  # the check's rows pass; the rule misses the others
    assert_quietly_equals_dense_over(model, [x])  # no warning at all, the dense oracle to 1e-10
    assert isinstance(module_rules(model, x)[1]["0"], GenericRule)


def test_a_forward_that_departs_on_a_later_batch_only_gets_the_generic_rule_there() -> None:
    """The first batch stays under the clamp, so the layer's rule passes the coverage check; the second clamps."""
    model, layer = _model("linear")
    layer.forward = types.MethodType(_clamped, layer)
    quiet, loud = torch.randn(4, 4, dtype=torch.float64) * 0.05, torch.randn(5, 4, dtype=torch.float64) * 4.0
    with torch.no_grad():
        assert not bool((layer(quiet) >= 1.0).any()) and bool((layer(loud) >= 1.0).any())
    want = (4 * exact_fisher(model, quiet, "categorical") + 5 * exact_fisher(model, loud, "categorical")) / 9
    got = torchfim.fisher(model, [quiet, loud], structure="full")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    again = torchfim.fisher(model, [quiet, loud], structure="full")  # settled: the generic rule from the start
    assert torch.allclose(again, want, rtol=1e-10, atol=1e-14)


def test_a_forward_that_wraps_the_class_forward_keeps_the_layers_rule() -> None:
    """As ``accelerate``'s hooks leave a layer: a partial over it that calls its class forward."""
    model, layer = _model("linear")
    x = _inputs("linear")

    def new_forward(module: nn.Module, *args: object) -> object:
        return module._old_forward(*args)

    layer._old_forward = layer.forward
    layer.forward = functools.update_wrapper(functools.partial(new_forward, layer), layer._old_forward)
    want = exact_fisher(model, x, "categorical")
    assert torch.allclose(torchfim.fisher(model, x, structure="full"), want, rtol=1e-10, atol=1e-14)
    assert type(module_rules(model, x)[1]["0"]).__name__ == "LinearRule"


def _twice_as_steep(self: nn.Module, x: Tensor) -> Tensor:
    weight = self.weight + (self.weight - self.weight.detach())  # the weight's value, twice its gradient
    return nn.functional.linear(x, weight, self.bias)


def test_a_forward_with_the_class_outputs_but_other_gradients_gets_the_layers_own_generic_rule() -> None:
    """Its outputs are the class forward's, so only the coverage check sees the rule miss (the Fisher of the weight is
    4 times the rule's). The layer's rule is on probation, as for a subclass's own forward: it gives way to the layer's
    generic rule, silently; before, the weight moved to the whole model's generic rule, with a warning."""
    model, layer = _model("linear")
    x = _inputs("linear")
    layer.forward = types.MethodType(_twice_as_steep, layer)
    assert_quietly_equals_dense_over(model, [x])  # no warning at all, the dense oracle to 1e-10
    rules = module_rules(model, x)[1]
    assert isinstance(rules["0"], GenericRule) and "" not in rules


def test_accelerate_device_hooks_keep_the_rule_without_a_second_forward(monkeypatch) -> None:
    """``AlignDevicesHook`` (what ``dispatch_model`` leaves on every module) computes nothing: no call is compared with
    the class forward (a second forward each), and the layer keeps its rule."""
    hooks = clients.need("accelerate.hooks")
    from torchfim.engine import recording

    model, layer = _model("linear")
    x = _inputs("linear")
    hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu"))
    compared = []
    monkeypatch.setattr(recording, "strays", lambda *args: compared.append(args[0]) or False)
    want = exact_fisher(model, x, "categorical")
    assert torch.allclose(torchfim.fisher(model, x, structure="full"), want, rtol=1e-10, atol=1e-14)
    assert compared == [] and type(module_rules(model, x)[1]["0"]).__name__ == "LinearRule"


def test_an_accelerate_hook_that_computes_is_compared_as_any_instance_forward() -> None:
    """A hook of the user's own beside the device hook (a ``SequentialHook``) clamps the output on later rows: the
    layer gets its generic rule, as for :func:`_clamped`."""
    hooks = clients.need("accelerate.hooks")

    class Clamp(hooks.ModelHook):
        def post_forward(self, module: nn.Module, output: Tensor) -> Tensor:
            return output.clamp(max=1.0)

    model, layer = _model("linear")
    x = _inputs("linear")
    hooks.add_hook_to_module(layer, hooks.AlignDevicesHook(execution_device="cpu"))
    hooks.add_hook_to_module(layer, Clamp(), append=True)
    with torch.no_grad():
        assert bool((layer(x[2:]) >= 1.0).any()) and not bool((layer(x[:2]) >= 1.0).any())
    want = exact_fisher(model, x, "categorical")
    assert torch.allclose(torchfim.fisher(model, x, structure="full"), want, rtol=1e-10, atol=1e-14)
    assert isinstance(module_rules(model, x)[1]["0"], GenericRule)
