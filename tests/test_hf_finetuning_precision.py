"""The finite difference's step on a Hugging Face model fine-tuned with its own loss: a float64 GPT-2 in its default
(SDPA) attention, ``kind="trace"`` with ``grad_method="finite_difference"`` in ``penalised_loss``, the task loss
``out.loss``, which transformers computes in float32 (``logits.float()``).

The per-input passes first fail to ``vmap`` the SDPA model and are tried again with eager attention; the forward that
raised never ran the hook that ends the search for the forward's precision, so the search stayed on over the task loss
(float32) added to the penalty (float64), took the model for one that computes in float32, warned so and took every
later step for float32: 7e-5 off double backprop instead of 4e-8. The oracle: the definition by double backprop, with
the labels drawn as the penalty draws them and the positions its loss scores (the causal shift, -100 at padding).
"""

from __future__ import annotations

import warnings

import clients  # first: hides a torchvision build that cannot load
import torch
from hf_models import VOCAB, labelled_batch
from oracles import penalty_definition

from torchfim.families import Categorical
from torchfim.train import FisherPenalty

transformers = clients.need("transformers")
ALPHA = 0.3


def _sdpa_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                                     bos_token_id=1, eos_token_id=1, attn_implementation="sdpa")
    return transformers.GPT2LMHeadModel(config).double().eval()


def _definition(model: torch.nn.Module, batch: dict[str, torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Value and gradient of the trace penalty over the positions the causal loss scores."""
    params = [p for p in model.parameters() if p.requires_grad]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    scored = torch.cat([batch["labels"][:, 1:] != -100, torch.zeros_like(batch["labels"][:, :1], dtype=bool)], 1)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):  # CPU flash has no double backward
        with torch.no_grad():
            logits = model(**inputs).logits
        rows = torch.where(scored.reshape(-1, 1), logits.reshape(-1, VOCAB), torch.zeros((), dtype=logits.dtype))
        y = Categorical().sample(rows, 1, torch.Generator().manual_seed(seed)).reshape(scored.shape)

        def log_p(part: slice) -> torch.Tensor:
            lp = torch.log_softmax(model(**{k: v[part] for k, v in inputs.items()}).logits, -1)
            return (lp.gather(-1, y[part, :, None])[..., 0] * scored[part]).sum()

        return penalty_definition(log_p, params, scored.shape[0], "trace", ALPHA)


def test_a_float32_task_loss_does_not_coarsen_the_trace_penaltys_finite_difference() -> None:
    model, batch = _sdpa_gpt2(), labelled_batch([5, 3, 4], seed=1)
    params = [p for p in model.parameters() if p.requires_grad]
    pen = FisherPenalty(model, alpha=ALPHA, kind="trace", grad_method="finite_difference")
    for step in range(2):  # the step found on the first computing step serves the later ones
        pen.generator = torch.Generator().manual_seed(10 + step)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*computes in float32")
            loss = pen.penalised_loss(batch, lambda out: 0 * out.loss, step=step, mask="attention_mask")
        got = torch.autograd.grad(loss, params)
        want = _definition(model, batch, 10 + step)
        assert torch.allclose(pen.last_value, want[0], rtol=1e-10, atol=0)
        error = torch.cat([(g - w).flatten() for g, w in zip(got, want[1:])]).norm()
        assert float(error / torch.cat([w.flatten() for w in want[1:]]).norm()) < 1e-6  # float64's ε: 4e-8
