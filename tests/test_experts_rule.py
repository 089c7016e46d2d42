"""Transformers' fused mixture-of-experts layers keep a rule of their own (docs/math.md §6.3g).

The experts modules are built with transformers' own ``use_experts_implementation`` decorator, in every layout
it declares (gated or not, weights ``(E, out, in)`` or transposed, with biases, with a post-expert norm), and run
by transformers' own forwards (``batched_mm``, and the class's loop as ``eager``, where index ``E`` drops a
pair), and Llama 4's experts, which take every token once per expert. Every structure equals the dense float64
oracle to 1e-10; the real Mixtral, GPT-OSS, Qwen2-MoE, Phi-MoE, OLMoE, Llama 4 and DeepSeek-V3 equal the autograd
oracle (their routers and norms compute in float32 inside).
"""

from __future__ import annotations

import types
import warnings

import clients
import pytest
import torch
from engine_checks import assert_quietly_equals_dense, module_rules
from torch import nn

import torchfim
from torchfim.engine.modules.experts import _expert_blocks

T = clients.need("transformers")
from transformers.integrations.moe import use_experts_implementation  # noqa: E402

_HIDDEN, _INTER, _EXPERTS, _TOP = 6, 4, 3, 2


def _experts(has_gate: bool, is_transposed: bool, has_bias: bool, has_post_expert_norm: bool) -> type[nn.Module]:
    """An experts class in one of the layouts transformers declares, its weights random (biases too)."""

    @use_experts_implementation(has_gate=has_gate, is_transposed=is_transposed, has_bias=has_bias,
                                has_post_expert_norm=has_post_expert_norm)
    class Experts(nn.Module):
        def __init__(self, config: types.SimpleNamespace) -> None:
            super().__init__()
            self.num_experts, first = _EXPERTS, (2 if has_gate else 1) * _INTER
            name = "gate_up_proj" if has_gate else "up_proj"
            shapes = ((_HIDDEN, first), (_INTER, _HIDDEN)) if is_transposed else ((first, _HIDDEN), (_HIDDEN, _INTER))
            setattr(self, name, nn.Parameter(torch.randn(_EXPERTS, *shapes[0]) * 0.5))
            self.down_proj = nn.Parameter(torch.randn(_EXPERTS, *shapes[1]) * 0.5)
            if has_bias:
                setattr(self, name + "_bias", nn.Parameter(torch.randn(_EXPERTS, first) * 0.3))
                self.down_proj_bias = nn.Parameter(torch.randn(_EXPERTS, _HIDDEN) * 0.3)
            if has_post_expert_norm:
                self.post_expert_norm = nn.LayerNorm(_HIDDEN)
            self.act_fn = nn.SiLU()

        def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                    top_k_weights: torch.Tensor) -> torch.Tensor:  # the class's own loop ("eager")
            out = torch.zeros_like(hidden_states)
            first = self.gate_up_proj if has_gate else self.up_proj
            for e in range(self.num_experts):  # index num_experts: a dropped pair
                token, slot = torch.where(top_k_index == e)
                z = _linear(hidden_states[token], first[e], is_transposed)
                if has_bias:
                    z = z + (self.gate_up_proj_bias if has_gate else self.up_proj_bias)[e]
                z = _linear(self._apply_gate(z) if has_gate else self.act_fn(z), self.down_proj[e], is_transposed)
                z = z + self.down_proj_bias[e] if has_bias else z
                z = self.post_expert_norm(z) if has_post_expert_norm else z
                out = out.index_add(0, token, z * top_k_weights[token, slot, None])
            return out

    return Experts


def _linear(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x @ weight if transposed else x @ weight.T


class _MoEClassifier(nn.Module):
    """Tokens → embedding → a routed experts layer on the flattened tokens ``(B·T, H)`` → mean → classes. With
    ``drops`` the router has a column more, and a pair routed there is dropped; ``time_major`` flattens the
    tokens position first, ``(T·B, H)``, so that their rows do not come sample by sample."""

    def __init__(self, layout: dict, implementation: str, drops: bool = False, time_major: bool = False) -> None:
        super().__init__()
        self.time_major = time_major
        self.embed, self.head = nn.Embedding(9, _HIDDEN), nn.Linear(_HIDDEN, 3)
        self.router = nn.Linear(_HIDDEN, _EXPERTS + drops)
        self.experts = _experts(**layout)(types.SimpleNamespace(_experts_implementation=implementation))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).transpose(0, 1) if self.time_major else self.embed(ids)
        flat = h.reshape(-1, _HIDDEN)
        weights, index = self.router(flat).softmax(-1).topk(_TOP)
        y = self.experts(flat, index, weights).view_as(h)
        h, y = (h.transpose(0, 1), y.transpose(0, 1)) if self.time_major else (h, y)
        return self.head(torch.tanh(h + y).mean(1))


