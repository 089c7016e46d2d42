"""Var(Î1) where the fourth moment and the squared Fisher nearly cancel: a Bernoulli model near p = ½ (with and
without positions, every structure) against labels enumerated in 40 digits (mpmath), near-uniform categorical
models against a centred float64 enumeration, and a wide Gaussian model's closed form, in float32 and float64.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import Tensor, nn

import torchfim


@pytest.mark.parametrize("logit", [0.0, 1e-9, 1e-6, 1e-3, 0.5])
def test_bernoulli_score_variance_near_one_half_against_mpmath(logit):
    """Var(Î1) of a Bernoulli model whose every logit is ``b``, against the two labels enumerated in 40
    digits: Σᵢ E[(g_p g_q)²] − (Λ J_p J_q)² over n², g = uJ. Near p = ½ that difference is
    Λ tanh²(b/2) j_p² j_q², far below Λ²: before, it cancelled (−1.4e-17 at b = 1e-9, where it is 6e-20)."""
    import mpmath

    mpmath.mp.dps = 40
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(logit)
    x = torch.randn(4, 3, dtype=torch.float64)
    jac = [[mpmath.mpf(float(v)) for v in row] + [mpmath.mpf(1)] for row in x]  # ∂o/∂(weight, bias)
    p = 1 / (1 + mpmath.exp(-mpmath.mpf(logit)))
    lam, n, size = p * (1 - p), len(jac), 4
    want = mpmath.matrix(size, size)
    trace = mpmath.mpf(0)
    for j in jac:
        for label, weight in ((1, p), (0, 1 - p)):
            g = [(label - p) * v for v in j]
            trace += weight * sum(v**2 for v in g) ** 2
            for a in range(size):
                for b in range(size):
                    want[a, b] += weight * (g[a] * g[b]) ** 2
        trace -= (lam * sum(v**2 for v in j)) ** 2
        for a in range(size):
            for b in range(size):
                want[a, b] -= (lam * j[a] * j[b]) ** 2
    want = torch.tensor([[float(want[a, b] / n**2) for b in range(size)] for a in range(size)], dtype=torch.float64)
    got = {s: torchfim.fisher_variance(model, x, family="bernoulli", estimator="score", structure=s)
           for s in ("full", "diag", "trace", "blocks")}
    scale = 1e-13 * float(want.abs().max())  # exact zeros at b = 0
    assert torch.allclose(got["full"], want, rtol=1e-12, atol=scale)
    assert torch.allclose(got["diag"], torch.diagonal(want), rtol=1e-12, atol=scale)
    assert math.isclose(float(got["trace"]), float(trace / n**2), rel_tol=1e-12, abs_tol=scale)
    weight = got["blocks"]["weight"].reshape(3, 3)
    assert torch.allclose(weight, want[:3, :3], rtol=1e-12, atol=scale)
    assert all(bool((v >= 0).all()) for v in (got["diag"], got["trace"]))


def _positions_near_one_half(logit: float) -> tuple[nn.Module, Tensor, Tensor]:
    """A Bernoulli model of every logit ``logit`` over 3 inputs of 3 positions, its inputs, and a mask keeping one
    position of the first input and all of the others."""
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.fill_(logit)
    x = torch.randn(3, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))  # (n, T, features)
    mask = torch.ones(3, 3, dtype=torch.bool)
    mask[0, 1:] = False
    return model, x, mask


@pytest.mark.parametrize("logit", [0.0, 1e-9, 1e-3])
def test_bernoulli_positions_score_variance_near_one_half_against_mpmath(logit):
    """The diagonal and trace Var(Î1) of a Bernoulli model with 3 positions per input, a mask keeping one position of the first
    input and all of the others, every logit ``b``: against the 2³ label sequences enumerated in 40 digits. Per input
    ``Var[(Σ_t u_t J_t)²]``; an input with one observed position has Λ tanh²(b/2) J⁴ (0 at b = 0). Before, the
    positions' fourth moment minus ``(Σ_t Λ J_t²)²`` cancelled to rounding: −3.3e-16 at b = 1e-9 for the first
    input alone, where it is 3.6e-19, and 6.9e-18 at b = 0, where it is 0; the trace's −1.6e-15 at b = 1e-9, where it
    is 1.1e-18."""
    import itertools

    import mpmath

    mpmath.mp.dps = 40
    model, x, mask = _positions_near_one_half(logit)
    x[1, 0] *= 1e-6  # a position whose terms the next one dwarfs: their pair is summed, no difference taken
    mask[1, 2] = False
    p = 1 / (1 + mpmath.exp(-mpmath.mpf(logit)))
    want, want_trace, second_input = [mpmath.mpf(0)] * 4, mpmath.mpf(0), None
    for i in range(3):
        jac = [[mpmath.mpf(float(v)) for v in x[i, t]] + [mpmath.mpf(1)] for t in range(3) if mask[i, t]]
        moments = [[mpmath.mpf(0)] * 2 for _ in range(5)]  # E[s], E[s²] of s = g_a² (a < 4) and s = ‖g‖²
        for labels in itertools.product((0, 1), repeat=len(jac)):
            weight = mpmath.fprod(p if y else 1 - p for y in labels)
            g = [sum((y - p) * j[a] for y, j in zip(labels, jac)) for a in range(4)]
            for m, square in zip(moments, [v**2 for v in g] + [sum(v**2 for v in g)]):
                m[0], m[1] = m[0] + weight * square, m[1] + weight * square**2
        want = [w + (m[1] - m[0] ** 2) / 9 for w, m in zip(want, moments)]
        if i == 1:  # 4 X₀X₁ + each position's own, X₀ 1e-12 of X₁ on the weight's entries
            second_input = torch.tensor([float(m[1] - m[0] ** 2) for m in moments[:4]], dtype=torch.float64)
        want_trace += (moments[4][1] - moments[4][0] ** 2) / 9
    got = {s: torchfim.fisher_variance(model, x, family="bernoulli", estimator="score", structure=s, mask=mask)
           for s in ("diag", "trace")}
    assert torch.allclose(got["diag"], torch.tensor([float(v) for v in want], dtype=torch.float64), rtol=1e-12, atol=0)
    assert math.isclose(float(got["trace"]), float(want_trace), rel_tol=1e-12)
    two = torchfim.fisher_variance(model, x[1:2], family="bernoulli", estimator="score", structure="diag",
                                   mask=mask[1:2])
    assert torch.allclose(two, second_input, rtol=1e-12, atol=0)
    for structure in ("diag", "trace"):
        alone = torchfim.fisher_variance(model, x[:1], family="bernoulli", estimator="score", structure=structure,
                                         mask=mask[:1])
        assert bool((alone == 0).all()) if logit == 0 else bool((alone > 0).all())


@pytest.mark.parametrize("logit", [0.0, 1e-9, 1e-3])
def test_bernoulli_positions_dense_score_variance_near_one_half_against_mpmath(logit):
    """``full`` and ``blocks`` Var(Î1) of the model of the test above, every pair of parameters: against the label
    sequences enumerated in 40 digits, ``Var[(Σ_t u_t J_ta)(Σ_t u_t J_tb)]`` per input. Before, the positions' pairwise
    fourth moment minus the squared Fisher cancelled to rounding: in float64 the entries of the input with one observed
    position came out at 1e-16 of the fourth moment where they are 0 (b = 0), and a float32 model near p = ½ had
    negative variances and diagonal entries 34 times its own ``diag``'s."""
    import itertools

    import mpmath

    mpmath.mp.dps = 40
    model, x, mask = _positions_near_one_half(logit)
    p = 1 / (1 + mpmath.exp(-mpmath.mpf(logit)))
    want = [[mpmath.mpf(0)] * 4 for _ in range(4)]
    for i in range(3):
        jac = [[mpmath.mpf(float(v)) for v in x[i, t]] + [mpmath.mpf(1)] for t in range(3) if mask[i, t]]
        for labels in itertools.product((0, 1), repeat=len(jac)):
            weight = mpmath.fprod(p if y else 1 - p for y in labels)
            g = [sum((y - p) * j[a] for y, j in zip(labels, jac)) for a in range(4)]
            for a, b in itertools.product(range(4), repeat=2):
                want[a][b] += weight * (g[a] * g[b]) ** 2 / 9
        means = [[sum(mpmath.fprod(p if y else 1 - p for y in labels)
                      * sum((y - p) * j[a] for y, j in zip(labels, jac)) * sum((y - p) * j[b] for y, j in zip(labels, jac))
                      for labels in itertools.product((0, 1), repeat=len(jac))) for b in range(4)] for a in range(4)]
        for a, b in itertools.product(range(4), repeat=2):
            want[a][b] -= means[a][b] ** 2 / 9
    want = torch.tensor([[float(v) for v in row] for row in want], dtype=torch.float64)
    got = torchfim.fisher_variance(model, x, family="bernoulli", estimator="score", structure="full", mask=mask)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)
    blocks = torchfim.fisher_variance(model, x, family="bernoulli", estimator="score", structure="blocks", mask=mask)
    assert torch.allclose(blocks["weight"], want[:3, :3], rtol=1e-12, atol=0)
    alone = torchfim.fisher_variance(model, x[:1], family="bernoulli", estimator="score", structure="full",
                                     mask=mask[:1])
    assert bool((alone == 0).all()) if logit == 0 else bool((alone > 0).all())


