"""Models as users and libraries change them: forwards set on instances, compiled and data-parallel
wrappers, parameters a forward leaves unused and layers run without autograd.

The engine computes on a private copy of the module tree (``torchfim.engine.private_tree``). A forward
set on an instance, as ``accelerate``'s hooks set one on every module of a dispatched Hugging Face
model, must run the copy and not the user's module; otherwise the functional backend's parameter
swaps never reach the forward (its Fisher came out zero) and the generic rule's per-sample gradients
came out as broadcast zeros (an error from inside torch). The oracle is the definition
``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from ``torch.func`` Jacobians of an unpatched twin with the same weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import warnings
from typing import NamedTuple

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from engine_checks import module_rules
from oracles import exact_fisher
from processes import one_process_group
from torch import Tensor, nn

import torchfim
from torchfim.engine.modules import GenericRule

accelerate_hooks = clients.need("accelerate.hooks")


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def _method_on_the_root(model: nn.Module) -> nn.Module:
    def forward(self: nn.Module, x: Tensor) -> Tensor:
        return nn.Sequential.forward(self, x)

    model.forward = types.MethodType(forward, model)
    return model


def _partials_like_accelerate(model: nn.Module) -> nn.Module:
    """What ``accelerate.hooks.add_hook_to_module`` does, written out: the class forward kept bound as
    ``_old_forward``, and a partial over the module as the forward."""
    def new_forward(module: nn.Module, *args: object) -> object:
        return module._old_forward(*args)

    for layer in (model[0], model[2]):
        layer._old_forward = layer.forward
        layer.forward = functools.update_wrapper(functools.partial(new_forward, layer), layer._old_forward)
    return model


def _closure_over_a_bound_forward(model: nn.Module) -> nn.Module:
    original = model[2].forward
    model[2].forward = lambda x: original(x)
    return model


PATCHES = [_method_on_the_root, _partials_like_accelerate, _closure_over_a_bound_forward]


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("patch", PATCHES, ids=lambda f: f.__name__.strip("_"))
def test_an_instance_forward_runs_on_the_engines_copy(patch, backend: str) -> None:
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    want = exact_fisher(_mlp(), x, "categorical")
    model = patch(_mlp())
    full = torchfim.fisher(model, x, structure="full", backend=backend)
    diag = torchfim.fisher(model, x, structure="diag", backend=backend)
    assert clients.rel_err(full, want) < 1e-10
    assert clients.rel_err(diag, torch.diagonal(want)) < 1e-10


class _Attending(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.attn(x, x, x, need_weights=False)[0].tanh().mean(1))


def _scaled_attention(self: nn.Module, q: Tensor, k: Tensor, v: Tensor, **kw: object) -> tuple[Tensor, object]:
    out, weights = nn.MultiheadAttention.forward(self, q, k, v, **kw)  # other argument names than the class's
    return out * 2.0 + 0.1, weights


#: name → (model, the module whose forward is set on the instance, that forward, inputs).
OTHER_FORWARDS = {
    "attention": (_Attending, lambda m: m.attn, _scaled_attention, lambda g: torch.randn(5, 3, 4, generator=g)),
    "batch-norm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3)),
                   lambda m: m[1], lambda self, x: nn.BatchNorm1d.forward(self, x) * 3.0,
                   lambda g: torch.randn(6, 3, generator=g)),
    "linear": (_mlp, lambda m: m[0], lambda self, x: nn.functional.linear(x, self.weight * 2.0, self.bias),
               lambda g: torch.randn(6, 3, generator=g)),
    "layer-norm": (lambda: nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Tanh(), nn.Linear(4, 3)),
                   lambda m: m[1], lambda self, x: nn.LayerNorm.forward(self, x) ** 2,
                   lambda g: torch.randn(6, 3, generator=g)),
    "embedding": (lambda: nn.Sequential(nn.Embedding(7, 4), nn.Flatten(), nn.Linear(8, 3)),
                  lambda m: m[0], lambda self, x: nn.Embedding.forward(self, x).sin(),
                  lambda g: torch.randint(0, 7, (6, 2), generator=g)),
}


@pytest.mark.parametrize("name", list(OTHER_FORWARDS))
def test_an_instance_forward_that_computes_something_else_is_what_the_fisher_is_of(name: str) -> None:
    """Rules follow their class's forward. Before, the attention's and BatchNorm's rules ran their own
    forward in place of the instance's while recording (the attention failed with a bare KeyError, the
    BatchNorm was refused as mixing samples); then the others' rules missed the gradient and were moved to the
    whole model's generic rule, with a warning. Now each call's output is compared with the class forward's, and
    the module gets its own generic rule from the first call, silently (nothing is wrong with the model)."""
    build, module_of, forward, inputs = OTHER_FORWARDS[name]
    torch.manual_seed(0)
    model = build().double().eval()
    module = module_of(model)
    module.forward = types.MethodType(forward, module)
    x = inputs(torch.Generator().manual_seed(1))
    x = x.double() if x.is_floating_point() else x
    want = exact_fisher(model, x, "categorical")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        full = torchfim.fisher(model, x, structure="full")
        diag = torchfim.fisher(model, x, structure="diag")
    assert clients.rel_err(full, want) < 1e-10 and clients.rel_err(diag, torch.diagonal(want)) < 1e-10
    assert not [str(w.message) for w in caught if "do not add up" in str(w.message)]
    _, rules = module_rules(model, x)
    assert isinstance(rules[next(p for p, m in model.named_modules() if m is module)], GenericRule)


class _ListedLayers(nn.Module):
    """A forward that reaches its registered layers through a plain list and a plain dict."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(3, 5), nn.Linear(5, 4)])
        self.order = [self.layers[0], self.layers[1]]
        self.by_role = {"head": self.layers[1]}

    def forward(self, x: Tensor) -> Tensor:
        return self.by_role["head"](torch.tanh(self.order[0](x)))


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_layers_reached_through_plain_containers_run_on_the_engines_copy(backend: str) -> None:
    """Before, both backends ran the user's layers and returned a zero Fisher (relative error 1.0)."""
    model = _ListedLayers().double()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = exact_fisher(model, x, "categorical")  # torch.func swaps the parameters of the user's own layers
    got = torchfim.fisher(model, x, structure="diag", backend=backend)
    assert clients.rel_err(got, torch.diagonal(want)) < 1e-10
    assert model.order[0] is model.layers[0] and model.by_role["head"] is model.layers[1]  # the user's untouched


