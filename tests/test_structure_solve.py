"""``Structure.solve(v, damping)``: ``(A + λI)⁻¹ v`` against torch's dense solve of the kept matrix in float64, and the
refusals of a matrix with no inverse, each with a damping that works."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import torch

import torchfim
from torchfim.errors import TorchfimError


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).double()


def _inputs(n: int = 40) -> torch.Tensor:
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _structure(model: torch.nn.Module, structure: str, **kwargs: object):
    return torchfim.as_structure(torchfim.fisher(model, _inputs(), structure=structure, **kwargs), model)


@pytest.mark.parametrize("structure", ["full", "blocks", "diag"])
@pytest.mark.parametrize("columns", [None, 4])
def test_solve_matches_the_dense_solve_of_the_kept_matrix(structure: str, columns: int | None) -> None:
    model = _model()
    s = _structure(model, structure)
    p = s.layout.num_params
    shape = (p,) if columns is None else (p, columns)
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = 1e-2
    expected = torch.linalg.solve(s.to_dense() + lam * torch.eye(p, dtype=torch.float64), v)
    got = s.solve(v, damping=lam)
    assert got.shape == v.shape
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(s.mv(got) + lam * got, v, rtol=1e-10, atol=1e-12)


def test_blocks_solve_each_parameter_tensor_on_its_own() -> None:
    model = _model()
    s = _structure(model, "blocks")
    v = torch.randn(s.layout.num_params, dtype=torch.float64)
    got = s.solve(v, damping=0.1)
    for i, name in enumerate(s.layout.names):
        block = s.block(name) + 0.1 * torch.eye(s.layout.sizes[i], dtype=torch.float64)
        torch.testing.assert_close(got[s.layout.span(i)], torch.linalg.solve(block, v[s.layout.span(i)]))


def test_undamped_solve_of_a_full_rank_fisher_is_its_inverse() -> None:
    """A Gaussian head's Fisher with many inputs and one hidden unit's worth of parameters has full rank."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
    s = torchfim.as_structure(torchfim.fisher(model, _inputs(), family="gaussian", structure="full"), model)
    v = torch.randn(s.layout.num_params, dtype=torch.float64)
    torch.testing.assert_close(s.solve(v), torch.linalg.inv(s.to_dense()) @ v, rtol=1e-9, atol=1e-12)


def _suggested(message: str) -> float:
    return float(re.search(r"e\.g\. ([0-9.e+-]+)", message).group(1))


def test_a_singular_softmax_fisher_is_refused_without_damping_and_the_suggested_damping_works() -> None:
    model = _model()
    s = _structure(model, "full")  # a softmax's Fisher is singular: one logit shift per input is free
    v = torch.randn(s.layout.num_params, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"the matrix plus damping=0 is not positive definite.*softmax") as caught:
        s.solve(v)
    lam = _suggested(str(caught.value))
    expected = torch.linalg.solve(s.to_dense() + lam * torch.eye(len(v), dtype=torch.float64), v)
    torch.testing.assert_close(s.solve(v, damping=lam), expected, rtol=1e-9, atol=1e-12)


def test_an_indefinite_hessian_estimate_is_refused_naming_the_damping_it_needs() -> None:
    model = _model()
    s = _structure(model, "full", estimator="hessian", n_samples=1, generator=torch.Generator().manual_seed(3))
    lowest = float(torch.linalg.eigvalsh(s.to_dense())[0])
    assert lowest < -1e-3  # the test needs a clearly indefinite estimate
    v = torch.ones(s.layout.num_params, dtype=torch.float64)
    with pytest.raises(TorchfimError, match="negative eigenvalues") as caught:
        s.solve(v, damping=-lowest / 2)
    need = float(re.search(r"pass damping > ([0-9.e+-]+)", str(caught.value)).group(1))
    assert need == pytest.approx(-lowest, rel=1e-2)
    x = s.solve(v, damping=_suggested(str(caught.value)))
    torch.testing.assert_close(s.mv(x) + _suggested(str(caught.value)) * x, v)