def test_bernoulli_positions_dense_score_variance_in_float32_near_one_half():
    """A float32 Bernoulli model with logits near 0 and one observed position per input: its ``full`` Var(Î1) has the
    diagonal of its own ``diag`` (float32 rounding) and no negative entry (before: −1.1e-25 beside entries of 4e-27)."""
    torch.manual_seed(0)
    model = nn.Linear(3, 1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-4)  # logits of order 1e-4
    x = torch.randn(6, 4, 3)
    mask = torch.zeros(6, 4, dtype=torch.bool)
    mask[:, 0] = True
    full = torchfim.fisher_variance(model, x, family="bernoulli", estimator="score", structure="full", mask=mask)
    diag = torchfim.fisher_variance(model, x, family="bernoulli", estimator="score", structure="diag", mask=mask)
    assert bool((full >= 0).all())
    assert torch.allclose(torch.diagonal(full), diag, rtol=1e-5, atol=0)


def _centred_score_variance_oracle(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 ``Var(Î1)`` (P×P, one label per input) and ``Var(Tr Î1)`` of a categorical model, by enumeration over
    the labels with the variances centred (``Σ_y p_y (X_y − E X)²``), which stays accurate where they are small."""
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    x = x.double()
    n = len(x)
    full, trace = 0.0, 0.0
    for i in range(n):
        logits = torch.func.functional_call(model.double(), params, (x[i : i + 1],))[0]
        probs = torch.softmax(logits, -1)

        def log_p(ps, y, i=i):
            return torch.log_softmax(torch.func.functional_call(model, ps, (x[i : i + 1],))[0], -1)[y]

        scores = torch.stack([torch.cat([g.reshape(-1) for g in torch.func.grad(log_p)(params, y).values()])
                              for y in range(len(probs))])  # (C, P)
        outer = scores.unsqueeze(-1) * scores.unsqueeze(-2)  # (C, P, P)
        mean = (probs.reshape(-1, 1, 1) * outer).sum(0)
        full = full + (probs.reshape(-1, 1, 1) * (outer - mean) ** 2).sum(0) / n**2
        squares = scores.square().sum(-1)
        trace = trace + (probs * (squares - (probs * squares).sum()) ** 2).sum() / n**2
    return full, trace


@pytest.mark.parametrize("classes", [2, 3])
def test_categorical_score_variances_near_uniform_predictions(classes):
    """A linear classifier whose logits are of order 1e-4 (near uniform predictions: at initialisation, or a head
    initialised at zero), in float32 and float64, against a centred float64 enumeration. Before, with two classes the
    fourth moment minus the squared Fisher cancelled (as for the Bernoulli family): in float32 the trace's variance was
    −2.6e-8 where it is 4.4e-9, ``full`` had negative entries and ``diag`` was 2.4 times too large; with three
    classes the trace's variance, ``E[(uᵀKu)²] − (tr ΛK)²``, was 18 times too large in float32."""
    torch.manual_seed(0)
    model = nn.Linear(3, classes).double()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1e-4)
    x = torch.randn(6, 3, dtype=torch.float64)
    want_full, want_trace = _centred_score_variance_oracle(model, x)
    for dtype, rtol in ((torch.float64, 1e-8), (torch.float32, 1e-2)):
        m, xs = copy.deepcopy(model).to(dtype), x.to(dtype)
        got = {s: torchfim.fisher_variance(m, xs, estimator="score", structure=s).double()
               for s in ("full", "diag", "trace")}
        assert float(got["trace"]) == pytest.approx(float(want_trace), rel=rtol)
        if classes == 2:  # the entries' variances of three classes are not small here: the trace's is
            assert torch.allclose(got["full"], want_full, rtol=rtol, atol=0)
            assert torch.allclose(got["diag"], torch.diagonal(want_full), rtol=rtol, atol=0)


