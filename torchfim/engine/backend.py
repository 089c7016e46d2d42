"""The interface every backend implements, and the products derived from its primitives.

A backend turns a recorded forward of a mini-batch and output-space vectors ``v`` (B, m, C) into
per-sample parameter products ``Jᵢᵀ v_ij`` (first order), and gives second derivatives of the
outputs (for Î2). Primitives, each backend's own:

* :meth:`Backend.record`: one forward of a batch kept for back-propagation;
* :meth:`Backend.row_groups`: how to cut a large batch into groups of rows recorded one at a time;
* :meth:`Backend.pieces`: chunks of samples with the per-sample products of each parameter tensor;
* :meth:`Backend.squares`: ``Σᵢⱼ (Jᵢᵀ v_ij)²`` entrywise per parameter tensor (a backend may skip the
  per-sample products where a layer's structure allows);
* second order: :meth:`Backend.hessian_columns`, :meth:`Backend.output_hessian_diagonals`,
  :meth:`Backend.output_hessian_columns` over flat parameter indices.

Everything the estimators need is derived here from those (no caller asks which backend it has):
accumulation into a structure, per-sample squared norms, per-entry quartic moments of the
Jacobian columns, per-input output Gram matrices, the Hessian term of Î2 and the per-entry
quadratic forms of output-Hessian diagonals. Formulas: docs/math.md §2, §3 and §6.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor

from .._identity import identity_like
from .._memory import fits_in_memory, size_text
from .._processes import SHARED_ERRORS
from ..errors import TorchfimError
from ..structures import Structure, Trace
from .batch import Batch
from .directions import DirectionSweep
from .linearity import linear_parameters
from .view import ModelView

#: Elements allowed in one chunk of per-sample products (bounds peak memory).
CHUNK_ELEMENTS = 2**24

Pieces = dict[int, Tensor]  # parameter index -> per-sample products (b, m, size)
EntryFn = Callable[[slice, Tensor], Tensor]  # (rows, (b, n, C)) -> (b, n), homogeneous in the tensor


@dataclass
class Recording:
    """A batch's forward pass: flat outputs (with autograd history where the backend keeps it)."""

    batch: Batch
    output: Tensor  # (B, L·C)
    shape: torch.Size  # the output tensor's shape before flattening

    @property
    def values(self) -> Tensor:
        """The flat outputs without autograd history."""
        return self.output.detach()