@dataclasses.dataclass(frozen=True)
class _Parts:
    mix: nn.Module


class _Head(NamedTuple):
    head: nn.Module


class _Holder:
    """An object of no kind the private copy rebuilds."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module


class _RecordedLayers(nn.Module):
    """A forward that reaches its registered layers through a frozen dataclass, a named tuple and a
    ``SimpleNamespace`` (``kind="records"``), or through an object of its own (``kind="holder"``)."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix, self.norm, self.head = nn.Linear(3, 5), nn.LayerNorm(5), nn.Linear(5, 4)
        self.kind = kind
        self.parts, self.out = _Parts(self.mix), _Head(self.head)
        self.spaces = types.SimpleNamespace(norm=self.norm, scale=2.0)
        self.holder = _Holder(self.mix)

    def forward(self, x: Tensor) -> Tensor:
        mix = self.parts.mix if self.kind == "records" else self.holder.module
        return self.out.head(torch.tanh(self.spaces.norm(mix(x)) * self.spaces.scale))


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_layers_reached_through_dataclasses_named_tuples_and_namespaces_run_on_the_engines_copy(backend) -> None:
    """Before, both backends ran the user's layers (relative error 0.75 on a two-layer model)."""
    model = _RecordedLayers("records").double()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    want = exact_fisher(model, x, "categorical")
    got = torchfim.fisher(model, x, structure="diag", backend=backend)
    assert clients.rel_err(got, torch.diagonal(want)) < 1e-10
    assert model.parts.mix is model.mix and model.out.head is model.head and model.spaces.norm is model.norm


@pytest.mark.parametrize("rows", [7, 1], ids=["batch", "single-input-batches"])
@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_a_users_module_reached_through_an_object_the_copy_does_not_rebuild_is_refused(backend: str,
                                                                                     rows: int) -> None:
    model = _RecordedLayers("holder").double()
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the per-module backend's coverage check moves mix.* first
        with pytest.raises(torchfim.TorchfimError, match=r"calls 'mix' of the model you passed.*nn.ModuleList"):
            torchfim.fisher(model, list(x.split(rows)), structure="diag", backend=backend)


class _Output(dict):
    """A dict whose entries read as attributes too, as transformers' ``ModelOutput`` does."""

    __getattr__ = dict.__getitem__


