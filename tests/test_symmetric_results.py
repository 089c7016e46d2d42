"""Full and blocks results are symmetric to the last bit: a matrix product rounds ``(i, j)`` and ``(j, i)`` in
different orders on some CPUs, and a float64 copy of a float32 result (the copy a float32 refusal names) was then
refused by the damped solve's symmetry check (``A − Aᵀ`` 5e-8 of the largest entry, above float64's ``√eps``)."""

from __future__ import annotations

import pytest
import torch

import torchfim
from torchfim._symmetric import TILE, symmetrise_


def test_symmetrise_is_the_mean_with_the_transpose_across_tiles():
    a = torch.randn(TILE + 37, TILE + 37, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expected = (a + a.T) / 2
    assert symmetrise_(a) is a
    assert torch.equal(a, expected)


def _wide_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.Tanh(), torch.nn.Linear(32, 10))


@pytest.mark.parametrize("estimator", ["exact", "score", "hessian", "empirical"])
@pytest.mark.parametrize("structure", ["full", "blocks"])
def test_float32_results_are_exactly_symmetric(structure, estimator):
    model = _wide_model()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 12, generator=g), torch.randint(0, 10, (200,), generator=g)
    given = ({"n_samples": 2, "generator": torch.Generator().manual_seed(2)} if estimator in ("score", "hessian")
             else {"targets": y} if estimator == "empirical" else {})
    result = torchfim.fisher(model, x, structure=structure, estimator=estimator, **given)
    blocks = result.values() if structure == "blocks" else [result]
    for block in blocks:
        assert torch.equal(block, block.T)
    variance = torchfim.fisher_variance(model, x, structure=structure)
    for block in variance.values() if structure == "blocks" else [variance]:
        assert torch.equal(block, block.T)


def test_a_float64_copy_of_float32_blocks_solves():
    model = _wide_model()
    x = torch.randn(200, 12, generator=torch.Generator().manual_seed(1))
    blocks = torchfim.fisher(model, x, structure="blocks")
    wide = torchfim.as_structure({name: block.double() for name, block in blocks.items()}, model)
    v = torch.ones(wide.layout.num_params, dtype=torch.float64)
    solved = wide.solve(v, damping=1e-3)
    torch.testing.assert_close(wide.mv(solved) + 1e-3 * solved, v)
