"""The whole-model ``torch.func`` backend: the reference, and a choice (``backend="functional"``).

Works for any module whose forward treats samples independently and that ``torch.func`` can
batch: per-sample vector–Jacobian products ``Jᵢᵀ v`` through ``vmap(vjp)`` of the whole model as a
function of θ, and second derivatives by forward-over-reverse (``jvp`` of ``grad``) or
forward-over-forward (``jvp`` of ``jvp``) along unit directions of θ, taken one parameter tensor at
a time with the others held constant.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch
from torch import Tensor, nn
from torch.func import grad, jacrev, jvp, vjp, vmap

from .._words import agreeing
from ..errors import TorchfimError, warn_user
from .attention_kernel import math_attention
from .backend import CHUNK_ELEMENTS, Backend, Pieces, Recording
from .batch import Batch
from .composites import composite_forms
from .eager_attention import eager_attention, refuse_non_finite, switchable_attention
from .private_tree import settled_key, users_modules_called
from .vector_batching import batched_agrees
from .view import ModelView, fewer_inputs

#: Per user model, how many inputs :meth:`FunctionalBackend._refuse_wrong_batching` checked (1 or 2), with the key of
#: its trainable parameters and forward: later calls on the same model skip the check (it doubled a loop of calls on
#: one input each, in a review).
_BATCHING_CHECKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

#: Modules whose torch.func batching fails in torch 2.13 (their parameter broadcast against the batch): named in the
#: functional backend's refusal.
_UNBATCHED = (nn.PReLU, nn.RReLU)


class FunctionalBackend(Backend):
    """Per-sample products of the whole model through ``torch.func``."""

    name = "functional"

    def __init__(self, view: ModelView) -> None:
        super().__init__(view)
        self._along_theta: set[str] = set()  # tensors whose directions need tangents over all of θ
        self._sample_by_sample = False  # whether output Hessians are taken one sample at a time
        self._reads_checked = False  # see _refuse_reads_outside
        self._batching_key = settled_key(view.user_model)
        cached = _BATCHING_CHECKED.get(view.user_model)
        #: Inputs checked by _refuse_wrong_batching, on this model before or by this backend (2 suffice).
        self._batching_checked = cached[1] if cached is not None and cached[0] == self._batching_key else 0
        self.eager = False  # whether Hugging Face attention runs eagerly under vmap (.eager_attention)

    def _refuse_reads_outside(self, batch: Batch) -> None:
        """Refuse a forward that reads a parameter of θ through a name outside the model (a hook or function
        reading ``model.layer.weight`` from the enclosing scope): it reads the tensor itself, not the stand-in
        that ``functional_call`` puts in the copy's slot, so torch.func would take that use for a constant.
        Found as the parameters that the outputs at stand-ins without autograd history still depend on, on the
        first two inputs of the first batch."""
        self._reads_checked = True
        view, few = self.view, min(2, batch.size)
        real = [p for p in view.model.parameters() if id(p) in view.index_of]
        with torch.enable_grad(), fewer_inputs(few, batch), users_modules_called(view.user_model) as stale:
            out = view.functional(view.params, batch.rows(slice(0, few)))
        if stale or not out.requires_grad:  # a call of the user's module is named by the independence check
            return
        grads = torch.autograd.grad(out, real, torch.ones_like(out), allow_unused=True)
        read = [view.layout.names[view.index_of[id(p)]] for p, g in zip(real, grads) if g is not None]
        if read:
            raise TorchfimError(
                f"the model's forward reads {agreeing(len(read), 'parameter')} {', '.join(map(repr, read[:3]))}"
                f"{f' and {len(read) - 3} more' if len(read) > 3 else ''} through a name outside "
                "the model (e.g. a hook or function that reads model.layer.weight from the enclosing scope), which "
                "torch.func's functional calls cannot follow; use backend='auto' (it differentiates such "
                "parameters by autograd, one sample at a time), or read them through the module (the hook's "
                "module argument, or self)"
            )

    def record(self, batch: Batch) -> Recording:
        with torch.no_grad():
            raw = self.view.to_tensor(batch.call(self.view.model), batch)
        if not self._reads_checked:
            self._refuse_reads_outside(batch)
        return Recording(batch, self.view.flat(raw), raw.shape)

    def _refuse_wrong_batching(self, rec: Recording) -> None:
        """Refuse a model whose per-sample products through torch.func (:meth:`vector_jacobian`, batched over samples
        and output vectors) differ from autograd's, one input and one vector at a time, on the first inputs (two,
        once a batch has them) and two random vectors: a batching rule of this torch build that gives wrong numbers
        (PReLU's, cdist's in torch 2.13) made this backend's Fisher 9-70% off, silently (a review)."""
        few = min(2, rec.batch.size)
        rows = rec.batch.rows(slice(0, few))
        v = torch.randn((few, 2, rec.values.shape[1]), dtype=rec.values.dtype, device=rec.values.device,
                        generator=torch.Generator(device=rec.values.device).manual_seed(0))
        got = self.vector_jacobian(rows, v)
        params = {n: t.detach().requires_grad_() for n, t in self.view.params.items()}
        want = torch.zeros_like(got)
        with torch.enable_grad():
            for i in range(few):
                out = self.view.functional(params, rows.rows(slice(i, i + 1)))[0]
                for j in range(2):
                    grads = torch.autograd.grad(out, list(params.values()), v[i, j], retain_graph=True,
                                                allow_unused=True)
                    want[i, j] = self.view.flatten_params([torch.zeros_like(p) if g is None else g
                                                           for p, g in zip(params.values(), grads)])
        # to the rounding of the least precise dtype of the parameters and outputs (a model of several dtypes)
        coarsest = max([t.dtype for t in params.values()] + [rec.values.dtype], key=lambda d: torch.finfo(d).eps)
        if not batched_agrees(got, want, coarsest):
            known = sorted({type(m).__name__ for m in self.view.model.modules() if isinstance(m, _UNBATCHED)})
            named = f"; torch.func has no working batching rule for its nn.{', nn.'.join(known)}" if known else ""
            raise TorchfimError(
                "backend='functional': torch.func's per-sample gradients of this model differ from autograd's, one "
                "input at a time (a batching rule of this torch build gives wrong numbers, as PReLU's or "
                f"torch.cdist's in torch 2.13){named}; use backend='auto', whose coverage check finds such modules "
                "and computes them one sample at a time"
            )
        self._batching_checked = few
        _BATCHING_CHECKED[self.view.user_model] = (self._batching_key, few)

    def row_chunks(self, batch: int, vectors: int) -> Iterator[slice]:
        """Slices of a batch small enough that ``b·m·P`` stays under :data:`CHUNK_ELEMENTS`."""
        step = max(1, CHUNK_ELEMENTS // max(1, vectors * self.layout.num_params))
        for start in range(0, batch, step):
            yield slice(start, min(batch, start + step))

    def vector_jacobian(self, batch: Batch, v: Tensor) -> Tensor:
        """Per-sample products ``G[i, j] = Jᵢᵀ v[i, j]`` for ``v`` (B, m, C): ``(B, m, P)``."""
        view = self.view
        arg_dims, kw_dims = batch.sample_dims()

        def per_sample(args: tuple, kwargs: dict, v1: Tensor) -> Tensor:
            single = batch.one_sample(args, kwargs)

            def out(p: dict[str, Tensor]) -> Tensor:
                return view.functional(p, single).squeeze(0)

            _, pullback = vjp(out, view.params)
            (g,) = vmap(pullback)(v1)
            return view.flatten_params(g, lead=1)

        try:  # the math attention kernel has batching rules; the fused CPU ones run sample by sample, warning
            with math_attention():
                return self._over_samples(lambda: vmap(per_sample, in_dims=(arg_dims, kw_dims, 0))(
                    batch.args, batch.kwargs, v))
        except (RuntimeError, NotImplementedError) as err:
            known = sorted({type(m).__name__ for m in view.model.modules() if isinstance(m, _UNBATCHED)})
            named = f"; torch.func has no working batching rule for its nn.{', nn.'.join(known)}" if known else ""
            raise TorchfimError(
                "backend='functional' cannot batch this model through torch.func "
                f"({str(err).splitlines()[0][:160]}){named}; use backend='auto', whose generic rule computes such "
                "modules one sample at a time"
            ) from None

    def _over_samples(self, batched: Callable[[], Tensor]) -> Tensor:
        """``batched()``, a computation under ``vmap`` over the samples; where torch.func cannot batch it and the model
        holds a Hugging Face model with SDPA attention (whose mask code asks whether the padding mask is all ones), again
        with eager attention, from then on (:mod:`.eager_attention`)."""
        try:
            with eager_attention(self.view.model) if self.eager else nullcontext():
                result = batched()
                refuse_non_finite(result, self.eager)
                return result
        except (RuntimeError, NotImplementedError):
            if self.eager or not switchable_attention(self.view.model):
                raise
            self.eager = True
        with eager_attention(self.view.model):
            result = batched()
        refuse_non_finite(result, True)
        return result

    def pieces(self, rec: Recording, v: Tensor, whole: bool = False) -> Iterator[tuple[slice, slice, Pieces]]:
        if self._batching_checked < min(2, rec.batch.size):  # after the loop's checks of the model, which say more
            self._refuse_wrong_batching(rec)
        spans = [self.layout.span(i) for i in range(len(self.layout.names))]
        for rows in self.row_chunks(rec.batch.size, v.shape[1]):
            g = self.vector_jacobian(rec.batch.rows(rows), v[rows])
            yield rows, slice(None), {i: g[..., span] for i, span in enumerate(spans)}

    # ------------------------------------------------------------------ second order
    def _tensor_directions(self, columns: Tensor) -> Iterator[tuple[str, Tensor]]:
        """The unit directions ``e_p``, ``p`` in ``columns`` (ascending), grouped by the parameter
        tensor that holds them: ``(name, (m_i, *shape))`` per tensor, in the order of ``columns``.

        Differentiating along one tensor alone, with every other parameter a constant, lets
        forward-mode AD skip the layers before it and the tangents of all other weights: 1.2-3.5×
        faster per direction on the benchmark ResNet (stem to last convolution) than along θ.
        """
        layout = self.layout
        owners = torch.bucketize(columns.cpu(), torch.tensor(layout.offsets[1:]), right=True)
        for i in owners.unique_consecutive().tolist():
            local = columns[owners.to(columns.device) == i] - layout.offsets[i]
            # in the tensor's own dtype (a model of several dtypes): forward-mode AD takes no tangent of another
            dtype = self.view.params[layout.names[i]].dtype
            basis = torch.zeros(len(local), layout.sizes[i], dtype=dtype, device=layout.device)
            basis[torch.arange(len(local), device=layout.device), local] = 1
            yield layout.names[i], basis.reshape(len(local), *layout.shapes[i])

    def _with(self, name: str | None, value: Tensor | dict[str, Tensor]) -> dict[str, Tensor]:
        """The parameters with ``value`` for tensor ``name`` (for all of them when ``name`` is None)."""
        return {**self.view.params, **value} if name is None else {**self.view.params, name: value}

    def _at(self, name: str | None) -> Tensor | dict[str, Tensor]:
        """The current value of tensor ``name`` (of all parameters when ``name`` is None), as the primal of a ``jvp``:
        contiguous, since ``make_dual`` refuses a primal whose elements share memory (a stride-0 parameter,
        ``nn.Parameter(w.expand(5, 4))``: "more than one element of the written-to tensor refers to a single
        memory location")."""
        if name is None:
            return {n: p.contiguous() for n, p in self.view.params.items()}
        return self.view.params[name].contiguous()

    def _along_each_tensor(self, columns: Tensor, derivative: Callable[[str | None, object], Tensor]) -> Tensor:
        """``derivative(name, d)`` for every unit direction ``d`` of ``columns``, stacked: ``(m, ...)``, with
        layer norms and attention in their composite forms (:func:`.composite_forms`).

        Where the outputs of an operation are linear in the one tensor, forward-mode AD keeps their
        second-order tangent as an immutable zero, which an in-place operation after it (a
        ``ReLU(inplace=True)`` after a BatchNorm's weight) refuses; those directions are then taken
        along all of θ (``name`` None, ``d`` a dict of tangents), where every tangent is an ordinary tensor.
        """
        parts = []
        with composite_forms():  # layer norms and attention in forms that forward-mode AD gets right
            for name, basis in self._tensor_directions(columns):
                if name not in self._along_theta:  # once refused, not tried again
                    try:
                        parts.append(vmap(lambda d, n=name: derivative(n, d))(basis))
                        continue
                    except RuntimeError as err:
                        if "ZeroTensors are immutable" not in str(err):
                            raise
                        self._along_theta.add(name)
                parts.append(vmap(lambda d: derivative(None, d))(self._embedded(name, basis)))
        return torch.cat(parts)

    def _embedded(self, name: str, basis: Tensor) -> dict[str, Tensor]:
        """Directions ``basis`` (m, *shape) of tensor ``name`` as tangents of all parameters (zeros elsewhere)."""
        return {n: basis if n == name else p.new_zeros((basis.shape[0], *p.shape)) for n, p in self.view.params.items()}

    def hessian_columns(self, batch: Batch, w: Tensor, columns: Tensor) -> Tensor:
        view = self.view

        def column(name: str | None, d: object) -> Tensor:
            def gradient(value: object) -> Tensor:
                g = grad(lambda p: (w * view.functional(p, batch)).sum())(self._with(name, value))
                return view.flatten_params(g)

            return jvp(gradient, (self._at(name),), (d,))[1]

        return self._along_each_tensor(columns, column)

    def output_hessian_diagonals(self, batch: Batch, columns: Tensor) -> Tensor:
        view = self.view

        def second(name: str | None, d: object) -> Tensor:
            def first(value: object) -> Tensor:
                return jvp(lambda v: view.functional(self._with(name, v), batch), (value,), (d,))[1]

            return jvp(first, (self._at(name),), (d,))[1]

        return self._along_each_tensor(columns, second)

    def output_hessian_columns(self, batch: Batch, columns: Tensor) -> Tensor:
        """Per sample, the columns ``columns`` of the output Hessians: ``(m, B, C, P)``.

        The samples are batched by ``vmap``; where torch.func cannot batch the model over its inputs
        (a recurrent layer), they are taken one at a time, with a one-time warning.
        """
        if not self._sample_by_sample:
            try:
                return self._over_samples(lambda: self._along_each_tensor(columns, self._hessian_column(batch, False)))
            except RuntimeError as err:
                self._sample_by_sample = True
                warn_user(
                    "torchfim: torch.func cannot batch this model over its inputs for the output Hessians "
                    f"({str(err).splitlines()[0][:120]}); they are computed one sample at a time, which is "
                    "correct but slower"
                )
        return self._along_each_tensor(columns, self._hessian_column(batch, looped=True))

    def _hessian_column(self, batch: Batch, looped: bool) -> Callable[[str | None, object], Tensor]:
        """``(name, d) ↦`` the derivative along ``d`` of every sample's output Jacobian, ``(B, C, P)``:
        the samples batched by ``vmap``, or one at a time where ``looped``."""
        view = self.view
        arg_dims, kw_dims = batch.sample_dims()

        def column(name: str | None, d: object) -> Tensor:
            def single(value: object, args: tuple, kwargs: dict) -> Tensor:
                one = batch.one_sample(args, kwargs)
                jac = jacrev(lambda p: view.functional(p, one).squeeze(0))(self._with(name, value))
                return view.flatten_params(jac, lead=1)

            def jacobians(value: object) -> Tensor:
                if not looped:
                    return vmap(lambda a, k: single(value, a, k), in_dims=(arg_dims, kw_dims))(batch.args, batch.kwargs)
                return torch.stack([single(value, *batch.sample_at(i, (arg_dims, kw_dims))) for i in range(batch.size)])

            return jvp(jacobians, (self._at(name),), (d,))[1]

        return column
