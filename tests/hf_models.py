"""Tiny Hugging Face transformers models built from a config (random weights, offline, float64), their padded
dict mini-batches, and the Jacobian oracle of a sequence classifier: what the tests of torchfim on transformers
share. Importing it skips a test module where transformers is not installed.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import torch

from torchfim.engine import ModelView, batches, make_backend
from torchfim.engine.modules import GenericRule

transformers = clients.need("transformers")
transformers.logging.set_verbosity_error()

VOCAB, LENGTH, CLASSES = 50, 5, 3
PAD = 0


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
        bos_token_id=1, eos_token_id=1, attn_implementation="eager",
    )
    return transformers.GPT2LMHeadModel(config).double().eval()


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=16, num_labels=CLASSES, pad_token_id=PAD, attn_implementation="eager",
    )
    return transformers.BertForSequenceClassification(config).double().eval()


def tiny_distilbert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(
        vocab_size=VOCAB, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=16,
        num_labels=CLASSES, pad_token_id=PAD, attn_implementation="eager",
    )
    return transformers.DistilBertForSequenceClassification(config).double().eval()


def built(model: type, config: type, **settings: object) -> torch.nn.Module:
    """A 2-layer causal LM of width 16 and 2 heads over VOCAB tokens (eager attention), in float64, seeded;
    ``settings`` adds to or overrides its config (None drops a setting the config does not take)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                  max_position_embeddings=16, pad_token_id=PAD, attn_implementation="eager")
    merged = {k: v for k, v in {**common, **settings}.items() if v is not None}
    return model(config(**merged)).double().eval()


def tiny_opt() -> torch.nn.Module:
    """OPT: its position embedding (an ``nn.Embedding`` subclass) takes the attention mask and computes its
    ids, and its decoder layers flatten the hidden states to ``(B·T, d)`` around the feed-forward layers."""
    return built(transformers.OPTForCausalLM, transformers.OPTConfig, ffn_dim=32, word_embed_proj_dim=16)


def tiny_gemma() -> torch.nn.Module:
    """Gemma: its token embedding (an ``nn.Embedding`` subclass) scales the rows it looks up, and its
    RMSNorm is its own class."""
    return built(transformers.GemmaForCausalLM, transformers.GemmaConfig, intermediate_size=32,
                 num_key_value_heads=1, head_dim=8)


def tiny_llama() -> torch.nn.Module:
    """Llama: rotary positions, grouped-query attention, and an RMSNorm of its own class."""
    return built(transformers.LlamaForCausalLM, transformers.LlamaConfig, intermediate_size=32, num_key_value_heads=1)


def tiny_falcon() -> torch.nn.Module:
    """Falcon: its layers are ``FalconLinear``, an ``nn.Linear`` subclass whose own forward computes the same."""
    return built(transformers.FalconForCausalLM, transformers.FalconConfig, new_decoder_architecture=False,
                 multi_query=True, max_position_embeddings=None)


def tiny_bart() -> torch.nn.Module:
    """BART: its decoder looks its positions up from ids ``(T,)`` beside the token ids ``(B, T)``, an output
    ``(1, T, d)`` shared by the batch; its classifier reads the last ``<eos>`` of each input."""
    torch.manual_seed(0)
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1,
                                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=16, num_labels=CLASSES,
                                     pad_token_id=PAD, eos_token_id=1, attn_implementation="eager")
    return transformers.BartForSequenceClassification(config).double().eval()


def padded_batch(lengths: list[int], seed: int, positions: bool = True) -> dict[str, torch.Tensor]:
    """Token ids padded on the right to LENGTH, their attention mask and (optionally) position ids.

    Hugging Face models build position ids of shape ``(1, T)`` when none are passed, shared by the
    whole batch; passing them per input (``(B, T)``) keeps every lookup per-sample (see
    :func:`test_shared_position_ids_per_module`).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (len(lengths), LENGTH), generator=g)
    mask = (torch.arange(LENGTH) < torch.tensor(lengths).unsqueeze(1)).long()
    batch = {"input_ids": ids.masked_fill(mask == 0, PAD), "attention_mask": mask}
    if positions:
        batch["position_ids"] = torch.arange(LENGTH).repeat(len(lengths), 1)
    return batch


def concat(mini_batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in mini_batches]) for k in mini_batches[0]}


def generic_modules(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> list[str]:
    """Paths of the modules the per-module backend covers with its generic (torch.func) rule."""
    view = ModelView(model)
    engine = make_backend(view, "modules")
    for b in batches(batch, None, view.device, view.dtype):
        engine.record(b)  # the first record may move parameters to a generic rule
    return sorted(rule.path for rule in engine.rules.values() if isinstance(rule, GenericRule))


def labelled_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """:func:`padded_batch` with ``labels``: its input ids, -100 at the padding (as a collator makes them)."""
    batch = padded_batch(lengths, seed=seed)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def classifier_oracle(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    jac, logits = clients.jacobians(model, kwargs=batch, output="logits")
    return clients.categorical_diag(jac, logits, CLASSES)


def tiny_t5() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=PAD,
    )
    return transformers.T5ForConditionalGeneration(config).double().eval()
