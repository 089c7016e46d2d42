"""``nn.MultiheadAttention`` with q, k and v weights of their own (``kdim``, ``vdim`` ≠ ``embed_dim``) on the
attention rule, against the dense float64 oracle.

The rule's products are the packed projection's block by block: ``∂/∂W_q = Σ_l δ_{q,l} x_{q,l}ᵀ`` with each
block's own input and weight, the bias packed as before (docs/math.md §6.3b). Before, such a module went to the
generic rule (exact, and slower).
"""

from __future__ import annotations

import pytest
import torch
from engine_checks import assert_equals_dense, assert_matches_functional, assert_quietly_equals_dense, module_rules
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.engine.modules.attention import AttentionRule


class _CrossAttend(nn.Module):
    """Queries from the first 4 features, keys (3 features) and values (5) from others; mean-pooled head."""

    def __init__(self, batch_first: bool, mask: str, bias: bool) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, batch_first=batch_first, bias=bias)
        self.batch_first, self.mask = batch_first, mask
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x[..., :4], torch.tanh(x[..., 3:6]), x[..., 1:6] * 0.5
        if not self.batch_first:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        kwargs: dict = {"need_weights": self.mask == "weights"}
        if self.mask == "padding":
            kwargs["key_padding_mask"] = (x[:, :, 0] > 0.3) & (torch.arange(x.shape[1]) > 0)
        z = self.attn(q, k, v, **kwargs)[0]
        z = z if self.batch_first else z.transpose(0, 1)
        return self.head(z.tanh().mean(1))


CASES = {"batch-first": (True, "none", True), "sequence-first-padding": (False, "padding", True),
         "no-bias": (True, "none", False), "weights-asked": (True, "weights", True)}


def _model(case: str, frozen: str | None = None) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(2)
    model = _CrossAttend(*CASES[case]).double().eval()
    if frozen:
        getattr(model.attn, frozen).requires_grad_(False)
    return model, torch.randn(5, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("structure", ["diag", "blocks", "full"])
@pytest.mark.parametrize("case", list(CASES))
def test_separate_projections_keep_the_attention_rule_and_equal_the_dense_oracle(case: str, structure: str) -> None:
    backend, rules = assert_quietly_equals_dense(*_model(case), structure)
    assert isinstance(rules["attn"], AttentionRule) and not backend.moved and not backend.demoted


@pytest.mark.parametrize("frozen", ["k_proj_weight", "in_proj_bias", "q_proj_weight"])
def test_a_frozen_block_leaves_the_others_on_the_rule(frozen: str) -> None:
    model, x = _model("batch-first", frozen)
    for structure in ("diag", "blocks"):
        assert_equals_dense(torchfim.fisher(model, x, structure=structure), exact_fisher(model, x, "categorical"),
                            model, structure)
    assert isinstance(module_rules(model, x)[1]["attn"], AttentionRule)


@pytest.mark.parametrize("estimator", ["score", "hessian"])
def test_separate_projections_give_the_whole_model_backends_estimators(estimator: str) -> None:
    model, x = _model("sequence-first-padding")
    assert_matches_functional(model, x, estimator, torch.randint(0, 3, (len(x),)))
