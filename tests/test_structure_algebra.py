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
from torch import nn

import torchfim
from torchfim import TorchfimError
from torchfim.structures import Blocks, Diag, Full, Layout, Trace, make_structure

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
    columns = torch.randn(12, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(structure.mv(columns), kept @ columns, rtol=1e-12, atol=1e-15)
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
    with pytest.raises(TorchfimError, match=r"mv takes a vector of shape \(12,\) or columns of shape \(12, k\), "
                                            r"got \(11,\)"):
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


def _tied_model() -> nn.Module:
    """Parameters registered in another order than used, one tied and one frozen."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4)).double()
    model[4].weight = model[2].weight  # tied
    model[0].bias.requires_grad_(False)
    return model


def test_a_result_of_fisher_as_a_structure_answers_as_the_dense_fisher() -> None:
    """``torchfim.as_structure`` on each kind of result: the object of that kind, sharing the result's memory, whose
    algebra agrees with the full Fisher restricted to what the structure keeps; (P, k) columns for mv."""
    model, x = _tied_model(), torch.randn(20, 3, dtype=torch.float64)
    dense = torchfim.fisher(model, x, structure="full")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    spans, start = {}, 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            spans[name], start = slice(start, start + p.numel()), start + p.numel()
    v = torch.randn(start, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    for kind, cls in (("full", Full), ("diag", Diag), ("blocks", Blocks), ("trace", Trace)):
        result = torchfim.fisher(model, x, structure=kind)
        structure = torchfim.as_structure(result, model)
        assert type(structure) is cls and structure.layout.names == names
        assert torch.allclose(structure.trace(), dense.trace(), rtol=1e-12, atol=0)
        if kind == "trace":
            continue
        kept = torch.zeros_like(dense)
        for span in spans.values():
            kept[span, span] = dense[span, span]
        kept = dense if kind == "full" else torch.diag(dense.diagonal()) if kind == "diag" else kept
        assert torch.allclose(structure.mv(v), kept @ v, rtol=1e-12, atol=1e-15)
        assert torch.allclose(structure.to_dense(), kept, rtol=1e-12, atol=0)
        block = structure.block("2.weight")
        assert torch.allclose(block, kept[spans["2.weight"], spans["2.weight"]].diagonal() if kind == "diag"
                              else kept[spans["2.weight"], spans["2.weight"]], rtol=1e-12, atol=0)
    shared = torchfim.fisher(model, x, structure="diag")
    assert torchfim.as_structure(shared, model).diag().data_ptr() == shared.data_ptr()  # no copy


def test_a_result_of_another_model_is_refused_with_what_differs() -> None:
    model, x = _tied_model(), torch.randn(6, 3, dtype=torch.float64)
    diag, blocks = (torchfim.fisher(model, x, structure=s) for s in ("diag", "blocks"))
    model[0].weight.requires_grad_(False)
    with pytest.raises(TorchfimError, match=r"a result of shape \(36,\) is none of a trace \(\), a diagonal \(24,\)"):
        torchfim.as_structure(diag, model)
    with pytest.raises(TorchfimError, match="the blocks are of the parameters 0.weight, 2.weight, 2.bias, 4.bias, but "
                                            "the model's trainable ones are 2.weight, 2.bias, 4.bias"):
        torchfim.as_structure(blocks, model)
    with pytest.raises(TorchfimError, match="takes a tensor or a dict of blocks that torchfim returned, got list"):
        torchfim.as_structure([diag], model)


def test_blocks_in_another_order_are_taken_in_thetas_order() -> None:
    """A dict of the model's blocks in another order (sorted by name, say) was refused as of another model."""
    model, x = _tied_model(), torch.randn(6, 3, dtype=torch.float64)
    blocks = torchfim.fisher(model, x, structure="blocks")
    shuffled = torchfim.as_structure(dict(sorted(blocks.items(), reverse=True)), model)
    torch.testing.assert_close(shuffled.to_dense(), torchfim.as_structure(blocks, model).to_dense(), rtol=0, atol=0)


def test_blocks_answer_their_trace_where_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trace of blocks held on one device (here the CPU) is on that device, whatever the device of the parameters
    they were computed for (stood in for by a layout whose zeros are on "meta": a cuda model's are on cuda), and equals
    the sum of the blocks' diagonals; it was summed from a zero on the parameters' device, where a 0-dim CPU sum then
    landed."""
    model, x = _tied_model(), torch.randn(6, 3, dtype=torch.float64)
    blocks = torchfim.as_structure(torchfim.fisher(model, x, structure="blocks"), model)
    monkeypatch.setattr(Layout, "zeros", lambda self, *shape: torch.zeros(shape, dtype=torch.float64, device="meta"))
    trace = blocks.trace()
    assert trace.device.type == "cpu" and trace.dtype == torch.float64
    assert float(trace) == pytest.approx(float(torch.diagonal(blocks.to_dense()).sum()), rel=1e-14)


@pytest.mark.parametrize("structure", ["full", "diag", "blocks"])
def test_a_tied_parameter_s_other_name_gives_its_block(structure: str) -> None:
    """``block('4.weight')`` of a weight tied to ``2.weight`` said there was no trainable parameter of that name; it is
    the same tensor, whose block θ holds under its first name. A name of no parameter is still refused."""
    model, x = _tied_model(), torch.randn(6, 3, dtype=torch.float64)
    s = torchfim.as_structure(torchfim.fisher(model, x, structure=structure), model)
    torch.testing.assert_close(s.block("4.weight"), s.block("2.weight"), rtol=0, atol=0)
    with pytest.raises(TorchfimError, match="no trainable parameter named '4.scale'"):
        s.block("4.scale")


def test_the_docstring_examples_run() -> None:
    import doctest

    from torchfim import result_structure, structures

    for module in (structures, result_structure):
        assert doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE).failed == 0, module.__name__


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex128])
@pytest.mark.parametrize("structure", ["full", "diag", "blocks"])
def test_a_result_that_is_not_real_floating_point_is_refused_by_its_dtype(structure: str, dtype: torch.dtype) -> None:
    """An integer, boolean or complex matrix given to as_structure failed deep in solve() with torch's TypeError
    (torch.finfo of an integer dtype) or NotImplementedError ('min_all' for complex), and an integer diagonal solved in
    whatever dtype division promoted to. torchfim's results are real floating point: the dtype is named with the fix."""
    model, x = _tied_model(), torch.randn(6, 3, dtype=torch.float64)
    result = torchfim.fisher(model, x, structure=structure)
    cast = {k: b.to(dtype) for k, b in result.items()} if isinstance(result, dict) else result.to(dtype)
    with pytest.raises(TorchfimError, match=rf"real floating-point tensor.*of dtype {dtype}.*\.double\(\)"):
        torchfim.as_structure(cast, model)
