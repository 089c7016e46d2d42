"""``Var(Tr Î1)`` where ``E[(uᵀKu)²]`` and ``(tr ΛK)²`` nearly cancel, against cancellation-free references.

For a ``Linear(2, C)`` head ``K = JJᵀ = (‖x‖² + 1)·I`` exactly. Families with independent outputs then have
``Var[uᵀKu] = (‖x‖² + 1)²(2 tr Λ² + Σ_a κ₄,aaaa)`` (every term positive for Poisson), and the matrix Fisher, whose
labels have ``‖vec R‖² = 3``, ``Var[uᵀKu] = 4(‖x‖² + 1)² mᵀΛm`` (``m = E[vec R]``). Formed as the difference of the two
moments, the first lost about ``log₁₀(C/2)`` digits and the second every digit near the uniform law.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfim
from torchfim.families.matrix_fisher_normaliser import matrix_fisher_moments

X = torch.tensor([[0.5, -1.0], [1.0, 0.25]], dtype=torch.float64)


def _head(c: int, bias: float, dtype: torch.dtype, weight: torch.Tensor | None = None) -> nn.Module:
    head = nn.Linear(2, c).to(dtype)
    with torch.no_grad():
        head.weight.copy_(torch.zeros(c, 2) if weight is None else weight)
        head.bias.fill_(bias)
    return head


def _mean_over_inputs(per_input: list[float]) -> float:
    return sum(per_input) / len(per_input) ** 2


@pytest.mark.parametrize(("family", "before"), [("poisson", 3.0e-4), ("gamma", 2.4e-4)])
def test_many_independent_outputs_keep_float32_digits(family: str, before: float) -> None:
    """3000 outputs of log-rate (Poisson) or log-shape (gamma) 5: 3.0e-4 and 2.4e-4 off in float32 before; now within
    float32's summation over the outputs (measured 3.1e-6 and 8.0e-6)."""
    c = 3000
    want = torchfim.fisher_variance(_head(c, 5.0, torch.float64), X, family=family, estimator="score",
                                    structure="trace")
    if family == "poisson":  # the closed form, independently
        lam = torch.full((c,), 5.0, dtype=torch.float64).exp()
        exact = _mean_over_inputs([float((x.square().sum() + 1) ** 2 * (2 * lam**2 + lam).sum()) for x in X])
        assert float(want) == pytest.approx(exact, rel=1e-13)
    got = torchfim.fisher_variance(_head(c, 5.0, torch.float32), X.float(), family=family, estimator="score",
                                   structure="trace")
    assert abs(float(got) / float(want) - 1) < before / 20


@pytest.mark.parametrize("scale", [1e-2, 1e-3, 1e-4])
def test_matrix_fisher_near_the_uniform_law(scale: float) -> None:
    """A ``Linear(2, 9)`` head whose outputs are ``scale``·O(1): in float32 the trace variance was 0.4% off at 1e-2,
    1.4 relative error at 1e-3 and 23 times too large at 1e-4 (float64: 9e-8 at 1e-4)."""
    weight = torch.linspace(-1.0, 1.0, 18, dtype=torch.float64).reshape(9, 2) * scale
    head = _head(9, 0.0, torch.float64, weight)
    with torch.no_grad():
        head.bias.copy_(torch.linspace(0.5, -0.5, 9, dtype=torch.float64) * scale)
    per_input = []
    for x in X:
        moments = matrix_fisher_moments(head(x.unsqueeze(0)).detach(), 2)
        m, cov = moments.mean[0], moments.cov[0]
        per_input.append(float(4 * (x.square().sum() + 1) ** 2 * (m @ cov @ m)))
    want = _mean_over_inputs(per_input)
    for dtype, rtol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        model = _head(9, 0.0, dtype, weight.to(dtype))
        with torch.no_grad():
            model.bias.copy_(head.bias.to(dtype))
        got = torchfim.fisher_variance(model, X.to(dtype), family="matrix_fisher", estimator="score",
                                       structure="trace")
        reference = want if dtype == torch.float64 else _rounded_reference(model)
        assert float(got) == pytest.approx(reference, rel=rtol), dtype


def _rounded_reference(model: nn.Module) -> float:
    """The float64 reference on the float32 model's own (rounded) weights and inputs."""
    wide = _head(9, 0.0, torch.float64, model.weight.detach().double())
    with torch.no_grad():
        wide.bias.copy_(model.bias.double())
    per_input = []
    for x in X.float().double():
        moments = matrix_fisher_moments(wide(x.unsqueeze(0)).detach(), 2)
        m, cov = moments.mean[0], moments.cov[0]
        per_input.append(float(4 * (x.square().sum() + 1) ** 2 * (m @ cov @ m)))
    return _mean_over_inputs(per_input)


@pytest.mark.parametrize("family", ["heteroscedastic_gaussian", "gamma"])
def test_hessian_bound_of_a_precise_paired_output_is_finite(family: str) -> None:
    """The paired families' ``λ_max(Λ)`` squared ``(a − c)/2`` (a precision of 5e21 at log-variance −50; a shape of
    5e21 at log-shape 50): inf in float32, and the Î2 bound of a linear head, 0, came out NaN (refused)."""
    head = _head(2, 0.0, torch.float32)
    with torch.no_grad():
        head.bias[1] = -50.0 if family == "heteroscedastic_gaussian" else 50.0
    bound = torchfim.variance_bound(head, X.float() / 4096, family=family, estimator="hessian", structure="trace")
    assert float(bound) == 0.0


@pytest.mark.parametrize("family", ["poisson", "gamma", "heteroscedastic_gaussian", "matrix_fisher"])
def test_the_cancellation_free_forms_equal_the_difference_of_moments_where_it_is_accurate(family: str) -> None:
    """Any symmetric ``K`` (not a multiple of the identity: every term of the matrix Fisher's form is in play) at
    ordinary outputs, float64: each family's ``score_quadratic_spread`` equals ``E[(uᵀKu)²] − (tr ΛK)²`` as the base
    class forms it, which is accurate there."""
    from torchfim.families import Family, get_family

    fam = get_family(family)
    g = torch.Generator().manual_seed(11)
    width = 9 if family == "matrix_fisher" else 6
    o = torch.randn(3, width, generator=g, dtype=torch.float64) * (0.8 if family == "matrix_fisher" else 0.5)
    root = torch.randn(3, width, width, generator=g, dtype=torch.float64)
    k = root @ root.transpose(1, 2)
    got = fam.score_quadratic_spread(o, k)
    want = Family.score_quadratic_spread(fam, o, k)
    assert bool((want > 0).all())
    torch.testing.assert_close(got, want, rtol=1e-11, atol=0.0)