def test_a_numerically_singular_factorisation_is_refused() -> None:
    """A rank-one matrix plus a damping of rounding size (below P·eps of its norm) factors with pivots of rounding
    size: refused; a damping above it is not."""
    layout = _structure(_model(), "full").layout
    u = torch.randn(layout.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    s = torchfim.as_structure(torch.outer(u, u), _model())
    with pytest.raises(TorchfimError, match=r"numerically singular in float64 \(condition number above 1/\(P·eps\)"):
        s.solve(u, damping=1e-16 * float(u @ u))
    s.solve(u, damping=1e-6 * float(u @ u))


def test_a_diagonal_with_zero_entries_names_the_parameter() -> None:
    model = _model()
    diag = torchfim.fisher(model, _inputs(), structure="diag").clone()
    s = torchfim.as_structure(diag, model)
    span = s.layout.span(s.layout.index("2.bias"))
    diag[span] = 0.0
    with pytest.raises(TorchfimError, match=r"3 of the \d+ diagonal entries.*'2\.bias'.*does not act on the outputs; pass damping > 0, "):
        s.solve(torch.ones(len(diag), dtype=torch.float64))
    diag[span] = -0.5
    with pytest.raises(TorchfimError, match=r"negative entries.*damping > 0\.5"):
        s.solve(torch.ones(len(diag), dtype=torch.float64), damping=0.25)
    x = s.solve(torch.ones(len(diag), dtype=torch.float64), damping=1.0)
    torch.testing.assert_close(x[span], torch.full((3,), 2.0, dtype=torch.float64))


def test_a_trace_has_no_solve() -> None:
    model = _model()
    s = _structure(model, "trace")
    with pytest.raises(TorchfimError, match=r"solve\(\) needs structure='diag', 'blocks' or 'full'"):
        s.solve(torch.ones(s.layout.num_params, dtype=torch.float64), damping=1.0)


@pytest.mark.parametrize("damping", [-1e-3, float("inf"), float("nan"), "0.1", None, torch.ones(2)])
def test_bad_damping_is_refused(damping: object) -> None:
    s = _structure(_model(), "diag")
    said = "damping is one number λ" if isinstance(damping, torch.Tensor) else "damping must be a finite number ≥ 0"
    with pytest.raises(TorchfimError, match=said):
        s.solve(torch.ones(s.layout.num_params, dtype=torch.float64), damping=damping)


def test_a_vector_of_another_length_is_refused_naming_solve() -> None:
    s = _structure(_model(), "full")
    with pytest.raises(TorchfimError, match=rf"solve takes a vector of shape \({s.layout.num_params},\)"):
        s.solve(torch.ones(3, dtype=torch.float64), damping=1.0)
    with pytest.raises(TorchfimError, match=r"got dict \(tensors by parameter name go in through layout\.flatten"):
        s.solve(dict(_model().named_parameters()), damping=1.0)


def test_solve_leaves_the_result_it_shares_unchanged() -> None:
    model = _model()
    result = torchfim.fisher(model, _inputs(), structure="full")
    before = result.clone()
    torchfim.as_structure(result, model).solve(torch.ones(len(result), dtype=torch.float64), damping=0.5)
    assert torch.equal(result, before)


def _blocks_of(model: torch.nn.Module, blocks: dict[str, torch.Tensor]):
    return torchfim.as_structure(blocks, model)


def test_blocks_that_fail_are_named_once_with_a_damping_for_all_of_them() -> None:
    """Two indefinite blocks (a review): the first refusal's damping was refused again for the second block. Now one
    refusal names the block that needs the most, and its damping (and the suggested one) solves every block."""
    model = torch.nn.Linear(2, 2).double()  # blocks 'weight' (4×4) and 'bias' (2×2)
    w, b = torch.diag(torch.tensor([1.0, -0.01, 2.0, 3.0], dtype=torch.float64)), torch.diag(
        torch.tensor([1.0, -5.0], dtype=torch.float64))
    s = _blocks_of(model, {"weight": w, "bias": b})
    v = torch.ones(6, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"the block of 'bias' plus damping=0 is not positive definite \(2 blocks "
                                            r"need damping.*smallest eigenvalue is -5.*pass damping > 5, ") as caught:
        s.solve(v)
    need = float(re.search(r"pass damping > ([0-9.e+-]+)", str(caught.value)).group(1))
    for lam in (need * (1 + 1e-9), _suggested(str(caught.value))):
        x = s.solve(v, damping=lam)
        torch.testing.assert_close(s.mv(x) + lam * x, v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_damping_named_is_rounded_up_so_that_passing_it_works(dtype: torch.dtype) -> None:
    """``pass damping > 0.123`` for an eigenvalue −0.123456 (a review) was refused again at 0.1234: the threshold
    printed is rounded up, and passing it (or the suggestion) solves, for a full matrix and a diagonal."""
    model = torch.nn.Linear(1, 2).double()  # P = 4
    values = torch.tensor([1.0, -0.123456, 2.0, 0.5], dtype=dtype)
    for result in (torch.diag(values), values):
        s = torchfim.as_structure(result, model)
        v = torch.ones(4, dtype=dtype)
        with pytest.raises(TorchfimError, match=r"pass damping > 0\.124, ") as caught:
            s.solve(v, damping=0.1234)
        for lam in (0.124, _suggested(str(caught.value))):
            x = s.solve(v, damping=lam)
            torch.testing.assert_close(s.mv(x) + lam * x, v, check_dtype=False, rtol=1e-5, atol=1e-5)


def test_non_finite_entries_are_refused_by_name() -> None:
    model = _model()
    for structure in ("full", "diag"):
        result = torchfim.fisher(model, _inputs(), structure=structure).clone()
        result.view(-1)[3] = float("nan")
        with pytest.raises(TorchfimError, match="holds NaN or infinite entries"):
            torchfim.as_structure(result, model).solve(torch.ones(result.shape[0], dtype=torch.float64), damping=1.0)


def test_float32_solves_to_its_precision_and_names_the_float64_copy() -> None:
    """A float32 Fisher: the solve is float32's (relative residual about κ·eps), and a refusal names the float64
    copy."""
    model = _model().float()
    s = torchfim.as_structure(torchfim.fisher(model, _inputs().float(), structure="full"), model)
    v = torch.randn(s.layout.num_params, generator=torch.Generator().manual_seed(4))
    lam = 1e-2
    x = s.solve(v, damping=lam)
    assert x.dtype == torch.float32
    assert float((s.mv(x) + lam * x - v).norm() / v.norm()) < 1e-4
    with pytest.raises(TorchfimError, match=r"or use a float64 copy: as_structure\(result\.double\(\), model\)\.solve\(\.\.\.\)"):
        s.solve(v)


def test_a_float32_blocks_refusal_names_a_float64_copy_that_runs() -> None:
    """The float64 copy a refusal of float32 blocks names is one a dict of blocks can make (``result.double()`` was
    named, which a dict has not), and it solves with a quarter of the damping float32 needs."""
    model = _model().float()
    blocks = torchfim.fisher(model, _inputs().float(), structure="blocks")
    s = torchfim.as_structure(blocks, model)
    v = torch.ones(s.layout.num_params)
    with pytest.raises(TorchfimError) as caught:
        s.solve(v)
    said = "as_structure({name: block.double() for name, block in result.items()}, model).solve(...)"
    assert said in str(caught.value)
    lam = float(re.search(r"pass damping > ([0-9.e+-]+)", str(caught.value)).group(1)) / 4
    wide = torchfim.as_structure({name: block.double() for name, block in blocks.items()}, model)
    x = wide.solve(v.double(), damping=lam)
    torch.testing.assert_close(wide.mv(x) + lam * x, v.double())


def test_an_indefinite_float32_estimate_names_no_float64_copy() -> None:
    """Eigenvalues below 0 beyond rounding stay there in float64: the refusal names only the damping."""
    model = _model().float()
    s = torchfim.as_structure(torchfim.fisher(model, _inputs().float(), structure="full", estimator="hessian",
                                              n_samples=1, generator=torch.Generator().manual_seed(3)), model)
    assert float(torch.linalg.eigvalsh(s.to_dense())[0]) < -1e-3
    with pytest.raises(TorchfimError, match="negative eigenvalues") as caught:
        s.solve(torch.ones(s.layout.num_params))
    assert "float64" not in str(caught.value)


def test_a_diagonal_entry_that_overflows_the_solve_is_refused_by_name() -> None:
    """A float32 diagonal entry of 1e-39 gave an infinite entry without a word, where Full refuses the same matrix."""
    model = _model().float()
    diag = torchfim.fisher(model, _inputs().float(), structure="diag").clone()
    s = torchfim.as_structure(diag, model)
    diag[s.layout.span(s.layout.index("2.weight")).start + 1] = 1e-39
    with pytest.raises(TorchfimError, match=r"overflowed float32 \(the first entry in '2\.weight', where d \+ λ = "
                                            r"1e-39\); pass a damping, e\.g\. .*or solve a float64 copy"):
        s.solve(torch.ones(len(diag)))
    assert bool(torch.isfinite(torchfim.as_structure(diag.double(), model).solve(torch.ones(len(diag)).double())).all())


@pytest.mark.parametrize("damping", [torch.tensor([0.5]), np.array([0.5]), [0.5], (0.5,), np.float32(0.5)],
                         ids=["tensor", "array", "list", "tuple", "numpy number"])
def test_a_damping_of_one_entry_is_that_number(damping: object) -> None:
    """laplace-torch's ``prior_precision`` is a tensor of shape (1,): it was refused as 'not a finite number ≥ 0'."""
    s = _structure(_model(), "full")
    v = torch.ones(s.layout.num_params, dtype=torch.float64)
    torch.testing.assert_close(s.solve(v, damping=damping), s.solve(v, damping=0.5))
    assert float(s.logdet(damping)) == float(s.logdet(0.5))


@pytest.mark.parametrize("negative_zero", [-0.0, np.float64(-0.0), torch.tensor(-0.0), torch.tensor([-0.0])],
                         ids=["float", "numpy", "tensor", "one-entry tensor"])
def test_a_damping_of_minus_zero_is_zero_and_reads_so(negative_zero: object) -> None:
    """``damping=-0.0`` is accepted as +0.0 is: the refusal of a singular matrix read "plus damping=-0" before."""
    from torchfim.damped_solve import check_damping

    assert math.copysign(1.0, check_damping(negative_zero)) == 1.0
    model = _model()
    diag = torchfim.fisher(model, _inputs(), structure="diag").clone()
    diag[0] = 0.0
    for s in (torchfim.as_structure(diag, model), torchfim.as_structure(torch.diag(diag), model)):
        v = torch.ones(len(diag), dtype=torch.float64)
        for verb in (lambda d, s=s, v=v: s.solve(v, damping=d), lambda d, s=s: s.logdet(damping=d)):
            with pytest.raises(TorchfimError) as zero:
                verb(0.0)
            with pytest.raises(TorchfimError) as minus_zero:
                verb(negative_zero)
            assert str(minus_zero.value) == str(zero.value) and "plus damping=0 " in str(zero.value)


@pytest.mark.parametrize("kind", [list, np.array, torch.tensor])
def test_a_damping_per_parameter_is_refused_by_its_shape_alone(kind) -> None:
    """A list of P values had no per-parameter hint and printed all of them (500,000 characters at P = 10⁵)."""
    s = _structure(_model(), "diag")
    p = s.layout.num_params
    with pytest.raises(TorchfimError, match=rf"damping is one number λ \(A \+ λI\), got an? \w+ of shape \({p},\); for a "
                                            "prior precision per parameter") as caught:
        s.solve(torch.ones(p, dtype=torch.float64), damping=kind([0.1] * p))
    assert len(str(caught.value)) < 400


def test_a_trace_refuses_solve_for_what_it_keeps_whatever_the_vector() -> None:
    """A vector of the wrong length was refused for its length first; the length fixed, the trace refused it again."""
    s = _structure(_model(), "trace")
    with pytest.raises(TorchfimError, match=r"solve\(\) needs structure='diag', 'blocks' or 'full'"):
        s.solve(torch.ones(3, dtype=torch.float64), damping=1.0)


@pytest.mark.parametrize("structure", ["full", "blocks"])
@pytest.mark.parametrize("verb", ["solve", "logdet"])
def test_an_asymmetric_matrix_is_refused_not_solved_from_one_triangle(structure: str, verb: str) -> None:
    """Cholesky reads the lower triangle only: A = Fisher + an upper-triangular term was solved (and its logdet
    taken) as the Fisher alone, a relative error of 1.0 in a review, without a word."""
    model = _model()
    result = torchfim.fisher(model, _inputs(), structure=structure)
    if structure == "full":
        result = result + torch.triu(torch.ones_like(result), 1)
    else:
        result = {name: block + torch.triu(torch.ones_like(block), 1) for name, block in result.items()}
    s = torchfim.as_structure(result, model)
    v = torch.ones(s.layout.num_params, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=rf"{verb}: .* is not symmetric \(A − Aᵀ reaches 1,.*\(A \+ A\.T\) / 2"):
        s.solve(v, 0.1) if verb == "solve" else s.logdet(0.1)


@pytest.mark.parametrize("estimator", ["score", "hessian"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_sampled_estimate_asymmetric_by_its_rounding_still_solves(estimator: str, dtype: torch.dtype) -> None:
    model = _model().to(dtype)
    full = torchfim.fisher(model, _inputs().to(dtype), estimator=estimator, structure="full", n_samples=3,
                           generator=torch.Generator().manual_seed(0))
    s = torchfim.as_structure(full, model)
    v = torch.ones(s.layout.num_params, dtype=dtype)
    damping = 10 * float(torch.linalg.eigvalsh(full.double()).abs().max())  # positive definite, Î2 included
    expected = torch.linalg.solve(full.double() + damping * torch.eye(len(v), dtype=torch.float64), v.double())
    torch.testing.assert_close(s.solve(v, damping).double(), expected, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=0)


def test_a_subnormal_diagonal_is_refused_with_a_damping_that_works() -> None:
    """A float64 diagonal of 1e-320 (subnormal) made the refusal itself fail: rounding the suggested damping up to 3
    digits divided by 10⁻³²⁵, which is 0 (ZeroDivisionError)."""
    model = _model()
    s = torchfim.as_structure(torch.full((_structure(model, "diag").layout.num_params,), 1e-320,
                                         dtype=torch.float64), model)
    v = torch.ones(s.layout.num_params, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"overflowed float64 .* pass a damping, e\.g\. ") as caught:
        s.solve(v)
    suggested = float(re.search(r"e\.g\. ([0-9.e+-]+)", str(caught.value)).group(1))
    assert bool(torch.isfinite(s.solve(v, suggested)).all())


@pytest.mark.parametrize("structure", ["full", "blocks", "diag"])
@pytest.mark.parametrize("damping", [1e39, 1e300])
def test_a_damping_beyond_float32s_range_is_refused_as_that(structure: str, damping: float) -> None:
    """A damping above float32's largest number (3.4e38) overflowed ``A + λI``: ``full`` and ``blocks`` called the
    matrix "not positive definite" and asked for a damping above 1e-6 (one of 1e39 had been passed), and ``diag``'s
    logdet was +inf without a word. The refusal names the overflow, and the float64 copy gives the oracle's numbers."""
    model = _model().float()
    result = torchfim.fisher(model, _inputs().float(), structure=structure)
    s = torchfim.as_structure(result, model)
    v = torch.ones(s.layout.num_params)
    for verb, call in (("solve", lambda: s.solve(v, damping)), ("logdet", lambda: s.logdet(damping))):
        said = re.escape(f"{verb}: damping={damping:g} overflows float32")
        with pytest.raises(TorchfimError, match=said + r" .*largest number float32 holds is 3\.4e\+38.*float64 copy") \
                as caught:
            call()
        assert "positive definite" not in str(caught.value)
    wide = torchfim.as_structure({k: b.double() for k, b in result.items()} if isinstance(result, dict)
                                 else result.double(), model)
    dense = wide.to_dense() + damping * torch.eye(len(v), dtype=torch.float64)
    torch.testing.assert_close(wide.solve(v.double(), damping), torch.linalg.solve(dense, v.double()), rtol=1e-12,
                               atol=0)
    assert float(wide.logdet(damping)) == pytest.approx(float(torch.linalg.slogdet(dense)[1]), rel=1e-12)