class _TiedWithHidden(nn.Module):
    """Tied input and output embeddings, the output one through ``F.linear`` (so the whole model's generic
    rule takes the weight), and an output with the hidden state beside the logits it feeds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(6, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids: Tensor) -> _Output:
        hidden = torch.tanh(self.mix(self.embed(ids))).mean(1)
        return _Output(hidden=hidden, logits=nn.functional.linear(hidden, self.embed.weight))


@pytest.mark.filterwarnings("ignore:torchfim. the module rules:RuntimeWarning")  # the move to the whole model
def test_outputs_beside_the_read_one_are_not_counted_again() -> None:
    """Of the whole model's outputs the Fisher reads ``logits``; ``hidden`` feeds it inside the call. Before,
    the generic rule also took ``hidden``'s sensitivity and counted its path twice (both weights off)."""
    model = _TiedWithHidden().double()
    ids = torch.randint(0, 6, (5, 3), generator=torch.Generator().manual_seed(7))
    want = torchfim.fisher(model, ids, structure="diag", backend="functional")
    got = torchfim.fisher(model, ids, structure="diag")
    assert clients.rel_err(got, want) < 1e-10
    jac, logits = clients.jacobians(model, args=(ids,), output="logits")
    assert clients.rel_err(want, clients.categorical_diag(jac, logits, 6)) < 1e-10


def test_the_users_instance_forwards_stay_bound_to_the_users_modules() -> None:
    model = _partials_like_accelerate(_mlp())
    forwards = {layer: (layer.forward, layer._old_forward) for layer in (model[0], model[2])}
    x = torch.randn(4, 3, dtype=torch.float64)
    before = model(x)
    torchfim.fisher(model, x, structure="diag", backend="functional")
    for layer, (forward, old) in forwards.items():
        assert layer.forward is forward and layer.forward.args[0] is layer
        assert layer._old_forward is old and layer._old_forward.__self__ is layer
    assert torch.equal(model(x), before)


def test_closure_state_that_holds_no_module_stays_shared() -> None:
    """Only the cells that hold a module (or a callable bound to one) are rebuilt for the copy."""
    model = _mlp()
    calls: list[int] = []
    original = model[2].forward

    def counted(x: Tensor) -> Tensor:
        calls.append(len(x))
        return original(x)

    model[2].forward = counted
    x = torch.randn(6, 3, dtype=torch.float64)
    diag = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert calls  # the copy's forward appended to the user's list
    assert clients.rel_err(diag, torch.diagonal(exact_fisher(_mlp(), x, "categorical"))) < 1e-10


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_accelerate_hooks_on_a_transformers_model(backend: str) -> None:
    """A GPT-2 with ``accelerate``'s device hook on every module (as ``dispatch_model`` leaves a model
    spread over devices) has the Fisher of the same GPT-2 without hooks."""
    from hf_models import VOCAB, padded_batch, tiny_gpt2

    batch = padded_batch([5, 3], seed=1)
    jac, logits = clients.jacobians(tiny_gpt2(), kwargs=batch, output="logits")
    want = clients.categorical_diag(jac, logits, VOCAB, batch["attention_mask"])
    model = tiny_gpt2()
    for module in model.modules():
        accelerate_hooks.add_hook_to_module(module, accelerate_hooks.AlignDevicesHook(execution_device="cpu"))
    assert all(hasattr(m, "_hf_hook") for m in model.modules())
    got = torchfim.fisher(model, batch, structure="diag", backend=backend, mask="attention_mask")
    assert clients.rel_err(got, want) < 1e-10


