"""Structures of a Fisher-shaped result: Full, Diag, Trace and Blocks.

A structure owns the running sum of one view of a ``P×P`` symmetric matrix ``A`` (a Fisher
matrix, an estimator, or the entrywise variances of one) over mini-batches, its allocation and
memory check, and one algebra that every structure answers the same way:

* ``diag()``: the diagonal of ``A`` as a ``P``-vector (``Trace`` cannot: it keeps one number);
* ``trace()``: ``tr A``;
* ``to_dense()``: ``A`` as a ``P×P`` tensor, zero outside what the structure keeps (refused with
  the size when it would not fit in memory);
* ``mv(v)``: ``A v`` for a ``P``-vector (``Blocks``: block-diagonal product);
* ``solve(v, damping)``: ``(A + λI)⁻¹ v`` (``Blocks``: block by block; :mod:`torchfim.damped_solve`);
* ``logdet(damping)``: ``log det(A + λI)`` (``Blocks``: the sum over the blocks);
* ``block(name)``: the diagonal block of one parameter tensor;
* ``diag_by_parameter()``: the diagonal as one tensor per parameter, in its shape.

A result of :func:`torchfim.fisher` (a tensor, or the dict of ``structure="blocks"``) becomes the object of its kind
with :func:`torchfim.as_structure`, so that this algebra applies to it.

As torch's own ``diagonal()`` and slicing do, what these return may share memory with the structure
(``Diag.diag()`` is its stored vector, ``Full.block`` a view, ``Full.to_dense()`` the matrix itself,
``diag_by_parameter()`` views of the diagonal): clone a result before writing into it.

The engine adds per-sample products with ``add_rows`` (rows ``r`` of ``Σ r rᵀ``, all parameters),
``add_block_rows`` (rows of one parameter tensor), ``add_squares`` (entrywise squares of one
parameter tensor), ``add_diagonal`` (values on the diagonal of one parameter tensor) and
``add_columns`` (dense columns, for second derivatives). :attr:`Structure.product` tells the engine
which of the first three it needs; ``finish(n)`` divides by ``n`` and returns the public value (a
tensor, or for ``Blocks`` a dict of parameter name to block).

Example:
    >>> import torch
    >>> from torchfim.structures import Layout, make_structure
    >>> layout = Layout(["w", "b"], [torch.Size([2]), torch.Size([1])], torch.float64, torch.device("cpu"))
    >>> s = make_structure("blocks", layout)
    >>> s.add_rows(torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64))
    >>> s.finish(1)["w"]
    tensor([[1., 2.],
            [2., 4.]], dtype=torch.float64)
    >>> float(s.trace()), s.diag().tolist()
    (14.0, [1.0, 4.0, 9.0])
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch import Tensor

from ._memory import SMALL_REQUEST_GIB, fits_in_memory, size_text
from ._symmetric import symmetrise_
from .damped_solve import DampedAlgebra, DampedParts
from .errors import TorchfimError, check_choice
from .layout import Layout, accumulation_dtype

__all__ = ["STRUCTURE_NAMES", "PublicValue", "Layout", "StructureVisitor", "Structure", "Full", "Diag", "Trace", "Blocks",
           "make_structure", "structure_class", "check_fits", "accumulation_dtype", "entrywise"]

#: Structure names accepted by the public functions (``"layers"`` is the old name of ``"blocks"``).
STRUCTURE_NAMES = ("full", "diag", "trace", "blocks", "layers")

PublicValue = Tensor | dict[str, Tensor]


def entrywise(fn: Callable[..., Tensor], *values: PublicValue) -> PublicValue:
    """``fn`` on public values: on tensors, or block by block on ``blocks`` dicts."""
    first = values[0]
    if isinstance(first, dict):
        return {name: fn(*(v[name] for v in values)) for name in first}  # type: ignore[index]
    return fn(*values)


class StructureVisitor(ABC):
    """A computation whose formula depends on the structure: one method per kind (double dispatch)."""

    @abstractmethod
    def full(self, structure: Full) -> None: ...

    @abstractmethod
    def diag(self, structure: Diag) -> None: ...

    @abstractmethod
    def trace(self, structure: Trace) -> None: ...

    @abstractmethod
    def blocks(self, structure: Blocks) -> None: ...


class Structure(DampedAlgebra):
    """Running sum of one view of a symmetric ``P×P`` matrix; see the module docstring."""

    name: str
    #: What the engine supplies per mini-batch: ``"squares"``, ``"block_rows"`` or ``"rows"``.
    product: str
    #: Whether it stores square matrices, made exactly symmetric by :meth:`finish` (:mod:`torchfim._symmetric`).
    square = False

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.finished = False

    # ---------------------------------------------------------------- accumulation
    @abstractmethod
    def add_squares(self, index: int, squares: Tensor, scale: float = 1.0) -> None:
        """Add ``scale ·`` the entrywise sums of squares of parameter ``index``'s per-sample products."""

    def add_block_rows(self, index: int, rows: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · Σ r rᵀ`` over rows ``r`` (R, size) of parameter ``index``."""
        self.add_squares(index, (rows * rows).sum(0), scale)

    def add_rows(self, rows: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · Σ r rᵀ`` over rows ``r`` (R, P) covering every parameter."""
        for i in range(len(self.layout.names)):
            self.add_block_rows(i, rows[:, self.layout.span(i)], scale)

    @abstractmethod
    def add_diagonal(self, index: int, values: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · values`` to the diagonal entries of parameter ``index``."""

    def add_columns(self, columns: Tensor, values: Tensor, scale: float = 1.0) -> None:
        """Add ``scale ·`` dense columns ``values`` (m, P) at flat indices ``columns`` (m,).

        Only the entries the structure keeps are added; ``Diag`` and ``Trace`` take the diagonal.
        """
        diagonal = values[torch.arange(len(columns), device=values.device), columns]
        for i in range(len(self.layout.names)):
            span = self.layout.span(i)
            inside = (columns >= span.start) & (columns < span.stop)
            if bool(inside.any()):
                local = torch.zeros(self.layout.sizes[i], dtype=values.dtype, device=values.device)
                local[columns[inside] - span.start] = diagonal[inside]
                self.add_diagonal(i, local, scale)

    def add_matrix(self, index: int | None, rows: Tensor | slice, values: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · values`` (r, size) to the rows ``rows`` (local) of parameter ``index``'s block.

        ``index=None`` addresses the whole matrix (``Full`` only). ``Diag`` and ``Trace`` take the
        diagonal of the square sub-block.
        """
        span = self.layout.span(index)
        local = torch.arange(span.stop - span.start, device=values.device)[rows]
        self.add_diagonal_entries(index, local, values[torch.arange(len(local), device=values.device), local], scale)

    def add_diagonal_entries(self, index: int, local: Tensor, values: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · values`` at the local diagonal positions ``local`` of parameter ``index``."""
        full = torch.zeros(self.layout.sizes[index], dtype=values.dtype, device=values.device)
        full[local] = values
        self.add_diagonal(index, full, scale)

    @abstractmethod
    def visit(self, visitor: StructureVisitor) -> None:
        """Call the method of ``visitor`` for this kind of structure with the structure itself."""

    # ------------------------------------------------------------------ result
    def finish(self, n: float) -> PublicValue:
        """Divide the running sum by ``n`` and return the public value (in the layout's dtype); a square matrix is
        made ``(A + Aᵀ)/2``, symmetric to the last bit."""
        n = float(n)  # a variance's n²k may exceed int64, which torch refused to divide by (OverflowError)
        self._map_inplace(lambda t: t.div_(n))
        if self.square:
            self._map_inplace(symmetrise_)
        self.finished = True
        return self.public()

    @abstractmethod
    def public(self) -> PublicValue:
        """The value as the public functions return it, in the model's dtype."""

    @abstractmethod
    def _map_inplace(self, fn: Callable[[Tensor], Tensor]) -> None:
        """Apply ``fn`` to every stored tensor in place."""

    # ----------------------------------------------------------------- algebra
    @abstractmethod
    def diag(self) -> Tensor:
        """The diagonal of the matrix, a ``P``-vector."""

    @abstractmethod
    def trace(self) -> Tensor:
        """The trace, a 0-dim tensor."""

    @abstractmethod
    def mv(self, v: Tensor) -> Tensor:
        """The product with a ``P``-vector ``v``, or with each column of ``v`` of shape ``(P, k)``."""

    @abstractmethod
    def block(self, name: str) -> Tensor:
        """The diagonal block of parameter ``name`` (dense, or its diagonal for ``Diag``)."""

    def diag_by_parameter(self) -> dict[str, Tensor]:
        """The diagonal as one tensor per trainable parameter, in the parameter's shape (EWC's importances, a
        pruning saliency ``½ F_ii θ_i²``): ``layout.unflatten(diag())``, views of :meth:`diag` (docs/uses.md)."""
        return self.layout.unflatten(self.diag())

    def to_dense(self) -> Tensor:
        """The ``P×P`` matrix (zero outside what is kept); refused when it would not fit in memory."""
        return self._dense()

    def _check_dense_fits(self) -> None:
        """Refuse a ``P×P`` matrix for :meth:`to_dense` that would not fit, naming the algebra that needs none."""
        p = self.layout.num_params
        check_fits(p**2, f"a {p}×{p} matrix for to_dense()", self.name, self.layout,
                   "use its diag(), trace(), mv(v) or block(name), which need no dense matrix")

    @abstractmethod
    def _dense(self) -> Tensor: ...

    def _check_vector(self, v: Tensor, what: str = "mv") -> Tensor:
        p = self.layout.num_params
        if not isinstance(v, Tensor) or v.dim() not in (1, 2) or v.shape[0] != p:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            flat = " (tensors by parameter name go in through layout.flatten(...))" if isinstance(v, dict) else ""
            raise TorchfimError(f"{what} takes a vector of shape ({p},) or columns of shape ({p}, k), got {shape}{flat}")
        return v.to(device=self._stored_device(), dtype=self._stored_dtype())  # a vector on another device comes over

    @classmethod
    def holding(cls, layout: Layout, value: PublicValue) -> Structure:
        """A finished structure of ``layout`` whose stored value is ``value`` (shared, not copied)."""
        structure = cls.__new__(cls)
        Structure.__init__(structure, layout)
        structure.value, structure.finished = value, True
        return structure

    def _stored_dtype(self) -> torch.dtype:
        return accumulation_dtype(self.layout.dtype)

    def _stored_device(self) -> torch.device:
        """Where the stored value is (the parameters' device, or where the user moved a result before
        :func:`~torchfim.as_structure`)."""
        value = self.value
        return next(iter(value.values())).device if isinstance(value, dict) else value.device

    def __repr__(self) -> str:
        return f"{type(self).__name__}(P={self.layout.num_params})"


def check_fits(entries: int, what: str, name: str, layout: Layout,
               fix: str = "use structure='diag' or 'trace', or freeze parameters you do not need with "
                          "p.requires_grad_(False)", copies: int = 2) -> None:
    """Refuse a dense allocation of ``copies`` tensors of ``entries`` (by default a result and one working copy)
    that would not fit, naming the size and ``fix``."""
    ok, needed, free = fits_in_memory(entries, accumulation_dtype(layout.dtype), layout.device, copies)
    if not ok:
        if needed < SMALL_REQUEST_GIB:  # the machine is out of memory at this moment: a smaller structure will not help
            fix = ("the machine has next to no free memory at this call (MemAvailable, or a memory cgroup's limit "
                   f"less its usage): free memory and call again, or {fix}")
        raise TorchfimError(
            f"structure={name!r} needs {what} (about {size_text(needed)} with working memory) but only "
            f"{size_text(free)} is available on {layout.device}; {fix}"
        )


class Diag(Structure):
    """The diagonal of the matrix, a ``P``-vector."""

    name, product = "diag", "squares"

    def visit(self, visitor: StructureVisitor) -> None:
        visitor.diag(self)

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.value = layout.zeros(layout.num_params)

    def add_squares(self, index: int, squares: Tensor, scale: float = 1.0) -> None:
        self.value[self.layout.span(index)].add_(squares.reshape(-1).to(self.value.dtype), alpha=scale)

    add_diagonal = add_squares

    def public(self) -> Tensor:
        return self.value.to(self.layout.dtype)

    def _map_inplace(self, fn: Callable[[Tensor], Tensor]) -> None:
        fn(self.value)

    def diag(self) -> Tensor:
        return self.value

    def trace(self) -> Tensor:
        return self.value.sum()

    def mv(self, v: Tensor) -> Tensor:
        v = self._check_vector(v)
        return (self.value if v.dim() == 1 else self.value.unsqueeze(-1)) * v

    def _damped_parts(self, verb: str) -> DampedParts:
        return self.value

    def block(self, name: str) -> Tensor:
        return self.value[self.layout.span(self.layout.index(name))]

    def _dense(self) -> Tensor:
        self._check_dense_fits()
        return torch.diag(self.value)


class Trace(Structure):
    """Only the trace, a 0-dim tensor."""

    name, product = "trace", "squares"

    def visit(self, visitor: StructureVisitor) -> None:
        visitor.trace(self)

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        self.value = layout.zeros()

    def add_squares(self, index: int, squares: Tensor, scale: float = 1.0) -> None:
        self.value.add_(squares.to(self.value.dtype).sum(), alpha=scale)  # widen, then sum

    add_diagonal = add_squares

    def add_total(self, value: Tensor, scale: float = 1.0) -> None:
        """Add ``scale · value`` to the trace (a quantity not split by parameter)."""
        self.value.add_(value.to(self.value.dtype), alpha=scale)

    def public(self) -> Tensor:
        return self.value.to(self.layout.dtype)

    def _map_inplace(self, fn: Callable[[Tensor], Tensor]) -> None:
        fn(self.value)

    def _refuse(self, what: str) -> TorchfimError:
        return TorchfimError(f"a Trace structure keeps only Tr; {what} needs structure='diag', 'blocks' or 'full'")

    def diag(self) -> Tensor:
        raise self._refuse("diag()")

    def trace(self) -> Tensor:
        return self.value

    def mv(self, v: Tensor) -> Tensor:
        raise self._refuse("mv()")

    def _damped_parts(self, verb: str) -> DampedParts:
        raise self._refuse(verb)

    def block(self, name: str) -> Tensor:
        raise self._refuse("block()")

    def _dense(self) -> Tensor:
        raise self._refuse("to_dense()")


class Blocks(Structure):
    """One dense block per parameter tensor (the block diagonal of the matrix)."""

    name, product, square = "blocks", "block_rows", True
    _float64_copy = "as_structure({name: block.double() for name, block in result.items()}, model)"

    def visit(self, visitor: StructureVisitor) -> None:
        visitor.blocks(self)

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        check_fits(sum(s * s for s in layout.sizes), "one dense block per parameter tensor", "blocks", layout)
        self.value = {n: layout.zeros(s, s) for n, s in zip(layout.names, layout.sizes)}

    def add_squares(self, index: int, squares: Tensor, scale: float = 1.0) -> None:
        raise TorchfimError("internal: Blocks needs rows, not squares")  # the engine reads .product

    def add_block_rows(self, index: int, rows: Tensor, scale: float = 1.0) -> None:
        block = self.value[self.layout.names[index]]
        rows = rows.to(block.dtype)
        block.addmm_(rows.T, rows, alpha=scale)

    def add_diagonal(self, index: int, values: Tensor, scale: float = 1.0) -> None:
        block = self.value[self.layout.names[index]]
        block.diagonal().add_(values.reshape(-1).to(block.dtype), alpha=scale)

    def add_matrix(self, index: int | None, rows: Tensor | slice, values: Tensor, scale: float = 1.0) -> None:
        block = self.value[self.layout.names[index]]
        block[rows] += scale * values.to(block.dtype)

    def add_columns(self, columns: Tensor, values: Tensor, scale: float = 1.0) -> None:
        for i, name in enumerate(self.layout.names):
            span = self.layout.span(i)
            inside = (columns >= span.start) & (columns < span.stop)
            if bool(inside.any()):
                block = self.value[name]
                cols = values[inside][:, span].to(block.dtype)
                block.index_add_(1, columns[inside] - span.start, cols.T, alpha=scale)

    def public(self) -> dict[str, Tensor]:
        return {n: b.to(self.layout.dtype) for n, b in self.value.items()}

    def _map_inplace(self, fn: Callable[[Tensor], Tensor]) -> None:
        for b in self.value.values():
            fn(b)

    def diag(self) -> Tensor:
        return torch.cat([torch.diagonal(b) for b in self.value.values()])

    def trace(self) -> Tensor:
        # Summed from the first block's, never from a new zero on the parameters' device: blocks moved elsewhere
        # (to the CPU, to be read) answer there.
        first, *rest = (torch.diagonal(b).sum() for b in self.value.values())
        return sum(rest, first)

    def mv(self, v: Tensor) -> Tensor:
        v = self._check_vector(v)
        return torch.cat([b @ v[self.layout.span(i)] for i, b in enumerate(self.value.values())])

    def _damped_parts(self, verb: str) -> DampedParts:
        return [(f"the block of {n!r}", b, self.layout.span(i)) for i, (n, b) in enumerate(self.value.items())]

    def block(self, name: str) -> Tensor:
        return self.value[self.layout.names[self.layout.index(name)]]  # a tied parameter's other name: its block

    def _dense(self) -> Tensor:
        self._check_dense_fits()
        return torch.block_diag(*self.value.values())


class Full(Structure):
    """The whole ``P×P`` matrix."""

    name, product, square = "full", "rows", True

    def visit(self, visitor: StructureVisitor) -> None:
        visitor.full(self)

    def __init__(self, layout: Layout) -> None:
        super().__init__(layout)
        p = layout.num_params
        check_fits(p * p, f"a {p}×{p} matrix", "full", layout)
        self.value = layout.zeros(p, p)

    def add_squares(self, index: int, squares: Tensor, scale: float = 1.0) -> None:
        raise TorchfimError("internal: Full needs rows, not squares")  # the engine reads .product

    def add_rows(self, rows: Tensor, scale: float = 1.0) -> None:
        rows = rows.to(self.value.dtype)
        self.value.addmm_(rows.T, rows, alpha=scale)

    def add_block_rows(self, index: int, rows: Tensor, scale: float = 1.0) -> None:
        span = self.layout.span(index)
        rows = rows.to(self.value.dtype)
        self.value[span, span].addmm_(rows.T, rows, alpha=scale)

    def add_diagonal(self, index: int, values: Tensor, scale: float = 1.0) -> None:
        self.value.diagonal()[self.layout.span(index)].add_(values.reshape(-1).to(self.value.dtype), alpha=scale)

    def add_columns(self, columns: Tensor, values: Tensor, scale: float = 1.0) -> None:
        self.value.index_add_(1, columns, values.to(self.value.dtype).T, alpha=scale)

    def add_matrix(self, index: int | None, rows: Tensor | slice, values: Tensor, scale: float = 1.0) -> None:
        span = slice(0, self.layout.num_params) if index is None else self.layout.span(index)
        if isinstance(rows, slice):
            rows = torch.arange(span.stop - span.start, device=values.device)[rows]
        self.value[rows + span.start, span] += scale * values.to(self.value.dtype)

    def public(self) -> Tensor:
        return self.value.to(self.layout.dtype)

    def _map_inplace(self, fn: Callable[[Tensor], Tensor]) -> None:
        fn(self.value)

    def diag(self) -> Tensor:
        return self.value.diagonal()

    def trace(self) -> Tensor:
        return self.value.diagonal().sum()

    def mv(self, v: Tensor) -> Tensor:
        return self.value @ self._check_vector(v)

    def _damped_parts(self, verb: str) -> DampedParts:
        return [("the matrix", self.value, slice(0, self.layout.num_params))]

    def block(self, name: str) -> Tensor:
        span = self.layout.span(self.layout.index(name))
        return self.value[span, span]

    def _dense(self) -> Tensor:
        return self.value


_BY_NAME: dict[str, type[Structure]] = {"full": Full, "diag": Diag, "trace": Trace, "blocks": Blocks, "layers": Blocks}


def structure_kind(name: str) -> str:
    """The kind of structure a name gives: the name itself, but ``"blocks"`` for its old name ``"layers"``."""
    return _BY_NAME[name].name if name in _BY_NAME else name


def structure_class(name: object) -> type[Structure] | None:
    """The structure class a name gives (``"layers"``: :class:`Blocks`); None for an unknown name."""
    return _BY_NAME.get(name) if isinstance(name, str) else None


def make_structure(name: str, layout: Layout) -> Structure:
    """A new, zero structure of kind ``name`` (one of :data:`STRUCTURE_NAMES`) for ``layout``."""
    return _BY_NAME[check_choice("structure", name, STRUCTURE_NAMES)](layout)