class Alternating(nn.Module):
    """Four logits ``z·(1, −1, 1, −1) + 1e-3·Ax`` with ``z`` a small linear map: near uniform predictions where the
    scores ``s_y = v_y − pᵀv`` of the parameters of ``z`` have nearly the same size for every class, so that
    ``Var_y[s_y²]`` is tiny beside ``E[s_y⁴]``: the one way three or more classes cancel."""

    def __init__(self) -> None:
        super().__init__()
        self.z = nn.Linear(3, 1)
        self.register_buffer("pattern", torch.tensor([1.0, -1.0, 1.0, -1.0]))
        self.register_buffer("mix", torch.randn(3, 4))
        with torch.no_grad():
            self.z.weight.mul_(1e-2)
            self.z.bias.mul_(1e-2)

    def forward(self, x: Tensor) -> Tensor:
        return self.z(x) * self.pattern + 1e-3 * x @ self.mix


def test_categorical_score_variances_of_four_classes_that_cancel():
    """:class:`Alternating` in float32 and float64 against a centred float64 enumeration of the same (rounded) model:
    the entries' variances as the difference of ``E[s⁴]`` and ``(E[s²])²`` were 13% off in float32 (``diag``) and 47%
    (``full``), and 1.5e-10 in float64; the entries where that difference cancels are now formed centred."""
    torch.manual_seed(0)
    model, x = Alternating(), torch.randn(6, 3)
    for dtype, rtol in ((torch.float64, 1e-11), (torch.float32, 1e-5)):
        m = copy.deepcopy(model).to(dtype)
        want_full, _ = _centred_score_variance_oracle(copy.deepcopy(m), x.to(dtype))
        got = {s: torchfim.fisher_variance(m, x.to(dtype), estimator="score", structure=s).double()
               for s in ("full", "diag")}
        assert torch.allclose(got["full"], want_full, rtol=rtol, atol=0)
        assert torch.allclose(got["diag"], torch.diagonal(want_full), rtol=rtol, atol=0)


