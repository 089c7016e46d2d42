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
