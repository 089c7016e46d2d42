"""An Embedding subclass that scales its lookup by a constant keeps the Embedding rule.

``z_l = c·W[t_l]`` (Gemma's and BART's scaled word embeddings): the rule reads ``c`` off the recorded call
and scales the sensitivities (:mod:`torchfim.engine.modules.embedding`). The oracles are those of the case
``scaled_tokens`` (tests/cases.py) in the oracle tests, and the whole-model backend for Gemma 2.
"""

from __future__ import annotations

import clients
import torch
from cases import BY_NAME
from engine_checks import module_rules

import torchfim
from torchfim.engine.modules.embedding import EmbeddingRule


def test_a_scaled_lookup_keeps_the_embedding_rule() -> None:
    """The case ``scaled_tokens`` meets every oracle in tests/test_engine_oracles.py; here, that it does so on
    the Embedding rule (before, the coverage check found the plain rule wrong and the generic rule stood)."""
    model, ids = BY_NAME["scaled_tokens"].build(3), BY_NAME["scaled_tokens"].inputs(5)
    backend, rules = module_rules(model, ids)
    assert isinstance(rules["embed"], EmbeddingRule) and not backend.demoted and not backend.moved


def test_gemma2_keeps_its_scaled_word_embedding_on_the_embedding_rule() -> None:
    """Gemma 2 scales its (tied) word embedding by √d; its norms compute in float32 whatever the model's dtype,
    hence the tolerance (a missing scale is off by a factor of up to d)."""
    transformers = clients.need("transformers")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(vocab_size=60, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=8)
    model = transformers.Gemma2ForCausalLM(config).double().eval()
    x = {"input_ids": torch.randint(1, 60, (3, 5), generator=torch.Generator().manual_seed(1))}
    logits = lambda out: out.logits  # noqa: E731
    reference = torchfim.fisher(model, x, structure="diag", output=logits, backend="functional")
    got = torchfim.fisher(model, x, structure="diag", output=logits)
    assert torch.allclose(got, reference, rtol=1e-6, atol=1e-8 * reference.abs().max())
    assert isinstance(module_rules(model, x, logits)[1]["model.embed_tokens"], EmbeddingRule)