_LAYOUTS = {
    "mixtral": dict(has_gate=True, is_transposed=False, has_bias=False, has_post_expert_norm=False),
    "gpt-oss": dict(has_gate=True, is_transposed=True, has_bias=True, has_post_expert_norm=False),
    "nemotron": dict(has_gate=False, is_transposed=False, has_bias=False, has_post_expert_norm=False),
    "post-norm": dict(has_gate=True, is_transposed=False, has_bias=True, has_post_expert_norm=True),
}


def _model(layout: str, implementation: str, drops: bool = False, time_major: bool = False) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = _MoEClassifier(_LAYOUTS[layout], implementation, drops, time_major).double()
    return model, torch.randint(0, 9, (4, 5), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("structure", ["diag", "full", "layers"])
@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_each_layout_equals_the_dense_oracle_on_its_own_rule(layout: str, structure: str) -> None:
    model, ids = _model(layout, "batched_mm")
    backend, rules = assert_quietly_equals_dense(model, ids, structure)
    assert type(rules["experts"]).__name__ == "ExpertsRule" and not backend.moved and not backend.demoted


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_the_eager_loop_with_dropped_pairs_equals_the_dense_oracle(structure: str) -> None:
    model, ids = _model("mixtral", "eager", drops=True)
    with torch.no_grad():
        index = model.router(model.embed(ids).reshape(-1, _HIDDEN)).topk(_TOP).indices
    assert (index == _EXPERTS).any() and (index < _EXPERTS).any()  # some pairs dropped, some kept
    backend, rules = assert_quietly_equals_dense(model, ids, structure)
    assert type(rules["experts"]).__name__ == "ExpertsRule" and not backend.demoted


def test_rows_that_do_not_come_sample_by_sample_send_the_experts_to_the_module_above() -> None:
    """Tokens flattened position first: the experts' rows read folded would mix samples, so the check on the first
    batch moves their parameters (and the router's) to the whole model, which stays exact."""
    model, ids = _model("mixtral", "batched_mm", time_major=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func may loop the whole model
        got = torchfim.fisher(model, ids, structure="diag")
        backend, rules = module_rules(model, ids)
    assert "experts" not in rules and {"experts.gate_up_proj", "experts.down_proj"} <= set(backend.moved)
    want = torchfim.fisher(model, ids, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


def test_a_frozen_map_gets_no_tap_and_the_other_its_products() -> None:
    model, ids = _model("gpt-oss", "batched_mm")
    model.experts.down_proj.requires_grad_(False)
    model.experts.down_proj_bias.requires_grad_(False)
    backend, rules = assert_quietly_equals_dense(model, ids, "diag")
    assert rules["experts"].trained == [True, False]


def test_a_forward_that_computes_something_else_gives_way_to_the_generic_rule() -> None:
    """The rule records the module by its own formula: an experts class whose forward also scales the output
    is found by the coverage check (the recorded output is not the model's) and gets the generic rule."""
    model, ids = _model("mixtral", "batched_mm")
    base = type(model.experts)

    class Scaled(base):
        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return 2.0 * super().forward(*args)

    model.experts.__class__ = Scaled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func may not batch the module: it loops then
        got = torchfim.fisher(model, ids, structure="diag")
    backend, rules = module_rules(model, ids)
    assert type(rules["experts"]).__name__ == "GenericRule" and [type(m) for m in backend.demoted] == [Scaled]
    want = torchfim.fisher(model, ids, structure="diag", backend="functional")
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


class _DenseMoE(nn.Module):
    """Tokens → embedding → Llama 4's text experts on every token once per expert, scaled by a sigmoid router →
    mean → classes."""

    def __init__(self) -> None:
        super().__init__()
        config = T.Llama4TextConfig(hidden_size=_HIDDEN, intermediate_size=_INTER, num_local_experts=_EXPERTS)
        self.embed, self.router, self.head = nn.Embedding(9, _HIDDEN), nn.Linear(_HIDDEN, _EXPERTS), nn.Linear(_HIDDEN, 3)
        self.experts = T.models.llama4.modeling_llama4.Llama4TextExperts(config)
        nn.init.normal_(self.experts.gate_up_proj, std=0.5)
        nn.init.normal_(self.experts.down_proj, std=0.5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids)
        flat = h.reshape(-1, _HIDDEN)
        scores = torch.sigmoid(self.router(flat))  # (B·T, E)
        routed = flat.repeat(_EXPERTS, 1) * scores.T.reshape(-1, 1)  # (E·B·T, d), expert by expert
        y = self.experts(routed).view(_EXPERTS, *h.shape).sum(0)
        return self.head(torch.tanh(h + y).mean(1))


@pytest.mark.parametrize("structure", ["diag", "full", "layers"])
def test_llama4_dense_experts_equal_the_dense_oracle_on_their_own_rule(structure: str) -> None:
    torch.manual_seed(0)
    model, ids = _DenseMoE().double(), torch.randint(0, 9, (4, 5), generator=torch.Generator().manual_seed(1))
    backend, rules = assert_quietly_equals_dense(model, ids, structure)
    assert type(rules["experts"]).__name__ == "DenseExpertsRule" and not backend.moved and not backend.demoted


def test_expert_blocks_group_each_samples_pairs_by_expert() -> None:
    index = torch.tensor([[2, 0, 2, 3], [1, 1, 1, 0]])  # 3 experts; index 3 is dropped
    blocks, length = _expert_blocks(index, 3)
    assert length == 3  # sample 1 routes three pairs to expert 1
    assert blocks.tolist() == [[1, 4, 4, 4, 4, 4, 0, 2, 4], [3, 4, 4, 0, 1, 2, 4, 4, 4]]


_DECODER = dict(hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32, vocab_size=24,
                num_hidden_layers=1)
_HF = {
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(num_local_experts=3, num_experts_per_tok=2, **_DECODER)),
    "gpt_oss": lambda: T.GptOssForCausalLM(T.GptOssConfig(num_local_experts=3, num_experts_per_tok=2, head_dim=8,
                                                          layer_types=["full_attention"], **_DECODER)),
    "qwen2_moe": lambda: T.Qwen2MoeForCausalLM(T.Qwen2MoeConfig(num_experts=3, num_experts_per_tok=2,
                                                                moe_intermediate_size=8,
                                                                shared_expert_intermediate_size=16, **_DECODER)),
    # its router is a Linear subclass returning a tuple, whose Linear rule fails and gives way to the generic one
    "phimoe": lambda: T.PhimoeForCausalLM(T.PhimoeConfig(num_local_experts=3, num_experts_per_tok=2,
                                                         max_position_embeddings=64, **_DECODER)),
    "olmoe": lambda: T.OlmoeForCausalLM(T.OlmoeConfig(num_experts=3, num_experts_per_tok=2, **_DECODER)),
    # its experts take every token once per expert, scaled by the router's score: the dense experts' rule
    "llama4": lambda: T.Llama4ForCausalLM(T.Llama4TextConfig(
        intermediate_size=8, intermediate_size_mlp=32, num_local_experts=3, num_experts_per_tok=1, head_dim=8,
        interleave_moe_layer_step=1, no_rope_layers=[1], **{k: v for k, v in _DECODER.items() if k != "intermediate_size"})),
    "deepseek_v3": lambda: T.DeepseekV3ForCausalLM(T.DeepseekV3Config(
        n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=8,
        first_k_dense_replace=0, q_lora_rank=None, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4,
        v_head_dim=8, **_DECODER)),
}


@pytest.mark.parametrize("name", list(_HF))
def test_hugging_face_moe_models_keep_the_experts_rule_and_equal_the_autograd_oracle(name: str) -> None:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on the tiny configs
        model = _HF[name]().double().eval()
    model.config._experts_implementation = "eager"  # transformers' grouped product has no float64
    for param in model.parameters():  # the biases and router corrections start at zero
        if not param.any():
            nn.init.normal_(param, std=0.3)
    ids = {"input_ids": torch.randint(3, 24, (2, 5), generator=torch.Generator().manual_seed(1))}
    backend, rules = module_rules(model, ids, output=lambda out: out.logits)
    experts = {path: type(rule).__name__ for path, rule in rules.items() if path.endswith(".experts")}
    assert list(experts.values()) == ["DenseExpertsRule" if name == "llama4" else "ExpertsRule"] and not backend.moved
    routers = {"phimoe": ["PhimoeTopKRouter"], "llama4": ["Llama4Router"]}  # Linear subclasses returning tuples
    assert [type(m).__name__ for m in backend.demoted] == routers.get(name, [])
    got = torchfim.fisher(model, ids, structure="diag", output=lambda out: out.logits)
    want = clients.categorical_diag_by_autograd(model, ids)
    assert (got - want).abs().max() <= 1e-6 * want.abs().max()
