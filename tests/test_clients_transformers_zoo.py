"""Hugging Face architectures built from tiny configs: the exact diagonal equals a per-sample autograd oracle.

A guard on reach: each architecture below once failed, or gave its layers to a generic rule above, and each
is computed here by the default backend and compared with :func:`clients.categorical_diag_by_autograd` (one
backward per input, position and class with plain autograd: no torch.func, so models that it cannot batch are
checked too). Models that compute in float32 inside (their
norms, whatever the model's dtype) get a float32-sized tolerance; RWKV, whose time decays are exponentials,
one of 1e-7 (its Fisher from one input at a time and from the batch differ by 3e-9 of the largest entry).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import clients
import pytest
import torch
from torch import nn

import torchfim

T = clients.need("transformers")
_TEXT = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=40)
_DECODER = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, vocab_size=24,
                num_hidden_layers=1)
_AUDIO = dict(num_hidden_layers=1, conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=4,
              num_conv_pos_embedding_groups=2, num_labels=3, hidden_size=16, num_attention_heads=2, intermediate_size=32)
_VISION = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32, num_hidden_layers=1, num_labels=3)


def _ids(vocab: int = 40, length: int = 5) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(3, vocab, (2, length), generator=torch.Generator().manual_seed(1))}


def _pixels(size: int = 16, frames: int = 0) -> dict[str, torch.Tensor]:
    shape = (2, frames, 3, size, size) if frames else (2, 3, size, size)
    return {"pixel_values": torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))}


def _audio() -> dict[str, torch.Tensor]:
    return {"input_values": torch.randn(2, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(1))}


#: name → (model factory, inputs, relative tolerance)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[], dict], float]] = {
    "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(**_DECODER)), lambda: _ids(24), 1e-6),
    "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(head_dim=8, **_DECODER)), lambda: _ids(24), 1e-6),
    "gemma3": (lambda: T.Gemma3ForCausalLM(T.Gemma3TextConfig(head_dim=8, **_DECODER)), lambda: _ids(24), 1e-6),
    "cohere": (lambda: T.CohereForCausalLM(T.CohereConfig(**_DECODER)), lambda: _ids(24), 1e-6),
    "gpt_neox": (lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(vocab_size=24, hidden_size=16, num_hidden_layers=1,
                                                               num_attention_heads=2, intermediate_size=32,
                                                               rotary_pct=0.5)), lambda: _ids(24), 1e-10),
    "bloom": (lambda: T.BloomForCausalLM(T.BloomConfig(vocab_size=24, hidden_size=16, n_layer=1, n_head=2)),
              lambda: _ids(24), 1e-10),
    "t5": (lambda: T.T5ForSequenceClassification(T.T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1,
                                                            num_heads=2, num_labels=3, decoder_start_token_id=0,
                                                            eos_token_id=1)),
           lambda: {"input_ids": torch.cat([_ids()["input_ids"], torch.ones(2, 1, dtype=torch.long)], 1)}, 1e-6),
    "deberta": (lambda: T.DebertaForSequenceClassification(T.DebertaConfig(num_hidden_layers=1, num_labels=3,
                                                                           relative_attention=True,
                                                                           max_relative_positions=8,
                                                                           pos_att_type=["c2p", "p2c"], **_TEXT)),
                _ids, 1e-6),
    "convbert": (lambda: T.ConvBertForSequenceClassification(T.ConvBertConfig(num_hidden_layers=1, num_labels=3,
                                                                              embedding_size=16, head_ratio=1,
                                                                              conv_kernel_size=3, **_TEXT)), _ids, 1e-10),
    "modernbert": (lambda: T.ModernBertForSequenceClassification(T.ModernBertConfig(
        vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_labels=3,
        global_attn_every_n_layers=2, local_attention=4, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        cls_token_id=1, sep_token_id=2)), _ids, 1e-10),
    "hubert": (lambda: T.HubertForSequenceClassification(T.HubertConfig(**_AUDIO)), _audio, 1e-10),
    "wavlm": (lambda: T.WavLMForSequenceClassification(T.WavLMConfig(num_buckets=8, max_bucket_distance=20, **_AUDIO)),
              _audio, 1e-10),
    "sew_d": (lambda: T.SEWDForSequenceClassification(T.SEWDConfig(squeeze_factor=2, position_buckets=8,
                                                                   max_relative_positions=8, **_AUDIO)), _audio, 1e-6),
    "swinv2": (lambda: T.Swinv2ForImageClassification(T.Swinv2Config(image_size=16, patch_size=2, embed_dim=8,
                                                                      depths=[1, 1], num_heads=[1, 2], window_size=4,
                                                                      num_labels=3)), _pixels, 1e-10),
    "pvt": (lambda: T.PvtForImageClassification(T.PvtConfig(image_size=32, num_encoder_blocks=2, depths=[1, 1],
                                                            sequence_reduction_ratios=[2, 1], hidden_sizes=[8, 16],
                                                            patch_sizes=[4, 2], strides=[4, 2],
                                                            num_attention_heads=[1, 2], mlp_ratios=[2, 2],
                                                            num_labels=3)), lambda: _pixels(32), 1e-10),
    "focalnet": (lambda: T.FocalNetForImageClassification(T.FocalNetConfig(image_size=32, patch_size=4, embed_dim=8,
                                                                           depths=[1, 1], focal_levels=[2, 2],
                                                                           focal_windows=[3, 3], num_labels=3)),
                 lambda: _pixels(32), 1e-10),
    "bit": (lambda: T.BitForImageClassification(T.BitConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                                            num_labels=3, layer_type="preactivation", num_groups=4)),
            lambda: _pixels(32), 1e-10),
    "data2vec_vision": (lambda: T.Data2VecVisionForImageClassification(T.Data2VecVisionConfig(
        image_size=16, patch_size=8, use_relative_position_bias=True, **_VISION)), _pixels, 1e-10),
    "timesformer": (lambda: T.TimesformerForVideoClassification(T.TimesformerConfig(image_size=16, patch_size=8,
                                                                                    num_frames=2, **_VISION)),
                    lambda: _pixels(16, frames=2), 1e-10),
    "swiftformer": (lambda: T.SwiftFormerForImageClassification(T.SwiftFormerConfig(depths=[1, 1, 1, 1],
                                                                                    embed_dims=[8, 16, 16, 32],
                                                                                    num_labels=3)),
                    lambda: _pixels(32), 1e-10),
    "rwkv": (lambda: T.RwkvForCausalLM(T.RwkvConfig(vocab_size=24, hidden_size=16, num_hidden_layers=2,
                                                    attention_hidden_size=16, intermediate_size=32,
                                                    context_length=16)), lambda: _ids(24), 1e-7),
    "whisper": (lambda: T.WhisperForAudioClassification(T.WhisperConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=8, max_source_positions=8,
        num_labels=3)),
                lambda: {"input_features": torch.randn(2, 8, 16, dtype=torch.float64,
                                                       generator=torch.Generator().manual_seed(1))}, 1e-10),
    "videomae": (lambda: T.VideoMAEForVideoClassification(T.VideoMAEConfig(image_size=16, patch_size=8, num_frames=4,
                                                                           tubelet_size=2, **_VISION)),
                 lambda: _pixels(16, frames=4), 1e-10),
    "bart": (lambda: T.BartForSequenceClassification(T.BartConfig(
        vocab_size=40, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_labels=3, eos_token_id=2)),
             lambda: {"input_ids": torch.cat([_ids()["input_ids"], torch.full((2, 1), 2)], 1)}, 1e-10),
    "falcon_mamba": (lambda: T.FalconMambaForCausalLM(T.FalconMambaConfig(vocab_size=24, hidden_size=16,
                                                                          num_hidden_layers=1, state_size=4, expand=2,
                                                                          conv_kernel=2)), lambda: _ids(24, 4), 1e-6),
    # float32: the experts' grouped matrix product has no float64
    "mixtral": (lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=3, num_experts_per_tok=2, **_DECODER)),
                lambda: _ids(24, 4), 1e-4),
    "recurrent_gemma": (lambda: T.RecurrentGemmaForCausalLM(T.RecurrentGemmaConfig(
        vocab_size=24, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        intermediate_size=32, lru_width=16, attention_window_size=4, conv1d_width=2,
        block_types=["recurrent", "attention"])), lambda: _ids(24, 4), 1e-6),
}


@pytest.mark.parametrize("name", list(ZOO))
def test_the_exact_diagonal_of_each_architecture_equals_the_autograd_oracle(name: str) -> None:
    build, inputs, tolerance = ZOO[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # moved parameters, modules computed one sample at a time, torch's notes
        model = build().eval() if name == "mixtral" else build().double().eval()
        x = inputs()
        if name == "rwkv":  # it rescales its layers in place on its first call in eval mode: as the error says
            with pytest.raises(torchfim.TorchfimError, match="RWKV rescales its layers"):
                torchfim.fisher(model, x, structure="diag", output=lambda out: out.logits)
            model(**x)
        got = torchfim.fisher(model, x, structure="diag", output=lambda out: out.logits)
    want = clients.categorical_diag_by_autograd(model, x)
    assert (got - want).abs().max() <= tolerance * want.abs().max()