def test_gaussian_score_variances_in_closed_form_keep_float32_digits():
    """Var(Tr Î1) of a Gaussian model with 2000 outputs, float32 against float64: ``2λ²‖K‖²`` in closed form keeps
    float32's digits (9e-8 relative); as ``(tr ΛK)² + 2 tr(ΛKΛK) − (tr ΛK)²`` it lost about C/2 of them (2e-5).
    ``diag`` and ``full`` of the same model agree with float64 to float32 rounding too."""
    torch.manual_seed(0)
    model, x = nn.Linear(3, 2000).double(), torch.randn(5, 3, dtype=torch.float64)
    small = copy.deepcopy(model).float()
    for structure, rtol in (("trace", 1e-6), ("diag", 1e-5)):
        want = torchfim.fisher_variance(model, x, family="gaussian", estimator="score", structure=structure)
        got = torchfim.fisher_variance(small, x.float(), family="gaussian", estimator="score", structure=structure)
        assert torch.allclose(got.double(), want, rtol=rtol, atol=0), structure
    head = nn.Linear(3, 40).double()
    want = torchfim.fisher_variance(head, x, family="gaussian", estimator="score", structure="full")
    got = torchfim.fisher_variance(copy.deepcopy(head).float(), x.float(), family="gaussian", estimator="score",
                                   structure="full")
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
