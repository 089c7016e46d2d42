"""The report's rule for a layer whose Fisher is zero to precision (:mod:`torchfim.report.rounding`).

A review: a float64 ViT built from a Hugging Face config computes its softmax in float32, so its key bias (which
softmax ignores: its gradient is 0 for every input) came out Tr 1.06e-22, far above the old threshold ε²·Tr(F)
(1.4e-30), and the report gave it labels needed and a spectrum as data; in float32 the same threshold flagged a
genuine layer fed inputs scaled by 1e-9. The rule now compares each layer's score gradients in two precisions.
The oracles: the layers' Fisher traces by ``torch.func`` Jacobians in float64 (a tiny layer is data: the report's
value is the oracle's), and the key bias's exact gradient, 0 (the softmax of ``q·(k + b)`` is that of ``q·k``).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from torchfim import report as report_mod
from torchfim.families import get_family
from torchfim.report import settings as report_settings
from torchfim.report.assemble import _zero_to_precision
from torchfim.report.rounding import ROUNDING_DISAGREEMENT, rounding_disagreement

CATEGORICAL = {"family": get_family("categorical"), "mask": None, "class_dim": None}


class _Attention(nn.Module):
    """One attention head over the tokens of ``x`` ``(B, T, d)``, classified from their mean, plus a side layer
    fed the mean token scaled by 1e-9: its Fisher is ~1e-18 of the others', and exact (no terms cancel)."""

    def __init__(self, d: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out, self.side = nn.Linear(d, classes), nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scores = self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(x.shape[-1])
        h = torch.softmax(scores, -1) @ self.v(x)
        return self.out(h.mean(1)) + self.side(x.mean(1) * 1e-9)


def _oracle_traces(model: nn.Module, X: torch.Tensor) -> dict[str, float]:
    """Per parameter tensor, ``Tr F = (1/n) Σᵢ tr(Jᵢᵀ Λᵢ Jᵢ)`` (categorical), from float64 ``torch.func`` Jacobians."""
    model = model.double()
    params = {n: p.detach() for n, p in model.named_parameters()}
    traces = dict.fromkeys(params, 0.0)
    for x in X.double():
        J = jacrev(lambda p, x=x: functional_call(model, p, (x[None],))[0])(params)
        probs = torch.softmax(functional_call(model, params, (x[None],))[0], -1)
        lam = torch.diag(probs) - torch.outer(probs, probs)
        for n, j in J.items():
            j = j.reshape(j.shape[0], -1)
            traces[n] += float(torch.einsum("cp,cd,dp->", j, lam, j)) / X.shape[0]
    return traces


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_ignored_key_bias_is_flagged_and_tiny_real_layers_are_not(dtype):
    """The key bias is flagged (no labels needed, no spectrum); the query bias, and the side layer whose Fisher is
    ~1e-19 of Tr(F) (below ε² of float32, which flagged it), keep their numbers, the oracle's."""
    torch.manual_seed(0)
    model = _Attention().to(dtype)
    X = torch.randn(16, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    R = report_mod.compute_report(model, report_mod.Data(X.to(dtype), None, "test"), progress=False)
    by_name = {layer["name"]: layer for layer in R["layers"]}
    oracle = _oracle_traces(copy.deepcopy(model), X.to(dtype))
    assert abs(oracle["k.bias"]) < 1e-25  # the exact gradient is 0: what float64 leaves is rounding
    key = by_name["k.bias"]
    assert key["zero_to_precision"] and key["samples_needed"] == {"score": None, "hessian": None}
    assert key["spectrum"] is None
    rtol = 1e-4 if dtype == torch.float32 else 1e-9
    for name in ("q.bias", "q.weight", "side.weight", "side.bias"):
        layer = by_name[name]
        assert not layer["zero_to_precision"], name
        assert layer["spectrum"] is not None and layer["samples_needed"]["score"] is not None, name
        assert layer["trace_exact"] == pytest.approx(oracle[name], rel=rtol), name
    assert all(by_name[name]["rounding_disagreement"] < 1e-10 for name in ("q.bias", "q.weight", "side.weight"))
    assert key["rounding_disagreement"] > ROUNDING_DISAGREEMENT
    side = by_name["side.weight"]
    assert side["share_of_trace"] < 1e-17  # tiny, yet data
    if dtype == torch.float32:  # the old threshold, Tr ≤ ε²·Tr(F), would have called it rounding
        assert side["trace_exact"] <= torch.finfo(dtype).eps ** 2 * R["trace"]["exact"]


def _vit(dtype: torch.dtype) -> nn.Module:
    import hf_models

    transformers = hf_models.transformers
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=32, num_labels=3,
                                    attn_implementation="eager")
    return transformers.ViTForImageClassification(config).to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_vit_key_bias_is_rounding_though_far_above_eps_squared(dtype, monkeypatch):
    """The review's case: the ViT's softmax runs in float32 whatever the model's dtype, so in float64 its key bias's
    Tr is float32 rounding, ~1e8 times ε²·Tr(F), and was reported as data (k = 4 labels per input, a spectrum). It is
    flagged; the two precisions' gradients disagree on it (d ~ 0.5: the shared float32 softmax makes part of the
    rounding the same in both) and on no other layer (d ~ 1e-14), the query bias at ~1e-8 of Tr(F) included."""
    monkeypatch.setattr(report_settings, "HESSIAN_BUDGET", 0)  # Î2's variances skipped: seconds, not a minute
    model = _vit(dtype)
    X = torch.randn(8, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).to(dtype)
    R = report_mod.compute_report(model, report_mod.Data(X, None, "test"), progress=False, max_block=20,
                                  score_only=False)
    by_name = {layer["name"]: layer for layer in R["layers"]}
    key, query = by_name["vit.layers.0.attention.k_proj.bias"], by_name["vit.layers.0.attention.q_proj.bias"]
    assert key["zero_to_precision"] and key["samples_needed"]["score"] is None and key["spectrum"] is None
    assert not query["zero_to_precision"] and query["samples_needed"]["score"] is not None
    assert query["spectrum"] is not None and query["share_of_trace"] > 1e-10
    assert [layer["name"] for layer in R["layers"] if layer["zero_to_precision"]] == [key["name"]]
    assert key["rounding_disagreement"] > ROUNDING_DISAGREEMENT
    assert all(layer["rounding_disagreement"] < 1e-10 for layer in R["layers"] if layer is not key)
    if dtype == torch.float64:  # the old rule, Tr ≤ ε²·Tr(F), let it through
        assert key["trace_exact"] > 1e4 * torch.finfo(dtype).eps ** 2 * R["trace"]["exact"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bert_key_biases_are_rounding_and_its_other_layers_data(dtype):
    """BERT's softmax follows the model's dtype: its key biases' gradients disagree wholly between the precisions
    (d ≈ 1), every other layer agrees to float32's precision."""
    import hf_models

    model = hf_models.tiny_bert().to(dtype)
    batch = hf_models.padded_batch([5, 3, 4, 5, 2, 5], seed=0)
    names = [n for n, _ in model.named_parameters()]
    d = rounding_disagreement(model, batch, CATEGORICAL, names)
    keys = [n for n in names if n.endswith("attention.self.key.bias")]
    assert len(keys) == 2 and all(d[n] > 0.9 for n in keys)
    assert all(d[n] < 1e-10 for n in names if n not in keys)


def test_the_rule_without_the_check_and_for_gradients_exactly_zero():
    """Where the check could not run, the old threshold Tr ≤ ε²·Tr(F); where a layer's gradients were exactly 0 on
    the inputs checked (d None), zero where its Tr is (a layer used only by other inputs keeps its numbers)."""
    eps = torch.finfo(torch.float64).eps
    assert _zero_to_precision(1e-33, 1.0, None, False, eps) and not _zero_to_precision(1e-30, 1.0, None, False, eps)
    assert _zero_to_precision(0.0, 1.0, None, True, eps) and not _zero_to_precision(1e-40, 1.0, None, True, eps)
    assert _zero_to_precision(1.0, 2.0, 0.5, True, eps) and not _zero_to_precision(1e-40, 2.0, 1e-3, True, eps)
    assert not _zero_to_precision(0.0, 0.0, 1.0, True, eps)  # no Fisher at all: nothing to compare with