WRAPPERS = {
    "compiled": lambda m: torch.compile(m, backend="eager"),  # the eager backend needs no compiler
    "data_parallel": nn.DataParallel,  # on CPU it calls the module
    "distributed": nn.parallel.DistributedDataParallel,
}


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("where", ["model", "submodule"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_a_wrapped_model_or_submodule_is_computed_on_the_module_inside(wrapper: str, where: str,
                                                                         backend: str) -> None:
    """``torch.compile``, ``DataParallel`` and ``DistributedDataParallel`` wrappers: before, dynamo failed
    under torch.func's transforms, torch's stateless call refused ``DataParallel``, and a data-parallel
    forward would prepare gradient synchronisation (with several processes, a collective on one rank).
    Names drop the wrapper's ``_orig_mod.`` or ``module.``."""
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = exact_fisher(_mlp(), x, "categorical")
    group = one_process_group() if wrapper == "distributed" else contextlib.nullcontext()
    with group:
        model = _mlp()
        if where == "model":
            model = WRAPPERS[wrapper](model)
        else:
            model[2] = WRAPPERS[wrapper](model[2])
        blocks = torchfim.fisher(model, x, structure="blocks", backend=backend)
        diag = torchfim.fisher(model, x, structure="diag", backend=backend)
    assert list(blocks) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert clients.rel_err(diag, torch.diagonal(want)) < 1e-10


class _WithUnusedParameter(nn.Module):
    """``tanh(x W)``; ``spare`` is a parameter the forward never reads (only the generic rule covers it)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 5))
        self.spare = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x @ self.weight)


@pytest.mark.parametrize("structure", ["diag", "full", "trace"])
def test_a_parameter_the_forward_leaves_unused_has_zero_fisher(structure: str) -> None:
    """torch.func hands the generic rule a broadcast zero for it, which the products square in place."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), _WithUnusedParameter(), nn.Linear(5, 4)).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    want = exact_fisher(model, x, "categorical")
    got = torchfim.fisher(model, x, structure=structure)
    expected = {"diag": torch.diagonal(want), "full": want, "trace": torch.trace(want)}[structure]
    assert clients.rel_err(got, expected) < 1e-10
    if structure == "diag":
        spare = 15 + 5 + 25  # after the first Linear's weight and bias, and the custom module's weight
        assert torch.equal(got[spare : spare + 3], torch.zeros(3, dtype=torch.float64))


class _DetachedBody(nn.Module):
    """``b(tanh(a(x)))`` with ``a`` run under ``torch.no_grad``: no output depends on ``a`` through autograd."""

    def __init__(self, detached: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 5))
        self.b = nn.Linear(5, 4)
        self.detached = detached

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad() if self.detached else contextlib.nullcontext():
            h = self.a(x)
        return self.b(torch.tanh(h))


def test_layers_run_without_autograd_are_named_in_one_warning() -> None:
    """Layers under ``torch.no_grad``: autograd, and so training and the Fisher, see no dependence on their
    parameters. Said once per model; ``b`` stays exact."""
    x = torch.randn(7, 3, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want = torch.diagonal(exact_fisher(_DetachedBody(False).double(), x, "categorical"))
    model = _DetachedBody(True).double()
    with pytest.warns(RuntimeWarning, match=r"torchfim: modules 'a\.0', 'a\.2' ran without autograd \(inside torch\.no_grad"):
        got = torchfim.fisher(model, x, structure="diag")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        again = torchfim.fisher(model, x, structure="diag")
    in_a = sum(p.numel() for p in model.a.parameters())
    assert torch.equal(got, again) and torch.equal(got[:in_a], torch.zeros(in_a, dtype=torch.float64))
    assert clients.rel_err(got[in_a:], want[in_a:]) < 1e-10


class _StopGradientTwin(nn.Module):
    """One layer called twice, once under ``torch.no_grad`` (a stop-gradient branch)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(3, 4)

    def forward(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            target = self.layer(x)
        return torch.tanh(self.layer(x)) * target


def test_a_no_grad_call_beside_a_graded_one_is_not_warned_about() -> None:
    model = _StopGradientTwin().double()
    x = torch.randn(6, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torchfim.fisher(model, x, structure="diag")
    assert clients.rel_err(got, torch.diagonal(exact_fisher(model, x, "categorical"))) < 1e-10


def test_compare_estimators_names_the_rows_of_a_wrapped_model_by_the_module_inside() -> None:
    """Its rows read the engine's blocks by name (a KeyError on ``module.0.weight`` before)."""
    x = torch.randn(9, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    plain = torchfim.compare_estimators(_mlp(), x)
    wrapped = torchfim.compare_estimators(nn.DataParallel(_mlp()), x)
    assert [r.name for r in wrapped.rows] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert wrapped.rows == plain.rows


@pytest.mark.parametrize("offload", ["cpu_offload", "init_empty_weights"])
def test_weights_on_the_meta_device_are_refused_with_the_fix_named(offload: str) -> None:
    """``accelerate``'s offloading keeps the weights off the model (a hook loads them inside each forward,
    which still runs); empty-weight initialisation never loads them. Before: a RuntimeError from inside
    torch ("Tensor.item() cannot be called on meta tensors")."""
    accelerate = clients.need("accelerate")
    if offload == "cpu_offload":
        model = accelerate.cpu_offload(_mlp(), execution_device=torch.device("cpu"))
        assert model(torch.randn(2, 3, dtype=torch.float64)).shape == (2, 4)  # the user's forward works
    else:
        with accelerate.init_empty_weights():
            model = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Linear(5, 4)).eval()
    with pytest.raises(torchfim.TorchfimError, match=r"'0\.weight', '0\.bias', '\w+\.\w+' and \d+ more of the model "
                                                     r"are on the meta device.*device_map='cpu'"):
        torchfim.fisher(model, torch.randn(6, 3, dtype=torch.float64), structure="diag")