class Backend(ABC):
    """Per-sample products of one model; see the module docstring."""

    name: str

    def __init__(self, view: ModelView) -> None:
        self.view = view
        self.layout = view.layout
        self.directions = DirectionSweep(view)  # its ``progress`` is the public call's
        self._curved: tuple[Batch, list[int]] | None = None  # the last batch asked about, and its answer

    # ------------------------------------------------------------------ primitives
    @abstractmethod
    def record(self, batch: Batch) -> Recording:
        """One forward of ``batch`` kept for back-propagating output vectors."""

    def row_groups(self, batch: Batch, whole: bool = False) -> list[slice]:
        """Consecutive groups of ``batch``'s rows to record one at a time where many vectors are
        pulled back (``whole``: all output numbers of each input together); the whole batch by default."""
        return [slice(0, batch.size)]

    @abstractmethod
    def pieces(self, rec: Recording, v: Tensor, whole: bool = False) -> Iterator[tuple[slice, slice, Pieces]]:
        """Chunks ``(rows, vecs, {index: Jᵢᵀ v_ij on parameter index})``, each ``(b, m', size)``.

        ``rows`` are samples and ``vecs`` vectors of ``v`` (B, m, C); with ``whole=True`` every
        chunk holds all ``m`` vectors (for quantities that mix the vectors of one sample).
        """

    def squares(self, rec: Recording, v: Tensor, last: bool = False) -> Pieces:
        """``Σᵢⱼ (Jᵢᵀ v_ij)²`` entrywise, per parameter tensor (flat). ``last``: no product is asked of
        ``rec`` after this one, so a backend may free the recorded forward as the backward goes."""
        total: Pieces = {}
        for _, _, piece in self.pieces(rec, v):
            for i, g in piece.items():
                sq = g.to(_wide(g.dtype)).square().sum((0, 1))  # a float16 sum over samples overflows
                total[i] = sq if i not in total else total[i].add_(sq)
        return total

    @abstractmethod
    def hessian_columns(self, batch: Batch, w: Tensor, columns: Tensor) -> Tensor:
        """Columns ``∇²_θ (Σᵢ wᵢᵀ o(xᵢ)) e_p`` for flat indices ``columns`` (m,): ``(m, P)``."""

    @abstractmethod
    def output_hessian_diagonals(self, batch: Batch, columns: Tensor) -> Tensor:
        """``∂²o_a(xᵢ)/∂θ_p²`` for ``p`` in ``columns``: ``(m, B, C)``."""

    @abstractmethod
    def output_hessian_columns(self, batch: Batch, columns: Tensor) -> Tensor:
        """``∂²o_a(xᵢ)/∂θ_p∂θ_q`` for ``p`` in ``columns``: ``(m, B, C, P)``."""

    # ------------------------------------------------------------------ first order
    def add_products(self, rec: Recording, v: Tensor, structure: Structure, scale: float = 1.0,
                     last: bool = False) -> None:
        """Add ``scale · Σᵢⱼ (Jᵢᵀ v_ij)(Jᵢᵀ v_ij)ᵀ`` for ``v`` (B, m, C) in ``structure``'s kind;
        ``last``: ``rec``'s last use (see :meth:`squares`)."""
        if structure.product == "squares":
            for i, sq in self.squares(rec, v, last).items():
                structure.add_squares(i, sq, scale)
            return
        for _, _, piece in self.pieces(rec, v):
            if structure.product == "block_rows":
                for i, g in piece.items():
                    structure.add_block_rows(i, g.reshape(-1, g.shape[-1]), scale)
            else:
                structure.add_rows(self._rows(piece), scale)

    def _rows(self, piece: Pieces) -> Tensor:
        """Per-sample products of every parameter side by side: ``(b·m, P)`` (zeros where unused)."""
        some = next(iter(piece.values()))
        parts = []
        for i, size in enumerate(self.layout.sizes):
            g = piece.get(i)
            parts.append(g if g is not None else some.new_zeros(some.shape[:2] + (size,)))
        return torch.cat(parts, dim=-1).reshape(-1, self.layout.num_params)

    def sample_squares(self, rec: Recording, v: Tensor, last: bool = False) -> Tensor:
        """``‖Jᵢᵀ v_ij‖²`` per sample and vector: ``(B, m)``; ``last`` as in :meth:`squares`."""
        total = v.new_zeros(v.shape[0], v.shape[1], dtype=_wide(v.dtype))
        for rows, vecs, piece in self.pieces(rec, v):
            for g in piece.values():
                total[rows, vecs] += g.square().sum(-1).to(total.dtype)
        return total

    def tensor_sample_squares(self, rec: Recording, v: Tensor) -> Pieces:
        """``‖J_{i,t}ᵀ v_ij‖²`` per parameter tensor ``t`` (its columns of the Jacobian), sample and vector:
        ``{index: (B, m)}`` for the tensors the vectors reach, in float32 or wider."""
        out: Pieces = {}
        for rows, vecs, piece in self.pieces(rec, v):
            for i, g in piece.items():
                if i not in out:
                    out[i] = v.new_zeros(v.shape[0], v.shape[1], dtype=_wide(v.dtype))
                out[i][rows, vecs] += g.to(out[i].dtype).square().sum(-1)
        return out

    def vector_elements(self, rec: Recording) -> int:
        """Numbers one output vector's pull-back holds for the whole batch ``rec`` (a backend's estimate;
        default: one per-sample gradient per input, as the whole model's Jacobian takes them)."""
        return rec.batch.size * self.layout.num_params

    def rows_for_whole_outputs(self, rec: Recording, grams: bool = False) -> int:
        """How many inputs of ``rec`` fit in one pull-back of all their output numbers (``grams``: with an
        output Gram matrix per input; :func:`whole_output_rows`); raises when one input does not fit."""
        out = rec.values
        return whole_output_rows(out.shape[0], out.shape[1], self.vector_elements(rec), out.dtype, out.device, grams)

    def _eye(self, rec: Recording, grams: bool = False) -> Tensor:
        """Every output number's unit vector, ``(B, C, C)``: the quantities that need the whole Jacobian of
        each input (closed-form variances, bounds, covariances), after :func:`check_whole_jacobian`
        (``grams``: a ``C × C`` output Gram matrix per input is built from them too)."""
        out = rec.values
        check_whole_jacobian(out.shape[0], out.shape[1], self.vector_elements(rec), out.dtype, out.device, grams)
        eye = identity_like(out.shape[1], out)
        return eye.expand(out.shape[0], -1, -1)

    def entry_quartic(self, rec: Recording, fn: EntryFn) -> Pieces:
        """Per parameter entry ``p``: ``Σᵢ fn(j_p(xᵢ))`` for Jacobian columns ``j_p`` (C,).

        ``fn(rows, cols)`` maps the columns ``(b, n, C)`` of the samples ``rows`` to ``(b, n)`` and
        must be homogeneous of degree 4 in them (``fn(s·j) = s⁴ fn(j)``), which lets a backend
        factor columns such as ``a_k g_u``.
        """
        total: Pieces = {}
        for rows, _, piece in self.pieces(rec, self._eye(rec), whole=True):
            for i, g in piece.items():  # g: (b, C, size) = columns side by side
                value = fn(rows, g.transpose(1, 2)).sum(0)
                total[i] = value if i not in total else total[i].add_(value)
        return total

    def jacobian_pieces(self, rec: Recording) -> Iterator[tuple[slice, Pieces]]:
        """Chunks of per-sample Jacobians: ``(rows, {index: (b, C, size)})``."""
        for rows, _, piece in self.pieces(rec, self._eye(rec), whole=True):
            yield rows, piece

    def tensor_output_grams(self, rec: Recording) -> Iterator[tuple[slice, Pieces]]:
        """Chunks of per-tensor output Gram matrices ``J_{i,t} J_{i,t}ᵀ`` (``t``'s columns of the Jacobian):
        ``(rows, {index: (b, C, C)})``, each tensor's rows once; the memory is checked first."""
        for rows, _, piece in self.pieces(rec, self._eye(rec, grams=True), whole=True):
            yield rows, {i: g @ g.transpose(1, 2) for i, g in piece.items()}

    def output_gram(self, rec: Recording) -> Tensor:
        """Per input ``Jᵢ Jᵢᵀ = Σ_t J_{i,t} J_{i,t}ᵀ``: ``(B, C, C)``."""
        out = rec.values
        chunks = self.tensor_output_grams(rec)
        first = next(chunks, None)  # the memory checked before the sum is allocated
        gram = out.new_zeros(out.shape[0], out.shape[1], out.shape[1], dtype=_wide(out.dtype))
        for rows, grams in chain([first], chunks) if first is not None else ():
            for g in grams.values():
                gram[rows] += g.to(gram.dtype)
        return gram

    # ------------------------------------------------------------------ second order
    def direction_chunks(self, batch: Batch, indices: list[int] | None = None,
                         what: str = "output-Hessian diagonals") -> Iterator[tuple[int, Tensor]]:
        """Parameter index and chunks of flat indices inside it (all parameters by default), sized
        by memory (:mod:`.directions`)."""
        indices = list(range(len(self.layout.names))) if indices is None else indices
        for i, _, columns in self.directions.chunks(batch, [(i, self.layout.span(i)) for i in indices], what):
            yield i, columns  # type: ignore[misc] - every key here is a parameter index

    def curved(self, batch: Batch) -> list[int]:
        """Parameters whose own block ``∂²o/∂θ_p²`` of the output Hessians may be nonzero on ``batch``.

        All but those the outputs depend on piecewise linearly (:mod:`.linearity`), whose blocks vanish
        almost everywhere; second-order sweeps (diagonals, and the blocks of ``structure="blocks"``)
        skip them.
        """
        if self._curved is None or self._curved[0] is not batch:
            linear = linear_parameters(self.view, batch)
            self._curved = (batch, [i for i in range(len(self.layout.names)) if i not in linear])
        return self._curved[1]

    def unfactored(self, batch: Batch) -> list[int]:
        """Curved parameters whose output-Hessian diagonals do not factor by unit (all curved ones, in
        the base backend).

        The factored ones are served by :meth:`unit_hessian_terms` and :meth:`unit_hessian_traces`.
        """
        return self.curved(batch)

    def unit_hessian_traces(self, batch: Batch) -> Pieces:
        """Per factored parameter tensor, ``Σ_{p in it} ∂²o(xᵢ)/∂θ_p²`` as ``(B, C)`` (none in the
        base backend)."""
        return {}

    def unit_hessian_terms(self, batch: Batch, fn: EntryFn, power: int) -> Pieces:
        """Per entry of the factorable parameters, ``Σᵢ fn(∂²o(xᵢ)/∂θ_p²)`` for ``fn`` homogeneous of
        degree ``power // 2`` in the diagonal (none in the base backend)."""
        return {}

    def add_hessian_term(self, batch: Batch, w: Tensor, structure: Structure, scale: float) -> None:
        """Add ``scale · ∇²_θ Σᵢ wᵢᵀ o(xᵢ)`` (``w`` (B, C) held fixed) in ``structure``'s kind."""
        if structure.product == "squares":
            rest = self.unfactored(batch)
            for i, value in self.unit_hessian_terms(batch, lambda rows, d: (d * w[rows].unsqueeze(1)).sum(-1), 2).items():
                structure.add_diagonal(i, value, scale)
            for i, columns in self.direction_chunks(batch, rest):
                diagonals = self.output_hessian_diagonals(batch, columns)  # (m, B, C)
                values = torch.einsum("mbc,bc->m", diagonals, w)
                local = torch.zeros(self.layout.sizes[i], dtype=values.dtype, device=values.device)
                local[columns - self.layout.offsets[i]] = values
                structure.add_diagonal(i, local, scale)
            return
        kept = self.curved(batch) if structure.product == "block_rows" else None  # Full keeps the cross blocks
        for _, columns in self.direction_chunks(batch, kept, what="Hessian columns"):
            structure.add_columns(columns, self.hessian_columns(batch, w, columns), scale)

    def hessian_diagonal_terms(self, batch: Batch, fn: EntryFn) -> Pieces:
        """Per parameter entry ``p``: ``Σᵢ fn(d_p(xᵢ))`` with ``d_p = ∂²o(xᵢ)/∂θ_p²`` (C,).

        ``fn(rows, d)`` maps ``(b, n, C)`` to ``(b, n)`` and is homogeneous of degree 2 in ``d``.
        """
        return self.output_hessian_sweep(batch, 0, fn)[0]

    def output_hessian_traces(self, batch: Batch, width: int) -> Tensor:
        """Per input ``dᵢ = tr ∇²_θ o(xᵢ)`` over the trainable parameters: ``(B, C)``."""
        return self.output_hessian_sweep(batch, width)[1][:, 0]

    def output_hessian_sweep(self, batch: Batch, width: int, fn: EntryFn | None = None,
                             by_tensor: bool = False) -> tuple[Pieces, Tensor]:
        """One sweep over the output-Hessian diagonals ``d_p(xᵢ) = ∂²o(xᵢ)/∂θ_p²`` of every curved entry.

        Returns per entry ``Σᵢ fn(d_p(xᵢ))`` as :meth:`hessian_diagonal_terms` (none without ``fn``),
        and the traces ``Σ_p d_p(xᵢ)`` per input, ``(B, 1, width)``, or with ``by_tensor`` per input
        and parameter tensor, ``(B, T, width)`` (a tensor's sum over its own entries). ``width`` is
        the outputs' ``C`` (0 where the traces are not wanted).
        """
        slots = len(self.layout.names) if by_tensor else 1
        traces = torch.zeros(batch.size, slots, width, dtype=_wide(self.layout.dtype), device=self.layout.device)
        for i, d in self.unit_hessian_traces(batch).items() if width else ():
            traces[:, i if by_tensor else 0] += d
        total = self.unit_hessian_terms(batch, fn, 4) if fn is not None else {}
        for i, columns in self.direction_chunks(batch, self.unfactored(batch)):
            diagonals = self.output_hessian_diagonals(batch, columns)  # (m, B, C)
            if width:
                traces[:, i if by_tensor else 0] += diagonals.sum(0)
            if fn is not None:
                values = fn(slice(None), diagonals.transpose(0, 1)).sum(0)
                local = total.setdefault(i, torch.zeros(self.layout.sizes[i], dtype=values.dtype, device=values.device))
                local[columns - self.layout.offsets[i]] += values
        return total, traces


