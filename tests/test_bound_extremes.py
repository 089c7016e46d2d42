"""The Î1 variance bounds where every score lies on a line (one logit; two classes) near p = ½, against the bounds'
definitions evaluated in 60 digits (mpmath): ``λ‖j_p‖²‖j_q‖² − (j_pᵀΛj_q)²`` per input and entry, and for the trace
``λ‖G‖² − (tr ΛG)²`` (Frobenius norm: spectral; spectral norm: kurtosis). Near p = ½ these differences are far below
either term (the variance, ``Λ tanh²(o/2)`` times a square, vanishes there), and in float64 they cancelled: bounds of
−1.7e-17 on a variance of 1.6e-21 at logit 1e-8, 2e-4 below it at 1e-6.
"""

from __future__ import annotations

import mpmath
import pytest
import torch
from torch import nn

import torchfim

_LOGITS = [1e-8, 1e-6, 1e-4, 0.3]


def _model(classes: int, logit: float, mixed: bool = False) -> tuple[nn.Module, torch.Tensor]:
    """A linear head whose logits are ``(logit, 0)`` (two classes) or ``logit`` (one), up to 1e-12, and 3 inputs;
    ``mixed``: two classes, followed by a fixed mixing matrix, so that the output gram ``JJᵀ`` is not diagonal."""
    torch.manual_seed(0)
    head = nn.Linear(2, classes).double()
    with torch.no_grad():
        head.weight.normal_().mul_(1e-12)
        head.bias.zero_()[0] = logit
    model = head
    if mixed:
        mix = nn.Linear(2, 2, bias=False).double().requires_grad_(False)
        with torch.no_grad():
            mix.weight.copy_(torch.tensor([[1.0, 0.3], [-0.2, 1.0]]))
        model = nn.Sequential(head, mix)
    return model, torch.randn(3, 2, dtype=torch.float64)


def _oracle(model: nn.Module, x: torch.Tensor) -> dict[str, object]:
    """The spectral bounds on the full matrix and both trace bounds (one label per input), in 60 digits."""
    mpmath.mp.dps = 60
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(params)
    jac = torch.cat([j.reshape(j.shape[0], j.shape[1], -1) for j in jac.values()], -1)  # (n, C, P)
    with torch.no_grad():
        logits = model(x)
    n, classes, size = jac.shape
    entries = mpmath.matrix(size, size)
    spectral = kurtosis = smaller = mpmath.mpf(0)
    for ji, oi in zip(jac.tolist(), logits.tolist()):
        d = mpmath.mpf(oi[0]) - (mpmath.mpf(oi[1]) if classes == 2 else 0)
        p = 1 / (1 + mpmath.exp(-d))
        second = p * (1 - p)  # E[s²], s = y − p of the Bernoulli of logit d
        e = [mpmath.mpf(1), mpmath.mpf(-1)][:classes]  # u = s e
        lam = second * (1 - 3 * second) * sum(v**2 for v in e) ** 2  # λ_max(M) = E‖u‖⁴ = E[s⁴]‖e‖⁴
        cols = [[mpmath.mpf(ji[a][k]) for a in range(classes)] for k in range(size)]  # the columns of J

        along = [sum(a * b for a, b in zip(col, e)) for col in cols]  # j_pᵀe: j_pᵀΛj_q = E[s²](j_pᵀe)(j_qᵀe)
        for p_ in range(size):
            for q_ in range(size):
                entries[p_, q_] += (lam * sum(v**2 for v in cols[p_]) * sum(v**2 for v in cols[q_])
                                    - (second * along[p_] * along[q_]) ** 2)
        gram = mpmath.matrix([[sum(cols[k][a] * cols[k][b] for k in range(size)) for b in range(classes)]
                              for a in range(classes)])
        trace = second * sum(e[a] * gram[a, b] * e[b] for a in range(classes) for b in range(classes))
        frobenius = sum(gram[a, b] ** 2 for a in range(classes) for b in range(classes))
        top = max(mpmath.eigsy(gram)[0])
        spectral += lam * frobenius - trace**2
        kurtosis += lam * top**2 - trace**2
        smaller += min(lam * frobenius, lam * top**2) - trace**2  # variance_bound: each input's smaller term
    as_float = torch.tensor([[float(entries[a, b] / n**2) for b in range(size)] for a in range(size)],
                            dtype=torch.float64)
    return {"full": as_float, "spectral": float(spectral / n**2), "kurtosis": float(kurtosis / n**2),
            "smaller": float(smaller / n**2)}


@pytest.mark.parametrize("classes, mixed", [(1, False), (2, False), (2, True)])
@pytest.mark.parametrize("logit", _LOGITS)
def test_score_bounds_on_a_score_line_near_one_half_against_mpmath(classes: int, mixed: bool, logit: float) -> None:
    family = "bernoulli" if classes == 1 else "categorical"
    model, x = _model(classes, logit, mixed)
    want = _oracle(model, x)
    full = torchfim.score_variance_bound_spectral(model, x, family, "full")
    diag = torchfim.variance_bound(model, x, family, "score", "diag")
    blocks = torchfim.score_variance_bound_spectral(model, x, family, "blocks")
    blocks = blocks.get("weight", blocks.get("0.weight"))
    assert torch.allclose(full, want["full"], rtol=1e-9, atol=0)
    assert torch.allclose(diag, torch.diagonal(want["full"]), rtol=1e-9, atol=0)
    assert torch.allclose(blocks, want["full"][: 2 * classes, : 2 * classes], rtol=1e-9, atol=0)
    traces = {"spectral": torchfim.score_variance_bound_spectral(model, x, family, "trace"),
              "kurtosis": torchfim.score_variance_bound_kurtosis(model, x, family, "trace"),
              "smaller": torchfim.variance_bound(model, x, family, "score", "trace")}
    for name, got in traces.items():
        assert float(got) == pytest.approx(want[name], rel=1e-9, abs=0), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("structure", ["diag", "trace", "full"])
