"""The structure objects' algebra (``torchfim/structures.py``): ``Full``, ``Diag``, ``Blocks`` and ``Trace``, each fed
the same per-sample rows, answer ``diag()``, ``trace()``, ``mv(v)``, ``block(name)`` and ``to_dense()`` as the dense
matrix ``(1/n) Σ r rᵀ`` does, restricted to what the structure keeps (its diagonal, its diagonal blocks, all of it).
Refused, with the problem named: a dense matrix that would not fit (its size, and the algebra that needs none), an
unknown parameter name, a vector of another length, and what a trace cannot answer. Oracle: float64 matrices built
by hand from the rows.
"""

from __future__ import annotations

import pytest
import torch

from torchfim import TorchfimError
from torchfim.structures import Layout, make_structure

NAMES = ["weight", "bias", "scale"]
SHAPES = [torch.Size([2, 3]), torch.Size([2]), torch.Size([4])]  # 6 + 2 + 4 = 12 numbers
N = 5


def _layout(shapes: list[torch.Size] = SHAPES, names: list[str] = NAMES) -> Layout:
    return Layout(names, shapes, torch.float64, torch.device("cpu"))


def _rows() -> torch.Tensor:
    return torch.randn(N, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def _kept(name: str) -> torch.Tensor:
    """The dense oracle of what structure ``name`` keeps of ``(1/N) Rᵀ R``."""
    dense = _rows().T @ _rows() / N
    if name == "diag":
        return torch.diag(dense.diagonal())
    if name == "blocks":
        kept = torch.zeros_like(dense)
        for span in (slice(0, 6), slice(6, 8), slice(8, 12)):
            kept[span, span] = dense[span, span]
        return kept
    return dense


def _built(name: str) -> object:
    structure = make_structure(name, _layout())
    structure.add_rows(_rows())
    structure.finish(N)
    return structure


@pytest.mark.parametrize("name", ["full", "diag", "blocks"])
def test_every_structure_answers_as_the_dense_matrix_of_what_it_keeps(name: str) -> None:
    structure, kept = _built(name), _kept(name)
    v = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(structure.to_dense(), kept, rtol=1e-13, atol=0)
    assert torch.allclose(structure.diag(), kept.diagonal(), rtol=1e-13, atol=0)
    assert torch.allclose(structure.trace(), kept.trace(), rtol=1e-13, atol=0)
    assert torch.allclose(structure.mv(v), kept @ v, rtol=1e-12, atol=1e-15)
    for index, span in enumerate((slice(0, 6), slice(6, 8), slice(8, 12))):
        block = structure.block(NAMES[index])
        want = kept[span, span].diagonal() if name == "diag" else kept[span, span]  # Diag keeps the diagonal
        assert torch.allclose(block, want, rtol=1e-13, atol=0), NAMES[index]


def test_a_trace_keeps_the_trace_and_refuses_the_rest() -> None:
    structure = _built("trace")
    assert torch.allclose(structure.trace(), _kept("full").trace(), rtol=1e-13, atol=0)
    for call in (structure.diag, lambda: structure.mv(torch.zeros(12, dtype=torch.float64)),
                 lambda: structure.block("bias"), structure.to_dense):
        with pytest.raises(TorchfimError, match="keeps only Tr; .* needs structure='diag', 'blocks' or 'full'"):
            call()


@pytest.mark.parametrize("name", ["full", "diag", "blocks"])
def test_unknown_names_and_vectors_of_another_length_are_refused(name: str) -> None:
    structure = _built(name)
    with pytest.raises(TorchfimError, match="no trainable parameter named 'weights'; known: weight, bias, scale"):
        structure.block("weights")
    with pytest.raises(TorchfimError, match=r"mv takes a vector of shape \(12,\), got \(11,\)"):
        structure.mv(torch.zeros(11, dtype=torch.float64))


def test_a_dense_matrix_that_would_not_fit_is_refused_with_its_size() -> None:
    """A million parameters: the diagonal is small, its dense matrix 10¹² numbers. to_dense() names the size and the
    algebra that needs no dense matrix (before, it advised structure='diag' to a Diag); Full refuses to be built; a
    Trace refuses to_dense() as a trace whatever its size."""
    huge = _layout([torch.Size([10**6])], ["w"])
    diag = make_structure("diag", huge)
    diag.finish(1)
    with pytest.raises(TorchfimError, match=r"needs a 1000000×1000000 matrix for to_dense\(\) \(about [\d.]+ GiB.*"
                                            r"use its diag\(\), trace\(\), mv\(v\) or block\(name\)"):
        diag.to_dense()
    with pytest.raises(TorchfimError, match=r"structure='full' needs a 1000000×1000000 matrix .*structure='diag'"):
        make_structure("full", huge)
    trace = make_structure("trace", huge)  # it keeps no matrix to offer: its own refusal, not the memory's
    with pytest.raises(TorchfimError, match=r"keeps only Tr; to_dense\(\) needs structure="):
        trace.to_dense()
