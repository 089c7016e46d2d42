"""FisherPenalty on a Hugging Face language model fed its dict mini-batches as they come.

Tiny GPT-2 built from a config (float64), mini-batches ``{"input_ids", "attention_mask", "position_ids"}``
with right padding, ``mask="attention_mask"``. The oracle is the definition with one label per token,
drawn as the penalty draws them (one ``Categorical.sample`` on the ``(B·T, V)`` logits from the same
seed), each sequence's NLL summed over its unpadded tokens, differentiated twice by autograd:
batch gradient ``α‖∇_θ (1/B) Σᵢ Σₜ mᵢₜ (−log p(ŷᵢₜ|xᵢ))‖²``, trace ``α (1/B) Σᵢ ‖∇_θ Σₜ mᵢₜ log p(ŷᵢₜ|xᵢ)‖²``.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from hf_models import VOCAB, padded_batch, tiny_bert, tiny_gpt2
from oracles import penalty_definition

from torchfim.families import Categorical
from torchfim.train import FisherPenalty

transformers = clients.need("transformers")
ALPHA = 0.3


def _definition(model: torch.nn.Module, batch: dict[str, torch.Tensor], kind: str) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        logits = model(**batch).logits
    n, t = logits.shape[:2]
    y = Categorical().sample(logits.reshape(-1, VOCAB), 1, torch.Generator().manual_seed(5)).reshape(n, t)
    keep = batch["attention_mask"].double()

    def log_p(rows: slice) -> torch.Tensor:
        lp = torch.log_softmax(model(**{k: v[rows] for k, v in batch.items()}).logits, -1)
        return (lp.gather(-1, y[rows, :, None])[..., 0] * keep[rows]).sum()

    return penalty_definition(log_p, params, n, kind, ALPHA)


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_penalty_on_a_dict_batch_equals_its_definition(kind: str, grad_method: str) -> None:
    model, batch = tiny_gpt2(), padded_batch([5, 3, 4], seed=1)
    want = _definition(model, batch, kind)
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=grad_method,
                        generator=torch.Generator().manual_seed(5))
    term = pen(batch, step=0, mask="attention_mask")
    got = [term.detach(), *torch.autograd.grad(term, [p for p in model.parameters() if p.requires_grad])]
    tol = 1e-10 if grad_method == "exact" else 1e-6  # the forward difference: ε·‖H'‖ (float64)
    assert torch.allclose(got[0], want[0], rtol=1e-10, atol=0)
    scale = max(float(t.abs().max()) for t in want[1:])
    for g, w in zip(got[1:], want[1:]):
        assert torch.allclose(g, w, rtol=tol, atol=tol * scale)


def test_penalised_loss_hands_the_task_loss_the_models_own_output() -> None:
    """With the targets in the batch the model computes its loss: ``lambda out: out.loss`` is the task loss."""
    model, batch = tiny_gpt2(), padded_batch([5, 2], seed=3)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    pen = FisherPenalty(model, alpha=ALPHA, grad_method="finite_difference", generator=torch.Generator().manual_seed(5))
    loss = pen.penalised_loss(batch, lambda out: out.loss, step=0, mask="attention_mask")
    alone = FisherPenalty(model, alpha=ALPHA, grad_method="finite_difference",
                          generator=torch.Generator().manual_seed(5))(batch, step=0, mask="attention_mask")
    assert torch.allclose(pen.last_value, alone.detach(), rtol=1e-12, atol=0)
    with torch.no_grad():
        task = model(**batch).loss  # GPT-2 takes its loss in float32
    assert torch.allclose((loss - pen.last_value).float(), task, rtol=1e-5)  # the task loss at θ + εĝ


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_the_model_builds_no_key_value_cache(grad_method: str) -> None:
    """A Hugging Face model in eval mode builds a key-value cache by default: the penalty's calls pass
    ``use_cache=False`` (as the engine's do), unless the mini-batch sets it."""
    model, batch = tiny_gpt2(), padded_batch([5, 2], seed=3)
    caches: list[object] = []
    model.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
    pen = FisherPenalty(model, alpha=ALPHA, grad_method=grad_method, generator=torch.Generator().manual_seed(5))
    pen.penalised_loss(batch, lambda out: out.logits.sum(), step=0, mask="attention_mask")
    assert caches and all(cache is None for cache in caches), caches
    caches.clear()
    pen.penalised_loss({**batch, "use_cache": True}, lambda out: out.logits.sum(), step=1, mask="attention_mask")
    assert caches and all(cache is not None for cache in caches)


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_trace_on_a_model_vmap_cannot_batch_goes_one_input_at_a_time(grad_method: str) -> None:
    """BERT builds its padding mask with data-dependent control flow, which torch.func cannot vmap over the
    inputs: kind='trace' warns once and takes the per-input gradients one input at a time, exactly."""
    model, batch = tiny_bert(), padded_batch([5, 2, 4], seed=6)
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        y = Categorical().sample(model(**batch).logits, 1, torch.Generator().manual_seed(5)).reshape(-1)

    def log_p(rows: slice) -> torch.Tensor:
        lp = torch.log_softmax(model(**{k: v[rows] for k, v in batch.items()}).logits, -1)
        return lp.gather(-1, y[rows, None]).sum()

    value, *want = penalty_definition(log_p, params, len(y), "trace", ALPHA)
    pen = FisherPenalty(model, alpha=ALPHA, kind="trace", grad_method=grad_method,
                        generator=torch.Generator().manual_seed(5))
    with pytest.warns(RuntimeWarning, match="one input at a time"):
        term = pen(batch, step=0)
    got = torch.autograd.grad(term, params)
    tol = 1e-10 if grad_method == "exact" else 1e-6
    assert torch.allclose(term, value, rtol=1e-10, atol=0)
    scale = max(float(w.abs().max()) for w in want)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
def test_trace_on_an_sdpa_model_is_batched_with_eager_attention(grad_method: str) -> None:
    """GPT-2 with SDPA attention (transformers' default) asks whether the padding mask is all ones while it builds
    its mask, which vmap cannot batch: kind='trace' went one input at a time (9× slower on a 2-layer GPT-2). Its
    per-input passes now attend eagerly: no warning, the definition's value and gradient, and the model's attention
    implementation is SDPA again afterwards."""
    import warnings

    eager = tiny_gpt2()
    model = type(eager)(transformers.GPT2Config(**{**eager.config.to_dict(), "attn_implementation": "sdpa"}))
    model.load_state_dict(eager.state_dict())
    model = model.double().eval()
    assert model.config._attn_implementation == "sdpa"
    batch = padded_batch([5, 3, 4], seed=1)
    want = _definition(eager, batch, "trace")
    pen = FisherPenalty(model, alpha=ALPHA, kind="trace", grad_method=grad_method,
                        generator=torch.Generator().manual_seed(5))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        term = pen(batch, step=0, mask="attention_mask")
    got = torch.autograd.grad(term, [p for p in model.parameters() if p.requires_grad])
    assert model.config._attn_implementation == "sdpa" and pen.io.eager and not pen.io.looped
    tol = 1e-10 if grad_method == "exact" else 1e-6
    assert torch.allclose(term.detach(), want[0], rtol=1e-10, atol=0)
    scale = max(float(t.abs().max()) for t in want[1:])
    for g, w in zip(got, want[1:]):
        assert torch.allclose(g, w, rtol=tol, atol=tol * scale)


def test_left_padding_that_eager_attention_makes_nan_goes_one_input_at_a_time() -> None:
    """A left-padded SDPA Llama: under eager attention its padding rows, which attend to no key, are NaN (SDPA's are
    finite), and the penalty came out NaN, NaN gradients with it (a trial). Such passes are not taken: the per-input
    gradients go one input at a time, with the warning saying why, and equal those of the model run sample by
    sample; backend='functional' refuses, saying why."""
    import torchfim

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=11, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    config._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(config).double().eval()
    keep = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
    ids = torch.randint(1, 11, (2, 5), generator=torch.Generator().manual_seed(1)).masked_fill(keep == 0, 0)
    batch = {"input_ids": ids, "attention_mask": keep}

    def penalty(looped: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        pen = FisherPenalty(model, alpha=ALPHA, kind="trace", generator=torch.Generator().manual_seed(5))
        pen.io.looped = looped
        term = pen(batch, step=0, mask="attention_mask")
        return term.detach(), list(torch.autograd.grad(term, list(model.parameters()), allow_unused=True))

    with pytest.warns(RuntimeWarning, match="with eager attention, which vmap needs, it gives non-finite values"):
        value, grads = penalty(looped=False)
    want, want_grads = penalty(looped=True)
    assert bool(torch.isfinite(value)) and torch.equal(value, want)
    for g, w in zip(grads, want_grads):
        assert (g is None and w is None) or torch.allclose(g, w, rtol=1e-12, atol=0)
    with pytest.raises(torchfim.TorchfimError, match="cannot batch this model.*with eager attention"):
        torchfim.fisher(model, batch, structure="trace", mask="attention_mask", backend="functional")


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_the_finite_difference_step_counts_a_forward_that_casts_down(kind: str) -> None:
    """A float64 Llama computes its RMS norms and rotary angles in float32: the finite difference's step, taken for
    float64, came out 75-370% off the exact gradient (a trial). The first step finds the float32 the forward casts to,
    and every step takes its step for it: within float32's finite-difference accuracy (measured 1e-2), and the
    probe ran on the first step only."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16,
                                      attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config).double().eval()
    batch = padded_batch([5, 3, 4], seed=1, positions=False)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(grad_method: str, pen: FisherPenalty | None = None) -> torch.Tensor:
        pen = pen or FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method=grad_method,
                                   generator=torch.Generator().manual_seed(5))
        term = pen(batch, step=0, mask="attention_mask")
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(term, params, allow_unused=True)
                          if g is not None])

    exact = gradient("exact")
    pen = FisherPenalty(model, alpha=ALPHA, kind=kind, grad_method="finite_difference",
                        generator=torch.Generator().manual_seed(5))
    with pytest.warns(RuntimeWarning, match="computes in float32 inside a float64 model"):
        fd = gradient("finite_difference", pen)
    assert pen._forward_precision.probed and pen._forward_precision.lower == {torch.float32}
    assert float((fd - exact).norm() / exact.norm()) < 5e-2


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_sub_batch_of_a_dict_batch_is_its_first_rows_with_their_mask(kind: str) -> None:
    model, batch = tiny_gpt2(), padded_batch([2, 5, 3], seed=4)
    first = {k: v[:2] for k, v in batch.items()}

    def penalty(**kw: object) -> FisherPenalty:
        return FisherPenalty(model, alpha=ALPHA, kind=kind, generator=torch.Generator().manual_seed(5), **kw)

    want = penalty()(first, step=0, mask=first["attention_mask"])
    assert torch.allclose(penalty(sub_batch=2)(batch, step=0, mask="attention_mask"), want, rtol=1e-12, atol=0)
    assert not torch.allclose(penalty(sub_batch=2)(batch, step=0), want, rtol=1e-3)  # the mask matters
