"""Layers under ``torch.utils.checkpoint`` or saved-tensor hooks: every entry point computes as on the plain
model.

A checkpointed region runs again during the backward pass, with the parameters its modules hold then;
saved-tensor hooks (``save_on_cpu``) move what autograd saves elsewhere and back. Before torchfim ran
its computations with both off (``torchfim.engine.plain_forwards``), the Hessian estimator,
``backend="functional"`` and the penalty's ``trace`` kind raised from inside torch (torch.func refuses
both), a reentrant checkpoint on inputs that require grad made every computation raise (it refuses
``torch.autograd.grad``), and the finite-difference penalty step's gradient was silently wrong (its
perturbed pass was recomputed at the unperturbed parameters). Oracles: the definition
``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` from ``torch.func`` Jacobians of the plain twin with the same weights, the
penalty's definition by double backprop, and, for the random estimators, the plain twin with the same
seed.
"""

from __future__ import annotations

import threading
import warnings

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint as torch_checkpoint
from oracles import exact_fisher, penalty_definition
from torch import Tensor, nn
from torch_versions import SAVED_HOOKS_READABLE

import torchfim
from torchfim.engine.plain_forwards import plain_forwards
from torchfim.families import Categorical
from torchfim.train import FisherPenalty, FisherTraceMonitor

MODES = ["reentrant", "non_reentrant", "offloaded"]
ALPHA = 0.3


class _Body(nn.Module):
    """``tanh(h W)`` with a raw parameter: a module only the generic rule covers."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5) * 0.5)

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(h @ self.w)


class _Checkpointed(nn.Module):
    """``c(body(tanh(a(x))))`` with the body (a rule-less module) run under a checkpoint (``mode``
    ``"reentrant"`` or ``"non_reentrant"``), with its saved tensors offloaded (``"offloaded"``), or plain.

    The checkpoint's input depends on ``a``'s parameters, so a reentrant one sees inputs that require grad.
    """

    def __init__(self, mode: str | None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.body, self.c = nn.Linear(3, 5), _Body(), nn.Linear(5, 4)
        self.mode = mode
        self.body_calls = 0

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        if self.mode is None:
            h = self._body(h)
        elif self.mode == "offloaded":
            with torch.autograd.graph.save_on_cpu():
                h = self._body(h)
        else:
            h = torch_checkpoint.checkpoint(self._body, h, use_reentrant=self.mode == "reentrant")
        return self.c(h)

    def _body(self, h: Tensor) -> Tensor:
        self.body_calls += 1
        return self.body(h)


def _x(seed: int = 3) -> Tensor:
    return torch.randn(7, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("backend", ["modules", "functional"])
@pytest.mark.parametrize("mode", MODES)
def test_the_exact_fisher_of_checkpointed_layers_is_the_definition(mode: str, backend: str) -> None:
    x = _x()
    want = exact_fisher(_Checkpointed(None).double(), x, "categorical")
    model = _Checkpointed(mode).double()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing detached, nothing refused
        for structure, expected in (("full", want), ("diag", torch.diagonal(want)), ("trace", torch.trace(want))):
            got = torchfim.fisher(model, x, structure=structure, backend=backend)
            assert clients.rel_err(got, expected) < 1e-10, structure


@pytest.mark.parametrize("structure", ["full", "diag", "trace"])
@pytest.mark.parametrize("estimator", ["hessian", "score"])
@pytest.mark.parametrize("mode", MODES)
def test_the_sampled_estimators_of_checkpointed_layers_are_the_plain_models(mode: str, estimator: str,
                                                                             structure: str) -> None:
    """Same seed, same draws: the plain twin's estimate to round-off (the Hessian's full structure runs the
    whole model through torch.func)."""
    x = _x(4)
    got = torchfim.fisher(_Checkpointed(mode).double(), x, structure=structure, estimator=estimator,
                          generator=torch.Generator().manual_seed(1))
    want = torchfim.fisher(_Checkpointed(None).double(), x, structure=structure, estimator=estimator,
                           generator=torch.Generator().manual_seed(1))
    assert clients.rel_err(got, want) < 1e-12


def _penalty_definition(model: nn.Module, x: Tensor, kind: str) -> list[Tensor]:
    """The penalty's value and gradient by double backprop on ``model``, labels drawn as the penalty draws them."""
    params = list(model.parameters())
    with torch.no_grad():
        y = Categorical().sample(model(x), 1, torch.Generator().manual_seed(5)).reshape(-1)

    def log_p(rows: slice) -> Tensor:
        return -F.cross_entropy(model(x[rows]), y[rows], reduction="sum")

    return penalty_definition(log_p, params, len(x), kind, ALPHA)


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("mode", MODES)
def test_the_penalty_of_checkpointed_layers_is_its_definition(mode: str, kind: str, grad_method: str) -> None:
    x = _x(5)
    want = _penalty_definition(_Checkpointed(None).double(), x, kind)
    model = _Checkpointed(mode).double().train()
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=grad_method,
                        generator=torch.Generator().manual_seed(5))
    term = pen(x, step=0)
    got = [term.detach(), *torch.autograd.grad(term, list(model.parameters()))]
    tol = 1e-10 if grad_method == "exact" else 1e-6  # the forward difference: ε·‖H'‖ (float64)
    assert torch.allclose(got[0], want[0], rtol=1e-10, atol=0)
    for g, w in zip(got[1:], want[1:]):
        assert clients.rel_err(g, w) < tol


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("mode", MODES)
def test_the_penalised_loss_of_checkpointed_layers_is_the_plain_models(mode: str, kind: str) -> None:
    """``penalised_loss`` with finite differences returns the graph of its perturbed pass for the caller's
    backward: recomputed at θ instead of θ + εĝ, the penalty's part of the non-reentrant case was 10 % off
    on a tiny Llama."""
    x, y = _x(6), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    grads = []
    for m in (mode, None):
        model = _Checkpointed(m).double().train()
        pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method="finite_difference",
                            generator=torch.Generator().manual_seed(5))
        pen.penalised_loss(x, lambda out: F.cross_entropy(out, y), step=0).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert clients.rel_err(grads[0], grads[1]) < 1e-12


