"""The report of a Hugging Face causal language model, with padding and labels, against a brute-force float64 oracle.

A 1-layer GPT-2 built from a config, right-padded inputs with their ``attention_mask`` (``mask="attention_mask"``)
and ``labels`` (-100 at the padding, shifted by the model's loss, so its last token is unscored): every first-order
number of report.json is the oracle's, from ``torch.func`` Jacobians of each input's logits alone, summed over the
observed positions ``U_i`` and averaged over the inputs (docs/math.md §5.5): ``Tr F = (1/n) Σ_i Σ_{t∈U_i}
tr(J_itᵀ Λ_it J_it)``, per parameter tensor and for the model; ``Var Tr Î1 = (1/n²) Σ_i Var(uᵀKu)`` with
``K = J Jᵀ`` over the observed positions (each position's own term by enumeration over the vocabulary, the cross
terms ``2 tr(Λ_t K_ts Λ_s K_st)``, §5.4); the empirical Fisher's trace with the shifted labels, each input's score
summed over its positions; and the observed positions per input.
"""

from __future__ import annotations

import hf_models
import pytest
import torch
from torch.func import functional_call, jacrev

from torchfim import report as report_mod
from torchfim.report import settings as report_settings

transformers = hf_models.transformers


def _model_and_batch() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=12, n_positions=8, bos_token_id=1,
                                     eos_token_id=1, attn_implementation="eager")
    model = transformers.GPT2LMHeadModel(config).double().eval()
    batch = hf_models.padded_batch([5, 3, 4, 2], seed=1, positions=False)
    batch["input_ids"] = torch.where(batch["attention_mask"] == 1, batch["input_ids"] % 10 + 2, 0)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model, batch


def _per_input(model, row: dict[str, torch.Tensor], labels: torch.Tensor, spans: list[slice]):
    """One input's ``(traces, Var(uᵀKu)s, empirical trace)``, per span of θ (the model first), over its observed
    positions: the attention mask's, less the last (the shifted labels score none there) and the -100 ones."""
    named = [(n, p) for n, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for _, p in named])

    def logits(th):
        params, start = {}, 0
        for name, p in named:
            params[name], start = th[start:start + p.numel()].view(p.shape), start + p.numel()
        return functional_call(model, params, (), row).logits[0]

    with torch.no_grad():
        o = logits(theta)
    J = jacrev(logits)(theta)  # (T, V, P)
    target = torch.cat([labels[1:], torch.tensor([-100])])
    seen = [t for t in range(o.shape[0]) if row["attention_mask"][0, t] and target[t] != -100]
    p = [torch.softmax(o[t], -1) for t in seen]
    lam = [torch.diag(q) - torch.outer(q, q) for q in p]
    eye = torch.eye(o.shape[1], dtype=torch.float64)
    score = sum(J[t].T @ (eye[target[t]] - q) for t, q in zip(seen, p))
    traces, variances = [], []
    for span in spans:
        Js = [J[t][:, span] for t in seen]
        traces.append(sum(float(((L @ j) * j).sum()) for L, j in zip(lam, Js)))
        var = 0.0
        for a, (qa, ja) in enumerate(zip(p, Js)):
            u = eye - qa  # row y: the score of label y
            form = torch.einsum("ya,ab,yb->y", u, ja @ ja.T, u)
            var += float((qa * form * form).sum() - (qa * form).sum() ** 2)
            for b, jb in enumerate(Js):
                if a != b:
                    K = ja @ jb.T
                    var += 2 * float(torch.trace(lam[a] @ K @ lam[b] @ K.T))
        variances.append(var)
    return traces, variances, float((score * score).sum()), len(seen)


def test_a_gpt2_report_with_padding_and_labels_is_the_float64_oracles(monkeypatch):
    monkeypatch.setattr(report_settings, "HESSIAN_BUDGET", 0)  # the first-order numbers (the sweep is slow)
    model, batch = _model_and_batch()
    R = report_mod.run_report(model, batch, out=None, progress=False, emit=None, mask="attention_mask", max_block=0,
                              score_only=False)["results"]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [layer["name"] for layer in R["layers"]] == names and "lm_head.weight" not in names  # tied to wte
    sizes = [p.numel() for p in model.parameters()]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    spans = [slice(0, sum(sizes))] + [slice(o, o + s) for o, s in zip(offsets, sizes)]
    n = batch["input_ids"].shape[0]
    rows = [{k: batch[k][i:i + 1] for k in ("input_ids", "attention_mask")} for i in range(n)]
    got = [_per_input(model, row, batch["labels"][i], spans) for i, row in enumerate(rows)]
    traces = [sum(g[0][j] for g in got) / n for j in range(len(spans))]
    variances = [sum(g[1][j] for g in got) / n**2 for j in range(len(spans))]
    assert R["outputs"]["observed_positions_per_input"] == pytest.approx(sum(g[3] for g in got) / n) == 10 / 4
    entries = [R["trace"]] + R["layers"]
    assert [e.get("trace_exact", e.get("exact")) for e in entries] == pytest.approx(traces, rel=1e-9, abs=1e-15)
    assert [e["var1_score_all_inputs"] for e in entries] == pytest.approx(variances, rel=1e-9, abs=1e-18)
    assert R["empirical"]["trace"] == pytest.approx(sum(g[2] for g in got) / n, rel=1e-9)
    stderr = R["trace"]["trace_score_stderr"]
    assert stderr == pytest.approx(variances[0] ** 0.5) and abs(R["trace"]["trace_score_estimate"] - traces[0]) < 5 * stderr
