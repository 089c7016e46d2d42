"""The per-module backend: one recorded forward, output vectors pushed back, a rule per module.

One forward per mini-batch records every module that owns trainable parameters (its inputs, and
its outputs as taps); output-space vectors are back-propagated through it by autograd, batched,
to the taps, which gives each call its output sensitivities; each module's rule
(:mod:`torchfim.engine.modules`) turns them into per-sample products of its own parameters. A
parameter used by several calls (a module called twice, weight tying) gets the sum of its calls'
per-sample gradients before anything is squared. Parameters used outside every recorded call
(in another module's forward) are found on the first batch by comparing the summed per-sample
gradients with autograd's batch gradient, and go to a generic rule over the whole model. The
recorded forward itself is :mod:`.recording`'s.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..errors import TorchfimError
from .backend import CHUNK_ELEMENTS, Backend, EntryFn, Pieces
from .batch import Batch
from .coverage_check import CoverageCheck
from .factored import shared_squared_norms
from .functional import FunctionalBackend
from .modules import Call, GenericRule, LinearRule, Rule
from .modules.base import as_float
from .modules.linear import total_of
from .pullback import Consumer, consumable, handed_to, pull_back
from .recording import ModuleRecording, may_attend
from .row_groups import groups_of_rows
from .second_order import UnitHessians
from .view import PARAMETERS_CHANGED, ModelView

#: Elements of per-sample gradients built at once for squares: small enough to stay in cache.
CACHE_ELEMENTS = 2**21
#: Elements of the output sensitivities of one group of vectors.
GROUP_ELEMENTS = 2**22
#: Numbers the taps of one vector's pull-back hold, from which :meth:`PerModuleBackend._walk` hands the
#: sensitivities to the rules during the backward instead of keeping them all until it ends. Below it
#: the memory at stake is small and a pull-back skips the walk down the graph that consuming needs. The
#: benchmark ResNet's taps hold 38 M, the transformer's 24 M; the test models' under 1 M.
STREAM_ELEMENTS = 2**22


class PerModuleBackend(CoverageCheck, Backend):
    """Per-sample products from per-module rules; see the module docstring."""

    name = "modules"

    def __init__(self, view: ModelView, offers_functional: bool = True) -> None:
        super().__init__(view)
        self.offers_functional = offers_functional  # see loop.make_backend
        self.functional = FunctionalBackend(view)
        self.uses: dict[int, int] = {}
        self._last_units: tuple[Batch, UnitHessians] | None = None
        self._init_coverage()
        self._attends = may_attend(view.model)

    def row_groups(self, batch: Batch, whole: bool = False) -> list[slice]:
        return groups_of_rows(batch, self.view.user_model, lambda part: self._record(part, clone=False), whole)

    # --------------------------------------------------------------- sensitivities
    def _sensitivities(self, rec: ModuleRecording, v: Tensor, consumers: dict[int, Consumer] | None = None,
                       release: bool = False) -> list[list[Tensor | None]]:
        """Per call, per tap: ``∂(vᵀo)/∂tap`` as ``(m, B, *tap)`` (None where the vectors do not reach);
        ``consumers`` and ``release`` as in :func:`.pullback.pull_back`."""
        if rec.released:
            raise TorchfimError("internal: a recording was used after its last pull-back released it")
        try:
            return pull_back(rec.output, [call for _, call in rec.calls], v, consumers, release, self.one_by_one)
        except RuntimeError as err:  # autograd saw a parameter updated in place since the forward
            if "modified by an inplace operation" in str(err):
                raise TorchfimError(PARAMETERS_CHANGED) from None
            raise

    def _streamed(self, rec: ModuleRecording) -> set[int]:
        """Single-use calls whose sensitivities :meth:`_walk` consumes during the backward, one vector at a
        time: all it can take where the taps hold at least :data:`STREAM_ELEMENTS` numbers per vector."""
        if rec.tap_elements < STREAM_ELEMENTS:
            return set()
        calls = [call for _, call in rec.calls]
        return {k for k in consumable(calls) if self._single(rec.calls[k][0])}

    def _groups(self, rec: ModuleRecording, m: int, whole: bool) -> Iterator[slice]:
        step = m if whole else max(1, GROUP_ELEMENTS // max(1, rec.tap_elements))
        for start in range(0, m, step):
            yield slice(start, min(m, start + step))

    def _row_step(self, vectors: int, budget: int, indices: set[int] | None = None) -> int:
        size = sum(self.layout.sizes[i] for i in indices) if indices is not None else self.layout.num_params
        return max(1, budget // max(1, vectors * size))

    def vector_elements(self, rec: ModuleRecording) -> int:
        return rec.tap_elements

    # ----------------------------------------------------------------- products
    def pieces(self, rec: ModuleRecording, v: Tensor, whole: bool = False) -> Iterator[tuple[slice, slice, Pieces]]:
        for vecs in self._groups(rec, v.shape[1], whole):
            sens = self._sensitivities(rec, v[:, vecs])
            step = self._row_step(vecs.stop - vecs.start, CHUNK_ELEMENTS)
            for start in range(0, rec.batch.size, step):
                rows = slice(start, min(rec.batch.size, start + step))
                yield rows, vecs, self._summed(rec, sens, rows, None)

    def _summed(self, rec: ModuleRecording, sens: list, rows: slice, only: set[int] | None) -> Pieces:
        """Per-sample gradients of ``rows`` summed over the calls of each parameter (``only`` these).

        Calls with :attr:`.Rule.sparse_grads` of a shared parameter (a lookup table tied to the output
        layer) come last and add their few entries into the sum the other uses built
        (:meth:`.Rule.add_grads`), in place where no input or sensitivity of the recording shares its
        storage.
        """
        total: Pieces = {}
        lookups = []
        for (rule, call), s in zip(rec.calls, sens):
            if only is not None and not (set(rule.params.values()) & only):
                continue
            if not s or all(t is None for t in s):
                continue
            if rule.sparse_grads and not self._single(rule):
                lookups.append((rule, call, s))
                continue
            for i, g in rule.grads(call, s, rows).items():
                if only is None or i in only:
                    total[i] = g if i not in total else total[i] + g
        for rule, call, s in lookups:
            for i in rule.params.values():
                if only is not None and i not in only:
                    continue
                if i not in total:
                    total[i] = rule.grads(call, s, rows)[i]
                else:  # out of place where the sum so far is a view of what the recording holds
                    add = Rule.add_grads if rec.holds_storage_of(total[i], sens) else type(rule).add_grads
                    total[i] = add(rule, call, s, rows, total[i], i)
        return total

    def _single(self, rule: Rule) -> bool:
        return all(self.uses.get(i, 0) == 1 for i in rule.params.values())

    def _single_chunks(self, rule: Rule, call: Call, s: list, m: int) -> Iterator[tuple[slice, Pieces]]:
        """Per-sample gradients of one single-use call, in chunks sized for its rule."""
        budget = CHUNK_ELEMENTS if isinstance(rule, GenericRule) else CACHE_ELEMENTS
        step = max(1, budget // max(1, m * rule.size()))
        for start in range(0, call.size, step):
            rows = slice(start, min(call.size, start + step))
            yield rows, rule.grads(call, s, rows)

    def _walk(self, rec: ModuleRecording, v: Tensor, fast: Callable[[Rule, Call, list], object | None],
              on_fast: Callable[[slice, object], None], on_grads: Callable[[slice, slice, Pieces], None],
              last: bool = False, on_norms: Callable[[slice, Pieces], None] | None = None) -> None:
        """Every call's products for ``v``: a rule's shortcut ``fast`` where it has one and the call is
        its parameters' only use (``on_fast(vecs, result)``), else per-sample gradients in chunks
        (``on_grads(rows, vecs, grads)``), summed over the calls of a shared parameter first; with
        ``on_norms`` (squared norms asked for), a shared parameter's norms from its uses' factors where they
        have them (:mod:`.factored`; ``on_norms(vecs, {index: (B, m)})``). ``last``: the recording's last
        use; where it streams, its final pull-back frees it as it goes."""
        streamed = self._streamed(rec)
        last = last and bool(streamed)  # a small recording stays: freeing it early only moves glibc's trims
        for vecs in self._groups(rec, v.shape[1], False):
            m = vecs.stop - vecs.start

            def visit(rule: Rule, call: Call, s: list, vecs: slice = vecs, m: int = m) -> None:
                result = fast(rule, call, s)
                if result is not None:
                    on_fast(vecs, result)
                    return
                for rows, grads in self._single_chunks(rule, call, s, m):
                    on_grads(rows, vecs, grads)

            consumers = {k: handed_to(visit, *rec.calls[k]) for k in streamed} if m == 1 else {}
            sens = self._sensitivities(rec, v[:, vecs], consumers, release=last and vecs.stop == v.shape[1])
            shared: set[int] = set()
            for (rule, call), s in zip(rec.calls, sens):
                if all(t is None for t in s):
                    continue
                if not self._single(rule):
                    shared.update(rule.params.values())
                    continue
                visit(rule, call, s)
            factored = shared_squared_norms(rec.calls, sens, shared, self.layout.sizes) if on_norms and shared else {}
            if factored:
                on_norms(vecs, factored)
                shared -= set(factored)
            if shared:  # parameters of several calls: their gradients are summed before squaring
                step = self._row_step(m, CHUNK_ELEMENTS, shared)
                for start in range(0, rec.batch.size, step):
                    rows = slice(start, min(rec.batch.size, start + step))
                    on_grads(rows, vecs, self._summed(rec, sens, rows, shared))
        if last:
            rec.release()

    def squares(self, rec: ModuleRecording, v: Tensor, last: bool = False) -> Pieces:
        total: Pieces = {}

        def add(i: int, sq: Tensor) -> None:
            total[i] = sq if i not in total else total[i].add_(sq)

        def from_fast(vecs: slice, result: Pieces) -> None:
            for i, sq in result.items():
                add(i, sq)

        def from_grads(rows: slice, vecs: slice, grads: Pieces) -> None:
            for i, g in grads.items():
                add(i, as_float(g).square_().sum((0, 1)))  # a float16 sum overflows

        self._walk(rec, v, lambda r, c, s: r.squares(c, s), from_fast, from_grads, last)
        return total

    def sample_squares(self, rec: ModuleRecording, v: Tensor, last: bool = False) -> Tensor:
        wide = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
        fast: dict[int, Tensor] = {}  # the rules' shortcuts summed per group of vectors (by its first)
        total = []  # the sum over per-sample gradients, allocated by the first chunk of them

        def from_fast(vecs: slice, result: Tensor) -> None:
            fast[vecs.start] = fast[vecs.start] + result if vecs.start in fast else result.to(wide)

        def from_grads(rows: slice, vecs: slice, grads: Pieces) -> None:
            total[:] = total or [v.new_zeros(v.shape[0], v.shape[1], dtype=wide)]
            for g in grads.values():
                total[0][rows, vecs] += as_float(g).square().sum(-1).to(wide)

        self._walk(rec, v, lambda r, c, s: r.sample_squares(c, s), from_fast, from_grads, last,
                   lambda vecs, norms: from_fast(vecs, total_of(norms)))
        if not total and list(fast) == [0] and fast[0].shape[1] == v.shape[1]:
            return fast[0]  # one group, all shortcuts (a small window's usual case): no sums into slices
        out = total[0] if total else v.new_zeros(v.shape[0], v.shape[1], dtype=wide)
        for start, part in fast.items():
            out[:, start : start + part.shape[1]] += part
        return out

    def tensor_sample_squares(self, rec: ModuleRecording, v: Tensor) -> Pieces:
        wide = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
        out: defaultdict[int, Tensor] = defaultdict(lambda: v.new_zeros(v.shape[0], v.shape[1], dtype=wide))

        def from_fast(vecs: slice, result: Pieces) -> None:
            for i, t in result.items():
                out[i][:, vecs] += t.to(wide)

        def from_grads(rows: slice, vecs: slice, grads: Pieces) -> None:
            for i, g in grads.items():
                out[i][rows, vecs] += as_float(g).square().sum(-1).to(wide)

        self._walk(rec, v, lambda r, c, s: r.tensor_sample_squares(c, s), from_fast, from_grads, on_norms=from_fast)
        return dict(out)

    def _dense_split(self, rec: ModuleRecording) -> tuple[list[tuple[Rule, Call, int]], set[int]]:
        """Dense single-use Linear calls (with their position in ``rec.calls``) and the other parameters."""
        dense = [(r, c, k) for k, (r, c) in enumerate(rec.calls)
                 if isinstance(r, LinearRule) and self._single(r) and r.unit_input(c) is not None]
        covered = {i for r, _, _ in dense for i in r.params.values()}
        return dense, set(range(len(self.layout.names))) - covered

    def entry_quartic(self, rec: ModuleRecording, fn: EntryFn) -> Pieces:
        """Dense layers: column ``a_k g_u`` of weight ``(u, k)`` gives ``fn = a_k⁴ fn(g_u)``, so ``fn`` runs
        per unit and is spread over the inputs (docs/math.md §6); other parameters column by column."""
        dense, rest = self._dense_split(rec)
        eye = self._eye(rec)
        sens = self._sensitivities(rec, eye)
        total: Pieces = {}
        for rule, call, k in dense:
            if not sens[k] or sens[k][0] is None:
                continue
            a = as_float(rule.unit_input(call))  # a⁴ overflows float16 from |a| = 16
            t = fn(slice(None), sens[k][0].permute(1, 2, 0))  # columns g_u per sample: (B, out, C) → (B, out)
            dtype = torch.promote_types(t.dtype, a.dtype)  # a float32 layer under float64 outputs: both float64
            t, a = t.to(dtype), a.to(dtype)
            if "weight" in rule.params:
                total[rule.params["weight"]] = (t.T @ a**4).reshape(-1)
            if "bias" in rule.params:
                total[rule.params["bias"]] = t.sum(0)
        if rest:
            step = self._row_step(eye.shape[1], CHUNK_ELEMENTS, rest)
            for start in range(0, rec.batch.size, step):
                rows = slice(start, min(rec.batch.size, start + step))
                for i, g in self._summed(rec, sens, rows, rest).items():
                    value = fn(rows, g.transpose(1, 2)).sum(0)
                    total[i] = value if i not in total else total[i].add_(value)
        return total

    def tensor_output_grams(self, rec: ModuleRecording) -> Iterator[tuple[slice, Pieces]]:
        """Dense layers by their factors, ``‖a‖² G Gᵀ`` for the weight and ``G Gᵀ`` for the bias with
        ``G = ∂o/∂z`` (C × units) per sample, all rows at once; other parameters from their Jacobians."""
        dense, rest = self._dense_split(rec)
        eye = self._eye(rec, grams=True)
        sens = self._sensitivities(rec, eye)
        every = slice(0, rec.batch.size)
        for rule, call, k in dense:
            if not sens[k] or sens[k][0] is None:
                continue
            a, g = as_float(rule.unit_input(call)), as_float(sens[k][0])
            units = torch.einsum("cbu,dbu->bcd", g, g)
            grams = {rule.params["weight"]: units * a.square().sum(1)[:, None, None]} if "weight" in rule.params else {}
            yield every, {**grams, **({rule.params["bias"]: units} if "bias" in rule.params else {})}
        if rest:
            step = self._row_step(eye.shape[1], CHUNK_ELEMENTS, rest)
            for start in range(0, rec.batch.size, step):
                rows = slice(start, min(rec.batch.size, start + step))
                yield rows, {i: as_float(g) @ as_float(g).transpose(1, 2) for i, g in
                             self._summed(rec, sens, rows, rest).items()}

    # ------------------------------------------------------------------ second order
    def _units(self, batch: Batch) -> UnitHessians:
        """The batch's factorable layers, recorded once however many questions are asked of them."""
        if self._last_units is None or self._last_units[0] is not batch:
            curved = self.curved(batch)
            kept = set(curved)
            # dense Linear layers whose parameters only that call uses: their unit Hessians factor
            layers = [(r, c) for r, c, _ in self._dense_split(self.record(batch))[0] if kept.intersection(r.params.values())]
            self._last_units = (batch, UnitHessians(self.view, batch, layers, curved))
        return self._last_units[1]

    def unfactored(self, batch: Batch) -> list[int]:
        return self._units(batch).unfactored()

    def unit_hessian_terms(self, batch: Batch, fn: EntryFn, power: int) -> Pieces:
        return self._units(batch).terms(fn, power)

    def unit_hessian_traces(self, batch: Batch) -> Pieces:
        return self._units(batch).traces()

    def hessian_columns(self, batch: Batch, w: Tensor, columns: Tensor) -> Tensor:
        self._refuse_own_tensors(columns)
        return self.functional.hessian_columns(batch, w, columns)

    def output_hessian_diagonals(self, batch: Batch, columns: Tensor) -> Tensor:
        self._refuse_own_tensors(columns)
        return self.functional.output_hessian_diagonals(batch, columns)

    def output_hessian_columns(self, batch: Batch, columns: Tensor) -> Tensor:
        self._refuse_own_tensors(columns)
        return self.functional.output_hessian_columns(batch, columns)

    def _refuse_own_tensors(self, columns: Tensor) -> None:
        """Refuse second derivatives along parameters whose generic rule differentiates the tensors themselves
        (:attr:`.modules.GenericRule.on_own_tensors`): forward-mode AD along a stand-in cannot follow the
        read through a name outside the model that put them there."""
        layout = self.layout
        own = sorted({i for rule in self.rules.values() if isinstance(rule, GenericRule) and rule.on_own_tensors
                      for i in rule.params.values()})
        hit = [layout.names[i] for i in own
               if bool(((columns >= layout.offsets[i]) & (columns < layout.offsets[i] + layout.sizes[i])).any())]
        if hit:
            raise TorchfimError(
                f"the Hessian estimator and its variances need second derivatives of {', '.join(map(repr, hit[:3]))}, "
                "which the model reads through a name outside it (a hook or function reading model.layer.weight "
                "from the enclosing scope): autograd follows that read, forward-mode AD cannot; use "
                "estimator='score' (first derivatives only), or read them through the module (the hook's module "
                "argument, or self)"
            )
