"""torchfim on a peft LoRA model: the Fisher of the adapters alone, the base weights frozen.

A tiny GPT-2 (built from a config, offline) with LoRA adapters on its attention and MLP input
projections, as ``peft.get_peft_model`` leaves it: only the adapters' ``lora_A``/``lora_B`` weights
require grad. The oracle is the definition, ``(1/n) Σ_b Σ_{t unmasked} diag(J_btᵀ Λ(p_bt) J_bt)``
from ``torch.func`` Jacobians against the adapters' flat parameter vector (:func:`clients.jacobians`).
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from hf_models import VOCAB, generic_modules, padded_batch, tiny_gpt2

import torchfim

peft = clients.need("peft")


def lora_gpt2() -> torch.nn.Module:
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc"], lora_dropout=0.0,
                             fan_in_fan_out=True, init_lora_weights=False)  # random B: a nonzero Fisher
    return peft.get_peft_model(tiny_gpt2(), config).eval()


@pytest.mark.parametrize("backend", ["modules", "functional"])
def test_lora_adapters_exact_diag_matches_jacobian_oracle(backend: str) -> None:
    model = lora_gpt2()
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 8 and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    batch = padded_batch([5, 3, 4], seed=11)
    jac, logits = clients.jacobians(model, kwargs=batch, output="logits")
    want = clients.categorical_diag(jac, logits, VOCAB, batch["attention_mask"])
    got = torchfim.fisher(model, batch, structure="diag", backend=backend, mask="attention_mask")
    assert got.shape == want.shape == (sum(p.numel() for n, p in model.named_parameters() if n in trainable),)
    assert clients.rel_err(got, want) < 1e-10


def test_lora_adapters_keep_the_linear_rule() -> None:
    """The adapters are ``nn.Linear`` layers inside peft's LoRA layer: no generic rule (the frozen
    ``Conv1D`` base layers have nothing to differentiate)."""
    assert generic_modules(lora_gpt2(), padded_batch([5, 3], seed=12)) == []
