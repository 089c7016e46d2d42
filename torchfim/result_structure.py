"""A result of :func:`torchfim.fisher` as its structure object, so that the structures' algebra applies to it."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor, nn

from .errors import TorchfimError
from .structures import Blocks, Diag, Full, Layout, PublicValue, Structure, Trace, accumulation_dtype

__all__ = ["as_structure"]


def as_structure(result: PublicValue, model: nn.Module) -> Structure:
    """The structure object holding ``result``, a value :func:`torchfim.fisher` (or :func:`torchfim.fisher_variance`,
    :func:`torchfim.variance_bound`) returned for ``model``, so that the algebra of :mod:`torchfim.structures` applies:
    ``diag()``, ``trace()``, ``to_dense()``, ``mv(v)`` for a ``P``-vector or ``(P, k)`` columns, ``solve(v, damping)``
    (``(A + λI)⁻¹ v``), ``logdet(damping)`` (``log det(A + λI)``), ``block(name)`` and ``diag_by_parameter()``; its ``layout`` flattens tensors by parameter name
    into the result's ``P`` entries and back (:meth:`~torchfim.layout.Layout.flatten`, :meth:`~torchfim.layout.Layout.unflatten`; docs/uses.md).

    The kind follows the result: a 0-dim tensor is a :class:`~torchfim.structures.Trace`, a ``P``-vector a
    :class:`~torchfim.structures.Diag`, a ``P×P`` matrix a :class:`~torchfim.structures.Full` and a dict of blocks by
    parameter name (``structure="blocks"``) a :class:`~torchfim.structures.Blocks`. ``P`` and the names are those of
    ``model``'s trainable parameters (``requires_grad=True``) in ``model.named_parameters()`` order, the layout the
    result was computed in: freezing or adding parameters in between gives a structure that does not match, which is
    refused where the sizes or names differ. The structure shares the result's memory (a half-precision result is
    widened to float32 first); the flat index of parameter ``name``'s entries is ``structure.layout.span(index)``.

    Example:
        >>> import torch, torchfim
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
        >>> x = torch.randn(16, 3)
        >>> blocks = torchfim.as_structure(torchfim.fisher(model, x, structure="blocks"), model)
        >>> blocks.block("0.weight").shape, blocks.mv(torch.ones(26)).shape, blocks.mv(torch.ones(26, 5)).shape
        (torch.Size([12, 12]), torch.Size([26]), torch.Size([26, 5]))
        >>> full = torchfim.as_structure(torchfim.fisher(model, x, structure="full"), model)
        >>> bool(torch.allclose(full.diag(), torchfim.fisher(model, x, structure="diag")))
        True
        >>> step = full.solve(torch.ones(26), damping=1e-3)  # (F + 1e-3·I)⁻¹ v
        >>> bool(torch.allclose(full.mv(step) + 1e-3 * step, torch.ones(26), atol=1e-4))
        True
    """
    if not isinstance(model, nn.Module):
        raise TorchfimError(f"as_structure needs the model the result was computed for, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TorchfimError("the model has no parameters with requires_grad=True: no result of torchfim is of it")
    layout = _widened(Layout.of(named, model), result)
    if isinstance(result, dict):
        return Blocks.holding(layout, _blocks(result, layout))
    if not isinstance(result, Tensor):
        raise TorchfimError(f"as_structure takes a tensor or a dict of blocks that torchfim returned, got "
                            f"{type(result).__name__}")
    _check_floating(result, "the result")
    p, value = layout.num_params, _stored(result, layout)
    kinds = {(): Trace, (p,): Diag, (p, p): Full}
    kind = kinds.get(tuple(result.shape))
    if kind is None:
        raise TorchfimError(
            f"a result of shape {tuple(result.shape)} is none of a trace (), a diagonal ({p},) or a full matrix "
            f"({p}, {p}) of this model's {p} trainable parameters: was it computed for another model, or with other "
            "parameters trainable?")
    return kind.holding(layout, value)


def _blocks(result: dict, layout: Layout) -> dict[str, Tensor]:
    """The blocks of a ``structure="blocks"`` result, checked against ``layout``'s names and sizes."""
    if set(result) != set(layout.names) or len(result) != len(layout.names):
        raise TorchfimError(
            f"the blocks are of the parameters {', '.join(map(str, result))}, but the model's trainable ones are "
            f"{', '.join(layout.names)}: was the result computed for another model, or with other parameters trainable?")
    result = {name: result[name] for name in layout.names}  # θ's order, whatever order the dict came in
    for name, size in zip(layout.names, layout.sizes):
        block = result[name]
        if not isinstance(block, Tensor) or tuple(block.shape) != (size, size):
            shape = tuple(block.shape) if isinstance(block, Tensor) else type(block).__name__
            raise TorchfimError(f"the block of {name!r} should be {size}×{size} (the parameter's size), got {shape}")
        _check_floating(block, f"the block of {name!r}")
    return {name: _stored(block, layout) for name, block in result.items()}


def _check_floating(value: Tensor, what: str) -> None:
    """Refuse a tensor that is not real floating point (an integer, boolean or complex one): solve() and logdet()
    failed on it with torch's errors, and an integer diagonal solved in whatever dtype division promoted to."""
    if not value.is_floating_point():
        raise TorchfimError(f"as_structure takes a real floating-point tensor, as torchfim's results are; {what} is "
                            f"of dtype {value.dtype}: convert it first, e.g. .double()")


def _widened(layout: Layout, result: object) -> Layout:
    """``layout`` in the result's floating dtype where that is wider than the model's: a float64 copy of a float32
    model's result stays float64 (it was narrowed back, so the float64 solve that a refusal suggests solved in
    float32, and gave float32 numbers)."""
    values = list(result.values()) if isinstance(result, dict) else [result]
    dtypes = [v.dtype for v in values if isinstance(v, Tensor) and v.is_floating_point()]
    widest = max(dtypes, key=lambda d: torch.finfo(d).bits, default=None)
    if widest is None or torch.finfo(widest).bits <= torch.finfo(accumulation_dtype(layout.dtype)).bits:
        return layout
    return replace(layout, dtype=widest)


def _stored(value: Tensor, layout: Layout) -> Tensor:
    """``value`` in the dtype a structure of ``layout`` stores (float32 for a half-precision model's result)."""
    wide = accumulation_dtype(layout.dtype)
    return value if value.dtype == wide or not value.is_floating_point() else value.to(wide)