class NoForwardDerivative(TorchfimError):
    """The model has an operation (or custom autograd function) without the forward-mode derivative that the
    Hessian estimator's second derivatives need; use estimator='score'."""


SHARED_ERRORS.append(NoForwardDerivative)  # a process without rows raises it too, as the ones that met it


@contextmanager
def second_order_support() -> Iterator[None]:
    """Turn torch's missing forward-mode rules, and custom autograd functions that torch.func cannot
    transform, into a clear error naming the alternative."""
    try:
        yield
    except (NotImplementedError, RuntimeError) as err:
        function = _custom_function(err) if "autograd.Function" in str(err) else None  # torch's words for it
        missing = isinstance(err, NotImplementedError) and "forward AD" in str(err)  # torch's words for a missing rule
        module = None if missing or function is not None else _transformed_module(err)
        if not missing and function is None and module is None:  # (a NotImplementedError is a RuntimeError)
            raise
        said = str(err).splitlines()[0][:160]
        what = (f"the model's custom autograd function {function} does not support (it needs the setup_context, "
                "jvp and vmap staticmethods of torch's 'Extending torch.func with autograd.Function', or "
                "generate_vmap_rule=True)" if function is not None else
                f"torch.func cannot run through its module {module} ({said}; a PackedSequence, for one)"
                if module is not None else f"an operation of this model does not support ({said})")
        raise NoForwardDerivative(
            f"the Hessian estimator and its variances need second derivatives by forward-mode AD, which {what}; "
            "use estimator='score' (its variance needs first derivatives only)"
        ) from None


