"""``Structure.logdet(damping)``: ``log det(A + λI)`` against torch's ``slogdet`` of the kept dense matrix in float64,
and the refusals of a matrix that is not positive definite (the same as ``solve``'s, with a damping that works)."""

from __future__ import annotations

import re

import pytest
import torch
from test_structure_solve import _inputs, _model, _structure

import torchfim
from torchfim.errors import TorchfimError


def _dense_logdet(s, lam: float) -> torch.Tensor:
    sign, value = torch.linalg.slogdet(s.to_dense() + lam * torch.eye(s.layout.num_params, dtype=torch.float64))
    assert sign == 1
    return value


@pytest.mark.parametrize("structure", ["full", "blocks", "diag"])
def test_logdet_matches_the_dense_slogdet_of_the_kept_matrix(structure: str) -> None:
    s = _structure(_model(), structure)
    got = s.logdet(damping=1e-2)
    assert got.shape == () and got.dtype == torch.float64
    torch.testing.assert_close(got, _dense_logdet(s, 1e-2), rtol=1e-12, atol=1e-10)


def test_blocks_logdet_is_the_sum_of_its_blocks_and_below_the_full_matrixs_bound() -> None:
    """Fischer's inequality: a positive definite matrix's determinant is at most its diagonal blocks' product."""
    model = _model()
    blocks, full = _structure(model, "blocks"), _structure(model, "full")
    lam = 1e-2
    by_block = sum(torch.linalg.slogdet(blocks.block(n) + lam * torch.eye(len(blocks.block(n)), dtype=torch.float64))[1]
                   for n in blocks.layout.names)
    torch.testing.assert_close(blocks.logdet(lam), by_block, rtol=1e-12, atol=1e-10)
    assert full.logdet(lam) <= blocks.logdet(lam) <= _structure(model, "diag").logdet(lam)


def test_an_undamped_full_rank_fisher_has_its_own_logdet() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh(), torch.nn.Linear(2, 2)).double()
    s = torchfim.as_structure(torchfim.fisher(model, _inputs(), family="gaussian", structure="full"), model)
    torch.testing.assert_close(s.logdet(), torch.logdet(s.to_dense()), rtol=1e-10, atol=1e-10)


def test_a_singular_fisher_is_refused_and_the_suggested_damping_works() -> None:
    s = _structure(_model(), "full")  # a softmax's Fisher is singular
    with pytest.raises(TorchfimError, match=r"^logdet: the matrix plus damping=0 is not positive definite.*softmax") \
            as caught:
        s.logdet()
    lam = float(re.search(r"e\.g\. ([0-9.e+-]+)", str(caught.value)).group(1))
    torch.testing.assert_close(s.logdet(damping=lam), _dense_logdet(s, lam), rtol=1e-10, atol=1e-10)


def test_an_indefinite_estimate_and_a_trace_are_refused_by_name() -> None:
    model = _model()
    hessian = _structure(model, "diag", estimator="hessian", n_samples=1, generator=torch.Generator().manual_seed(3))
    assert float(hessian.diag().min()) < 0  # Î2's entries can be negative
    with pytest.raises(TorchfimError, match=r"^logdet: \d+ of the \d+ diagonal entries plus damping=0 are ≤ 0.*"
                                            r"no log-determinant there.*negative entries"):
        hessian.logdet()
    with pytest.raises(TorchfimError, match=r"Trace structure keeps only Tr; logdet\(\) needs"):
        _structure(model, "trace").logdet()
    with pytest.raises(TorchfimError, match=r"damping must be a finite number ≥ 0"):
        _structure(model, "diag").logdet(damping=-1.0)


def test_a_float64_copy_of_a_float32_result_solves_and_logdets_in_float64() -> None:
    """The refusals' advice, ``as_structure(result.double(), model)``, for a float32 model: the structure keeps
    float64 (it narrowed the copy back to the model's float32, so the advice refused again, and a solve or logdet
    that passed gave float32 numbers: 2704.5264 against the float64 2704.5182 in a user trial)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))  # float32
    x = torch.randn(40, 3)
    for structure in ("full", "blocks", "diag"):
        result = torchfim.fisher(model, x, structure=structure)
        wide = {n: b.double() for n, b in result.items()} if isinstance(result, dict) else result.double()
        s = torchfim.as_structure(wide, model)
        lam = 1e-3
        dense = s.to_dense() + lam * torch.eye(s.layout.num_params, dtype=torch.float64)
        assert s.to_dense().dtype == torch.float64 and s.logdet(lam).dtype == torch.float64, structure
        torch.testing.assert_close(s.logdet(lam), torch.logdet(dense), rtol=1e-12, atol=1e-10)
        v = torch.randn(s.layout.num_params, dtype=torch.float64)
        torch.testing.assert_close(s.solve(v, lam), torch.linalg.solve(dense, v), rtol=1e-9, atol=1e-12)
    assert torchfim.as_structure(torchfim.fisher(model, x), model).diag().dtype == torch.float32  # its own: kept


def test_a_float32_diagonal_of_a_million_entries_sums_its_logs_in_float64() -> None:
    """A float32 sum of 10⁶ logs is off by most of a nat (0.65 in a review's case); the logs are summed in float64."""
    from torchfim.layout import Layout
    from torchfim.structures import Diag

    d = torch.rand(1_000_000, generator=torch.Generator().manual_seed(0)) * 1e3 + 1.0  # float32
    layout = Layout(["w"], [torch.Size([len(d)])], torch.float32, torch.device("cpu"))
    got = Diag.holding(layout, d).logdet(damping=0.5)
    want = (d.double() + 0.5).log().sum()
    assert got.dtype == torch.float64
    assert abs(float(got) - float(want)) < 1e-3 * 1e-6 * abs(float(want)) + 1e-6 * len(d) ** 0.5


def test_a_damping_per_parameter_is_told_to_go_into_the_matrix() -> None:
    """laplace-torch's prior precision per layer or parameter, passed as damping: one message naming the shape and
    the way (it printed the whole tensor, then '1e-3 · trace()/P is a common start')."""
    s = _structure(_model(), "diag")
    prior = torch.full((s.layout.num_params,), 2.0, dtype=torch.float64)
    with pytest.raises(TorchfimError, match=r"damping is one number λ \(A \+ λI\), got a tensor of shape \(38,\); "
                                            r"for a prior precision per parameter, add it to the matrix yourself"):
        s.logdet(damping=prior)
    diag = torchfim.fisher(_model(), _inputs())
    torch.testing.assert_close(torchfim.as_structure(diag + prior, _model()).logdet(),
                               (diag + prior).log().sum(), rtol=1e-12, atol=0)
