"""The trace variances per parameter tensor in one pass (``torchfim/trace_summary.py``) against brute force.

The float64 oracle of ``tests/test_engine_oracles.py`` (full Jacobians, reverse-over-reverse Hessians
of each input's flat outputs, the output Fisher ``Λᵢ`` of its observed positions and the enumerated
fourth moments ``M4ᵢ`` of the output score) gives per parameter tensor ``t`` its output gram
``G_t = J_t J_tᵀ`` and its Hessian traces ``d_t``. For ``t`` alone:
``Var(Tr Î1) = (1/n²) Σᵢ (M4ᵢ[G_t, G_t] − (tr Λᵢ G_t)²)``, ``Var(Tr Î2) = (1/n²) Σᵢ d_tᵀ Λᵢ d_t`` and
its bound ``(1/n²) Σᵢ λ_max(Λᵢ) ‖d_t‖²`` (``d_t`` over the observed positions); the model's are those of the sums
over tensors. The Î1 bounds are checked against ``variance_bound`` with only ``t`` trainable.
"""

from __future__ import annotations

import pytest
import torch
from cases import Case
from test_engine_oracles import BACKENDS, IDS, PAIRS, N, _close, _kwargs, _oracle

import torchfim
from torchfim.engine import backend as engine_backend
from torchfim.trace_summary import hessian_trace_variances, score_trace_variances


def _score_variance(res: dict, gram: torch.Tensor) -> torch.Tensor:
    fisher_trace = torch.einsum("nab,nba->n", res["output_fisher"], gram)
    return (torch.einsum("nabcd,nab,ncd->", res["m4"], gram, gram) - fisher_trace.square().sum()) / N**2


def _hessian_variance_and_bound(res: dict, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The bound's ``‖d‖²`` is over the observed output numbers (``res["mask"]``'s positions)."""
    lam = res["output_fisher"]
    top = torch.linalg.eigvalsh(lam)[:, -1]
    observed = res["mask"].repeat_interleave(d.shape[1] // res["mask"].shape[1], dim=1)
    bound = (top * torch.where(observed, d, 0.0).square().sum(-1)).sum() / N**2
    return torch.einsum("na,nab,nb->", d, lam, d) / N**2, bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_trace_variances_per_tensor_equal_the_oracle(case: Case, family: str, backend: str) -> None:
    res = _oracle(case, family)
    kw = dict(backend=backend, **_kwargs(case, res))
    score = score_trace_variances(res["model"], res["x"], family, bounds=False, **kw)
    hessian = hessian_trace_variances(res["model"], res["x"], family, **kw)
    assert score.bound is None and score.tensor_bounds is None
    assert sorted(score.tensor_variances) == sorted(hessian.tensor_variances) == sorted(res["output_grams"])
    _close(score.variance, res["var_score_trace"], 1e-8)
    _close(hessian.variance, res["var_hessian_trace"], 1e-8)
    _close(hessian.diag_variance, torch.diagonal(res["var_hessian"]), 1e-8)
    _close(hessian.bound, _hessian_variance_and_bound(res, sum(res["hessian_traces"].values()))[1], 1e-8)
    for name, gram in res["output_grams"].items():
        _close(score.tensor_variances[name], _score_variance(res, gram), 1e-8)
        variance, bound = _hessian_variance_and_bound(res, res["hessian_traces"][name])
        _close(hessian.tensor_variances[name], variance, 1e-8)
        _close(hessian.tensor_bounds[name], bound, 1e-8)


def test_one_pass_gives_what_the_public_functions_give_tensor_by_tensor(monkeypatch) -> None:
    """``fisher_variance`` and ``variance_bound`` (structure ``trace``, the model and each tensor alone,
    and ``diag`` for Î2) agree with the summaries, which sweep the output-Hessian diagonals once where the
    public calls sweep once each."""
    case, family = next((c, f) for c, f in PAIRS if c.name == "tanh_mlp" and f == "categorical")
    model, x = case.build(3), case.inputs(6)
    sweeps: list[int] = []
    original = engine_backend.Backend.output_hessian_sweep

    def counting(self, *args, **kwargs):
        sweeps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(engine_backend.Backend, "output_hessian_sweep", counting)
    summaries = {"score": score_trace_variances(model, x, family), "hessian": hessian_trace_variances(model, x, family)}
    assert len(sweeps) == 1
    params = dict(model.named_parameters())
    for estimator, got in summaries.items():
        kw = dict(family=family, estimator=estimator, structure="trace")
        torch.testing.assert_close(got.variance, torchfim.fisher_variance(model, x, **kw))
        torch.testing.assert_close(got.bound, torchfim.variance_bound(model, x, **kw))
        for name in params:
            for p_name, p in params.items():
                p.requires_grad_(p_name == name)
            torch.testing.assert_close(got.tensor_variances[name], torchfim.fisher_variance(model, x, **kw))
            torch.testing.assert_close(got.tensor_bounds[name], torchfim.variance_bound(model, x, **kw))
        for p in params.values():
            p.requires_grad_(True)
    torch.testing.assert_close(summaries["hessian"].diag_variance,
                               torchfim.fisher_variance(model, x, family=family, estimator="hessian"))
    assert len(sweeps) == 1 + 3 + 2 * len(params)


def test_an_unknown_backend_is_refused_by_name() -> None:
    model, x = torch.nn.Linear(3, 2), torch.randn(4, 3)
    for summary in (score_trace_variances, hessian_trace_variances):
        with pytest.raises(torchfim.TorchfimError, match="unknown backend 'bogus'"):
            summary(model, x, backend="bogus")


def test_the_score_trace_bound_takes_the_model_gram_alone(monkeypatch) -> None:
    """variance_bound(score, trace) forms the two bounds' terms of the model's output gram once per mini-batch, and
    none of the per-tensor terms or the exact variance that the report's summary adds (it formed all three for every
    tensor, and took 1.8-2.6× as long as two separate passes in a user trial); its value is the sum over inputs of
    each input's smaller bound, computed apart (it was the smaller of the two sums, a looser bound: a review)."""
    from torchfim import variance as variance_module

    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(12, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    modes: list[str] = []
    original = variance_module.ScoreVariance.trace_terms

    def counting(self, *args, **kwargs):
        modes.append(self.mode)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(variance_module.ScoreVariance, "trace_terms", counting)
    bound = torchfim.variance_bound(model, [x[:5], x[5:]], structure="trace")
    assert sorted(modes) == ["kurtosis", "kurtosis", "spectral", "spectral"]  # two mini-batches, the model's gram
    monkeypatch.undo()
    # each input's smaller term (the bounds of one input alone, times 1/n²): never above the smaller of the sums
    apart = sum(torch.minimum(torchfim.score_variance_bound_spectral(model, x[i : i + 1], structure="trace"),
                              torchfim.score_variance_bound_kurtosis(model, x[i : i + 1], structure="trace"))
                for i in range(len(x))) / len(x) ** 2
    torch.testing.assert_close(bound, apart, rtol=1e-12, atol=0)
    assert bound <= torch.minimum(torchfim.score_variance_bound_spectral(model, x, structure="trace"),
                                  torchfim.score_variance_bound_kurtosis(model, x, structure="trace"))