def test_score_bounds_near_one_half_stay_at_the_variance_or_above(dtype: torch.dtype, structure: str) -> None:
    """One logit at 1e-8: the bound equals the variance (``C = 1``) up to the rounding of the result, never below it
    by more, and is never negative (before: −1.7e-17 on a variance of 1.6e-21 in float64, −3.5e-17 in float32)."""
    model, x = _model(1, 1e-8)
    model = model.to(dtype)
    x = x.to(dtype)
    variance = torchfim.fisher_variance(model, x, "bernoulli", "score", structure).double()
    bound = torchfim.variance_bound(model, x, "bernoulli", "score", structure).double()
    assert bool((bound >= 0).all())
    assert bool((bound >= variance * (1 - 8 * torch.finfo(dtype).eps)).all())


def _positions_model(logit: float, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """Four one-logit positions per input at logits ``logit·(1, ½, 2, 1.5)`` (up to 1e-12), outputs (B, 4, 1)."""
    torch.manual_seed(0)
    head = nn.Linear(2, 4).to(dtype)
    with torch.no_grad():
        head.weight.normal_().mul_(1e-12)
        head.bias.copy_(logit * torch.tensor([1.0, 0.5, 2.0, 1.5]))
    return nn.Sequential(head, nn.Unflatten(1, (4, 1))), torch.randn(3, 2, dtype=dtype)


def _positions_trace_oracle(model: nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """``Var(Tr Î1)``, its spectral bound ``Σᵢ λ_max(Mᵢ)‖Gᵢ‖² − (tr ΛᵢGᵢ)²`` over n² (``M`` of independent Bernoulli
    scores, in 60 digits) and the scale of the bound's terms ``Σᵢ λ_max(Mᵢ)‖Gᵢ‖²/n²``."""
    mpmath.mp.dps = 60
    model = model.double()
    params = dict(model.named_parameters())
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x.double(),)))(params)
    jac = torch.cat([j.reshape(j.shape[0], 4, -1) for j in jac.values()], -1)  # (n, L, P)
    with torch.no_grad():
        logits = model(x.double())[..., 0]
    variance = bound = scale = mpmath.mpf(0)
    for ji, oi in zip(jac.tolist(), logits.tolist()):
        lam = [1 / (1 + mpmath.exp(-mpmath.mpf(v))) * (1 / (1 + mpmath.exp(mpmath.mpf(v)))) for v in oi]
        cumulant = [v * (1 - 6 * v) for v in lam]  # κ₄ = E[u⁴] − 3Λ² = Λ(1 − 3Λ) − 3Λ²
        gram = [[sum(mpmath.mpf(a) * mpmath.mpf(b) for a, b in zip(ji[s], ji[t])) for t in range(4)] for s in range(4)]
        # λ_max(M): on diagonal X, M acts as N = ΛΛᵀ + diag(Var(u_s²)) (Var(u²) = 2Λ² + κ₄), whose top eigenvalue is
        # at least ‖Λ‖² ≥ 2Λ_sΛ_t, M's eigenvalue on E_st + E_ts; M vanishes on antisymmetric X.
        spread = mpmath.matrix([[lam[s] * lam[t] + (s == t) * (2 * lam[s] ** 2 + cumulant[s]) for t in range(4)]
                                for s in range(4)])
        top = max(mpmath.eigsy(spread)[0])
        frobenius = sum(gram[s][t] ** 2 for s in range(4) for t in range(4))
        trace = sum(lam[s] * gram[s][s] for s in range(4))
        # Var[uᵀGu] of independent scores: 2 Σ_{s,t} Λ_sΛ_t G_st² + Σ_s κ₄_s G_ss²
        variance += 2 * sum(lam[s] * lam[t] * gram[s][t] ** 2 for s in range(4) for t in range(4)) + sum(
            cumulant[s] * gram[s][s] ** 2 for s in range(4))
        bound += top * frobenius - trace**2
        scale += top * frobenius
    n2 = len(x) ** 2
    return float(variance / n2), float(bound / n2), float(scale / n2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("logit", [1e-8, 1e-6, 1e-4])
def test_trace_bound_of_positions_near_one_half_stays_at_the_variance_or_above(logit: float, dtype) -> None:
    """Independent one-logit positions near p = ½: the spectral trace bound is tight (it equals the variance at equal
    logits), and its two terms near 1/16 cancelled: 0 on a variance of 5e-17 at logit 1e-8, 2.4e-4 below it at 1e-6.
    Now never below the variance, and within the rounding of its terms of the bound in 60 digits."""
    model, x = _positions_model(logit, dtype)
    variance, bound, scale = _positions_trace_oracle(model, x)
    model, x = _positions_model(logit, dtype)
    got = float(torchfim.score_variance_bound_spectral(model, x, "bernoulli", "trace"))
    smaller = float(torchfim.variance_bound(model, x, "bernoulli", "score", "trace"))
    eps = torch.finfo(dtype).eps
    for value in (got, smaller):
        assert value >= variance * (1 - 64 * eps)
    assert abs(got - bound) <= 1e-14 * scale + 64 * eps * bound