@pytest.mark.parametrize("mode", MODES)
def test_the_monitor_of_checkpointed_layers_is_the_plain_models(mode: str) -> None:
    x = _x(7)
    records = []
    for m in (mode, None):
        monitor = FisherTraceMonitor(_Checkpointed(m).double(), x, every=1, n_samples=4,
                                     generator=torch.Generator().manual_seed(2))
        records.append(monitor.measure(0))
    assert records[0].trace == pytest.approx(records[1].trace, rel=1e-12)
    assert records[0].stderr == pytest.approx(records[1].stderr, rel=1e-12)


def test_checkpointing_and_hooks_are_the_users_again_after_a_computation() -> None:
    """Outside torchfim's computations the region is recomputed in the backward pass and hooks pack what
    autograd saves, as the user set them."""
    hooks = torch.autograd.graph.saved_tensors_hooks
    held = (torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator,
            hooks.__enter__, hooks.__exit__)
    model = _Checkpointed("non_reentrant").double()
    torchfim.fisher(model, _x(), structure="diag")
    assert (torch_checkpoint.CheckpointFunction, torch_checkpoint._checkpoint_without_reentrant_generator,
            hooks.__enter__, hooks.__exit__) == held
    model.body_calls, packed = 0, []
    with hooks(lambda t: (packed.append(t.shape), t.detach())[1], lambda t: t):
        model(_x()).sum().backward()
    assert model.body_calls == 2 and packed  # the forward and its recomputation; the hooks ran


@pytest.mark.parametrize("mode", MODES)
def test_a_llama_with_gradient_checkpointing_in_training_mode(mode: str) -> None:
    """transformers checkpoints its layers in training mode (offloading the saved inputs to the host, with
    ``offload=True``). Before: ``fisher`` raised (blaming the integer inputs) and the finite-difference
    penalty's gradient was 10 % off (non-reentrant)."""
    clients.need("transformers")
    from hf_models import VOCAB, tiny_llama

    ids = torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(8))
    results = []
    for checkpointed in (True, False):
        model = tiny_llama().train()  # no dropout modules: training mode is deterministic
        if checkpointed:
            settings = {"use_reentrant": mode == "reentrant"}
            if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.25
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=settings,
                                                      offload=mode == "offloaded")
            elif mode == "offloaded":
                pytest.skip("this transformers has no offloading of checkpointed activations")
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=settings)
        diag = torchfim.fisher(model, {"input_ids": ids}, structure="diag", output=lambda out: out.logits)
        pen = FisherPenalty(model, alpha=ALPHA, grad_method="finite_difference",
                            generator=torch.Generator().manual_seed(5), output=lambda out: out.logits)
        loss = pen.penalised_loss({"input_ids": ids}, lambda out: F.cross_entropy(out.logits.flatten(0, 1),
                                                                                  ids.flatten()), step=0)
        loss.backward()
        results.append((diag, torch.cat([p.grad.flatten() for p in model.parameters()])))
    assert clients.rel_err(results[0][0], results[1][0]) < 1e-12
    assert clients.rel_err(results[0][1], results[1][1]) < 1e-12