#: torch's words for what its transforms cannot run (functorch's wrapper tensors have no storage of their own).
_TRANSFORM_LIMITS = ("doesn't have storage", "Batching rule not implemented", "vmap", "functorch", "forward-mode",
                     "forward AD")


def _transformed_module(err: BaseException) -> str | None:
    """The class of the innermost module that was running when torch raised ``err``, in its words for what torch.func
    cannot run (:data:`_TRANSFORM_LIMITS`), inside a transform (``jvp``, ``vmap``); None otherwise: a mistake of the
    model's own or a lack of memory stays what it is."""
    if isinstance(err, torch.cuda.OutOfMemoryError) or not any(words in str(err) for words in _TRANSFORM_LIMITS):
        return None
    module, transformed, tb = None, False, err.__traceback__
    while tb is not None:
        transformed = transformed or "torch/_functorch/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")
        owner = tb.tb_frame.f_locals.get("self")
        if transformed and isinstance(owner, torch.nn.Module) and tb.tb_frame.f_code.co_name == "forward":
            module = type(owner).__name__
        tb = tb.tb_next
    return module


def _custom_function(err: BaseException) -> str | None:
    """The name of the ``torch.autograd.Function`` whose ``apply`` raised ``err`` (the innermost), if any."""
    name, tb = None, err.__traceback__
    while tb is not None:
        owner = tb.tb_frame.f_locals.get("cls") if tb.tb_frame.f_code.co_name == "apply" else None
        if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
            name = owner.__qualname__
        tb = tb.tb_next
    return name


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def is_trace(structure: Structure) -> bool:
    """Whether ``structure`` keeps only the trace."""
    return isinstance(structure, Trace)


