"""A result's entries by parameter: ``diag_by_parameter()`` (the diagonal in each parameter's shape, for EWC,
merging or pruning saliencies) and ``layout.flatten`` / ``layout.unflatten`` between tensors by name and the flat
trainable θ of the results, checked against the float64 Jacobian oracle on a model with a frozen layer."""

from __future__ import annotations

import pytest
import torch
from oracles import exact_fisher
from torch import nn

import torchfim
from torchfim.errors import TorchfimError


@pytest.fixture()
def setting():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    model[2].requires_grad_(False)  # frozen in the middle: the flat θ skips it, parameters_to_vector does not
    return model, torch.randn(10, 3, dtype=torch.float64)


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("structure", ["diag", "full", "blocks"])
def test_the_diagonal_by_parameter_is_the_oracles_in_each_parameters_shape(setting, structure: str) -> None:
    model, x = setting
    oracle = torch.diagonal(exact_fisher(model, x, "categorical"))
    by_name = torchfim.as_structure(torchfim.fisher(model, x, structure=structure), model).diag_by_parameter()
    trainable = _trainable(model)
    assert list(by_name) == list(trainable)
    start = 0
    for name, p in trainable.items():
        assert by_name[name].shape == p.shape
        assert torch.allclose(by_name[name], oracle[start : start + p.numel()].reshape(p.shape), rtol=1e-10,
                              atol=1e-14)
        start += p.numel()


def test_a_natural_gradient_step_through_flatten_and_unflatten_is_the_oracles(setting) -> None:
    """``(F + λI)⁻¹ g`` with ``g`` the loss gradient by name (frozen ones among them): flattened in the results'
    layout, solved, and unflattened back onto the trainable parameters."""
    model, x = setting
    y = torch.randint(0, 3, (10,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}
    full = torchfim.as_structure(torchfim.fisher(model, x, structure="full"), model)
    g = full.layout.flatten(grads)
    step = full.layout.unflatten(torch.linalg.solve(full.to_dense() + 1e-3 * torch.eye(len(g), dtype=g.dtype), g))
    f = exact_fisher(model, x, "categorical")
    flat_grad = torch.cat([p.grad.reshape(-1) for p in _trainable(model).values()])
    want = torch.linalg.solve(f + 1e-3 * torch.eye(len(f), dtype=f.dtype), flat_grad)
    assert torch.allclose(torch.cat([t.reshape(-1) for t in step.values()]), want, rtol=1e-8, atol=1e-12)
    assert list(step) == list(_trainable(model)) and all(step[n].shape == p.shape for n, p in
                                                         _trainable(model).items())
    assert torch.allclose(full.mv(g), f @ flat_grad, rtol=1e-10, atol=1e-14)


def test_flatten_and_unflatten_refuse_what_does_not_fit_the_layout(setting) -> None:
    model, x = setting
    layout = torchfim.as_structure(torchfim.fisher(model, x), model).layout
    with pytest.raises(TorchfimError, match=r"unflatten takes a vector of the 31 trainable parameters' entries, got "
                                            r"shape \(51,\)"):
        layout.unflatten(torch.nn.utils.parameters_to_vector(model.parameters()))
    with pytest.raises(TorchfimError, match=r"missing or None \(a parameter without a gradient: pass torch.zeros_like\(p\)\): 4.bias"):
        layout.flatten({n: p for n, p in model.named_parameters() if n != "4.bias"})
    with pytest.raises(TorchfimError, match=r"missing or None .*: 0.bias"):
        layout.flatten({**dict(model.named_parameters()), "0.bias": None})  # p.grad of an unused parameter
    with pytest.raises(TorchfimError, match="another shape than their parameter's for: 0.weight"):
        layout.flatten({**dict(model.named_parameters()), "0.weight": torch.zeros(12)})
    with pytest.raises(TorchfimError, match=r"diag_by_parameter\(\)|diag\(\)"):
        torchfim.as_structure(torchfim.fisher(model, x, structure="trace"), model).diag_by_parameter()


def test_locate_is_the_inverse_of_the_flat_order() -> None:
    """``layout.locate(i)``: the parameter holding entry ``i`` of θ and the row-major index within it, against numpy's
    ``unravel_index`` over every entry (a 0-dim parameter included); an entry outside θ is refused."""
    import numpy as np

    from torchfim.layout import Layout

    layout = Layout(["a", "b", "c"], [torch.Size([2, 3]), torch.Size([]), torch.Size([4, 1, 2])], torch.float32,
                    torch.device("cpu"))
    for flat in range(layout.num_params):
        name, index = layout.locate(flat)
        i = layout.names.index(name)
        assert layout.span(i).start <= flat < layout.span(i).stop
        expected = np.unravel_index(flat - layout.span(i).start, tuple(layout.shapes[i])) if layout.shapes[i] else ()
        assert index == tuple(int(k) for k in expected)
    with pytest.raises(TorchfimError, match="entry 15 lies outside θ's 15 entries"):
        layout.locate(15)