def test_a_checkpointed_token_model_keeps_the_vmapped_paths() -> None:
    """Activation checkpointing of a token model also marks the embedding's outputs as requiring grad, by a
    forward hook (``enable_input_require_grads``) whose ``requires_grad_`` torch.func refuses. Before:
    ``backend="functional"`` refused the model and the trace penalty took its per-input gradients one input at
    a time (warning). Now both run batched and equal the model without checkpointing; the method is torch's
    again afterwards."""
    clients.need("transformers")
    from hf_models import VOCAB, tiny_llama

    ids = {"input_ids": torch.randint(0, VOCAB, (3, 6), generator=torch.Generator().manual_seed(8))}
    results = []
    for checkpointed in (True, False):
        model = tiny_llama().train()
        if checkpointed:
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()  # the name since transformers 5.25
            assert getattr(model, "_require_grads_hook", None) is not None
        diag = torchfim.fisher(model, ids, structure="diag", backend="functional", output=lambda out: out.logits)
        pen = FisherPenalty(model, alpha=ALPHA, kind="trace", generator=torch.Generator().manual_seed(5),
                            output=lambda out: out.logits)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no one-input-at-a-time notice
            grads = torch.autograd.grad(pen(ids, step=0), list(model.parameters()))
        results.append((diag, torch.cat([g.flatten() for g in grads])))
    assert clients.rel_err(results[0][0], results[1][0]) < 1e-12
    assert clients.rel_err(results[0][1], results[1][1]) < 1e-12
    assert "requires_grad_" not in torch.Tensor.__dict__


@pytest.mark.parametrize("kind, grad_method, transformed", [("batch_gradient", "finite_difference", False),
                                                          ("batch_gradient", "exact", False),
                                                          ("trace", "exact", True)])
def test_only_the_penalty_passes_that_torch_func_transforms_replace_a_tensor_method(
        kind: str, grad_method: str, transformed: bool) -> None:
    """``requires_grad_`` is replaced (and put back) for the passes torch.func transforms, the trace penalty's
    per-input gradients; the batch-gradient penalty's passes run no transform and leave ``torch.Tensor`` alone
    (a replacement reaches every thread's tensors while it lasts). Seen from inside the model's forward, on the step that computes, for the separate term and for the shared forward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    replaced = []
    model[0].register_forward_hook(lambda *_: replaced.append("requires_grad_" in torch.Tensor.__dict__))
    x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=grad_method,
                        generator=torch.Generator().manual_seed(1))
    pen(x, step=0).backward()
    pen.penalised_loss(x, lambda out: F.cross_entropy(out, y), step=1).backward()
    assert any(replaced) is transformed
    assert "requires_grad_" not in torch.Tensor.__dict__


def test_other_threads_keep_checkpointing_and_torchs_own_is_back_after_the_last_block() -> None:
    """Thread 1 in a block, thread 2 not: thread 2's checkpoint is torch's (its node in the graph); nested
    blocks in thread 1 end with torch's own functions back."""
    held = torch_checkpoint.CheckpointFunction
    w = torch.randn(3, 3, requires_grad=True)
    nodes = []

    def outside() -> None:
        nodes.append(type(torch_checkpoint.checkpoint(torch.tanh, w @ w, use_reentrant=True).grad_fn).__name__)

    with plain_forwards(), plain_forwards():
        inside = type(torch_checkpoint.checkpoint(torch.tanh, w @ w, use_reentrant=True).grad_fn).__name__
        thread = threading.Thread(target=outside)
        thread.start()
        thread.join(5)
    assert (inside, nodes) == ("TanhBackward0", ["CheckpointFunctionBackward"])
    assert torch_checkpoint.CheckpointFunction is held