#: Below this many numbers (0.5 GiB in float64) a whole-output pull-back is not worth reading the free memory for.
WHOLE_OUTPUTS_UNCHECKED = 2**26
#: What the memory errors of whole-output pull-backs begin with.
_WHOLE_OUTPUTS = ("the closed-form variances, bounds and covariances pull back all C = {width:,} output numbers of "
                  "each input together (classes, times positions for outputs with positions)")


def whole_output_entries(width: int, vector_elements: int, grams: int = 0) -> int:
    """Numbers a pull-back of all ``width`` output numbers together holds: the ``C × C`` unit vectors,
    ``C`` times ``vector_elements``, what one vector's pull-back holds (:meth:`Backend.vector_elements`),
    and ``grams`` output Gram matrices ``C × C``."""
    return width * (width * (1 + grams) + vector_elements)


def whole_output_rows(batch: int, width: int, vector_elements: int, dtype: torch.dtype,
                      device: torch.device, grams: bool = False) -> int:
    """How many of ``batch`` inputs can pull back all ``width`` output numbers each together in memory
    (:func:`whole_output_entries`, ``vector_elements`` for the whole batch; ``grams``: with a Gram matrix
    per input): ``batch`` when all of them can. Raises, naming the alternatives, when one input cannot."""
    whole = whole_output_entries(width, vector_elements, batch if grams else 0)
    if whole < WHOLE_OUTPUTS_UNCHECKED:
        return batch
    one = whole_output_entries(width, vector_elements // max(1, batch), int(grams))
    fits, needed, free = fits_in_memory(one, dtype, device)
    if not fits:
        raise TorchfimError(
            f"{_WHOLE_OUTPUTS.format(width=width)}: one input needs about {size_text(needed)}, but {size_text(free)} is "
            f"available on {device}. Use fewer output numbers per input (shorter sequences, or a mask that keeps "
            "fewer positions), or measure the spread of the score estimator instead: fisher(..., estimator='score') "
            "with several generators, or FisherTraceMonitor for Tr(F)"
        )
    fits, needed, free = fits_in_memory(whole, dtype, device)
    return batch if fits else max(1, int(batch * free / needed))


def check_whole_jacobian(batch: int, width: int, vector_elements: int, dtype: torch.dtype,
                         device: torch.device, grams: bool = False) -> None:
    """Refuse, before any of it is allocated, a pull-back of all ``width`` output numbers of each of ``batch``
    inputs that would not fit in memory (:func:`whole_output_rows`); the engine loop has already cut the
    mini-batches it may cut (``run(..., whole=True)``), so what is left names the mini-batch size."""
    most = whole_output_rows(batch, width, vector_elements, dtype, device, grams)
    if most < batch:
        whole = whole_output_entries(width, vector_elements, batch if grams else 0)
        _, needed, free = fits_in_memory(whole, dtype, device)
        raise TorchfimError(
            f"{_WHOLE_OUTPUTS.format(width=width)}: a mini-batch of {batch} inputs needs about {size_text(needed)}, but "
            f"{size_text(free)} is available on {device}; pass mini-batches of at most {most} inputs (an iterable of "
            "batches, e.g. x.split(...))"
        )