class _HalfPrecisionRegion(nn.Module):
    """``c(tanh(b(tanh(a(x)))))`` with ``b`` in a bfloat16 autocast region of the forward's own (or not),
    and inside it a region that turns autocast off again, as Hugging Face's rotary embeddings do."""

    def __init__(self, autocast: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 4)
        self.autocast = autocast

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            h = self.b(h)
            with torch.autocast("cpu", enabled=False):
                h = torch.tanh(h.float())
        return self.c(h.float())


@pytest.mark.parametrize("estimator", ["exact", "score", "hessian"])
def test_an_autocast_region_of_the_forward_runs_in_the_models_dtype(estimator: str) -> None:
    """torchfim computes in the model's dtype: the float32 model's Fisher, to float32 round-off, where the
    region in bfloat16 gave it to 3e-4 to 7e-4 and sent ``b`` to the generic rule of the whole model, with a
    warning that blamed a use outside its module (its rule's per-sample gradients differed from autograd's
    by the rounding). The user's own forwards keep their region."""
    x = _x(9).float()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torchfim.fisher(_HalfPrecisionRegion(True), x, structure="diag", estimator=estimator,
                              generator=torch.Generator().manual_seed(3))
    want = torchfim.fisher(_HalfPrecisionRegion(False), x, structure="diag", estimator=estimator,
                           generator=torch.Generator().manual_seed(3))
    assert clients.rel_err(got, want) < 1e-5
    model = _HalfPrecisionRegion(True)
    assert model.b(torch.randn(2, 6)).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model.b(torch.randn(2, 6)).dtype == torch.bfloat16


def test_a_stand_in_fetched_before_the_last_block_ended_still_defers_to_torch() -> None:
    """A thread that looked ``CheckpointFunction`` up while another was in a block, and calls it after the
    block ended, gets torch's checkpoint (not a KeyError for the originals, which the end had forgotten)."""
    w = torch.randn(3, 3, requires_grad=True)
    with plain_forwards():
        fetched = torch_checkpoint.CheckpointFunction
    out = fetched.apply(torch.tanh, True, w @ w)
    assert type(out.grad_fn).__name__ == "CheckpointFunctionBackward"


def _tagging_hooks(seen: list[str]) -> torch.autograd.graph.saved_tensors_hooks:
    return torch.autograd.graph.saved_tensors_hooks(lambda t: (seen.append("pack"), t)[1], lambda t: t)


@pytest.mark.skipif(not SAVED_HOOKS_READABLE,
                    reason="a torch without _top_saved_tensors_default_hooks (2.4) cannot read the caller's hooks back, so they stay: torch.func refuses "
                           "them, and torchfim names backend='auto' as the fix")
@pytest.mark.parametrize("callers", ["save_on_cpu", "own hooks"])
def test_saved_tensor_hooks_the_caller_entered_are_set_aside_and_back_after(callers: str) -> None:
    """A caller that wraps its training step in ``save_on_cpu`` (or hooks of its own) and calls torchfim
    inside: before, ``backend="functional"`` refused the model as one torch.func "cannot batch", and the
    trace penalty fell back to one input at a time with a warning. The caller's hooks are set aside while
    torchfim computes, and pack its own tensors again after."""
    model, x = _Checkpointed(None).double(), _x()
    want = exact_fisher(model, x, "categorical").diagonal()
    value = FisherPenalty(model, kind="trace", generator=torch.Generator().manual_seed(0))(x, step=0)
    seen: list[str] = []
    with torch.autograd.graph.save_on_cpu() if callers == "save_on_cpu" else _tagging_hooks(seen):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            got = torchfim.fisher(model, x, structure="diag", backend="functional")
            penalty = FisherPenalty(model, kind="trace", generator=torch.Generator().manual_seed(0))(x, step=0)
        assert not seen
        model.a.weight.exp().sum()  # the caller's hooks are theirs again: they pack what exp saves
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)
    assert torch.allclose(penalty, value, rtol=1e-12, atol=0)
    assert callers == "save_on_cpu" or seen
