"""Parameters the outputs depend on piecewise linearly, found by tracing the batch's forward.

If every path from a parameter tensor ``θ_p`` to the outputs ``o`` multiplies by ``θ_p`` once and
otherwise only adds, selects, reshapes, pools or passes through kinks such as ReLU's, then ``o`` is
piecewise linear in ``θ_p`` (the other parameters held fixed), and the whole block ``∂²o/∂θ_p²``
is zero wherever the kinks do not sit exactly at the input (almost everywhere; forward-mode AD
returns exact zeros there as well). This holds for every parameter of a network made of Linear,
Conv, Embedding and eval-mode BatchNorm layers joined by ReLU, max or mean pooling and residual
sums, and for the last layer of any network; it fails for tanh, softmax, attention, LayerNorm,
weight tying or a product of two activations. The engine skips those blocks' second-derivative
sweeps: on a convolutional network they would take one forward-mode pass per parameter entry
(docs/math.md §6.4).

:func:`linear_parameters` runs the model's forward on the batch under a ``TorchFunctionMode`` that
tracks, for every tensor made, the parameters it depends on linearly (``L``) and those it may
depend on otherwise (``N``):

* a parameter is ``L = {p}``; any other input (data, buffers, frozen weights) has empty sets, and so
  do detached tensors and piecewise-constant results (comparisons, signs, indices);
* operations piecewise linear in all their tensors together (sums, selection, reshaping, pooling,
  ReLU and other kinks, Dropout) take the unions;
* products linear in each tensor factor (``mul``, ``matmul``, ``linear``, convolutions,
  ``embedding``, eval-mode ``batch_norm``; division by a tensor without parameters): a parameter in
  ``L`` of exactly one factor stays in ``L``; one in two factors, or in any ``N``, goes to ``N``;
* every other operation moves everything to ``N``.

The answer is ``L(o) − N(o)``. An in-place change of a tensor that has views, or of a view, that
would change its sets cannot be followed through the aliases, so then no parameter is reported.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .batch import Batch
from .view import ModelView

Sets = tuple[frozenset, frozenset]
_EMPTY: Sets = (frozenset(), frozenset())

#: Piecewise linear in all tensor arguments together.
_JOINT = frozenset("""
relu relu_ relu6 leaky_relu leaky_relu_ hardtanh hardtanh_ threshold threshold_ clamp clamp_ clip clip_
clamp_min clamp_max abs absolute neg negative positive __neg__ __pos__ max min amax amin maximum minimum fmax
fmin max_pool1d max_pool2d max_pool3d _max_pool1d _max_pool2d _max_pool3d max_pool1d_with_indices
max_pool2d_with_indices max_pool3d_with_indices adaptive_max_pool1d adaptive_max_pool2d adaptive_max_pool3d
_adaptive_max_pool1d _adaptive_max_pool2d _adaptive_max_pool3d adaptive_max_pool1d_with_indices
adaptive_max_pool2d_with_indices adaptive_max_pool3d_with_indices avg_pool1d avg_pool2d avg_pool3d
adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d dropout dropout_ dropout1d dropout2d dropout3d
feature_dropout alpha_dropout feature_alpha_dropout view view_as reshape reshape_as flatten unflatten ravel
permute transpose transpose_ swapaxes swapdims t T mT contiguous __getitem__ __setitem__ squeeze squeeze_
unsqueeze unsqueeze_ expand expand_as broadcast_to repeat tile narrow select split split_with_sizes chunk
unbind tensor_split index_select gather take_along_dim clone to float double half bfloat16 type_as movedim
moveaxis roll flip pad constant_pad_nd sum mean cumsum diagonal tril triu masked_fill masked_fill_ where cat
concat concatenate stack hstack vstack add add_ sub sub_ subtract rsub __add__ __radd__ __iadd__ __sub__
__rsub__ __isub__ pixel_shuffle pixel_unshuffle unfold fold
""".split())
#: Linear in each tensor argument (all of them factors of one product).
_PRODUCT = frozenset("""
mul mul_ multiply __mul__ __rmul__ __imul__ matmul __matmul__ __rmatmul__ mm bmm mv dot inner outer einsum
tensordot linear bilinear conv1d conv2d conv3d conv_transpose1d conv_transpose2d conv_transpose3d convolution
addmm addmv addbmm baddbmm embedding batch_norm
""".split())
#: Division: linear in the numerator when the denominator carries no parameter.
_DIVIDE = frozenset("div div_ divide true_divide __truediv__ __itruediv__".split())
#: Results that carry no parameter (detached or fresh tensors), or are piecewise constant in every input
#: (comparisons, signs, indices: zero derivatives almost everywhere).
_CONSTANT = frozenset("""
detach detach_ zeros_like ones_like empty_like full_like rand_like randn_like gt lt ge le eq ne greater less
greater_equal less_equal __gt__ __lt__ __ge__ __le__ __eq__ __ne__ sign signbit argmax argmin argsort isnan isinf
isfinite logical_not logical_and logical_or
""".split())


def linear_parameters(view: ModelView, batch: Batch) -> frozenset[int]:
    """Indices (in ``view.layout``) of the parameters the outputs of ``batch`` depend on piecewise
    linearly; empty where the forward cannot be traced (the computation raises its own error)."""
    tracker = _Tracker(view.index_of)
    try:
        with torch.no_grad(), tracker:
            out = view.flat(view.to_tensor(batch.call(view.model)))
    except Exception:  # noqa: BLE001 - the second-order computation itself raises it, with its own message
        return frozenset()
    if tracker.lost:
        return frozenset()
    linear, other = tracker.sets(out)
    return frozenset(linear - other)


def _name(func: Callable) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property such as Tensor.T: the descriptor's own name
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


def _product(factors: list[Sets]) -> Sets:
    seen: set = set()
    twice: set = set()
    other: set = set()
    for linear, nonlinear in factors:
        twice |= seen & linear
        seen |= linear
        other |= nonlinear
    other |= twice
    return frozenset(seen - other), frozenset(other)


def _union(parts: list[Sets]) -> Sets:
    return (frozenset().union(*(p[0] for p in parts)), frozenset().union(*(p[1] for p in parts)))


class _Tracker(TorchFunctionMode):
    """Sets ``(L, N)`` of every tensor made during a forward (see the module docstring)."""

    def __init__(self, index_of: dict[int, int]) -> None:
        super().__init__()
        self.index_of = index_of
        # Weak references, so that the forward frees its activations as usual; a dead or different
        # referent means the id was reused.
        self.known: dict[int, tuple[weakref.ref, Sets]] = {}
        self.viewed: dict[int, weakref.ref] = {}  # bases of the views made so far
        self.lost = False

    def sets(self, t: Tensor) -> Sets:
        if id(t) in self.index_of:
            return frozenset({self.index_of[id(t)]}), frozenset()
        entry = self.known.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else _EMPTY

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> object:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)]
        result = self._combine(name, args, kwargs, [self.sets(t) for t in inputs])
        targets = [args[0]] if name == "__setitem__" else [t for t in tree_flatten(out)[0] if isinstance(t, Tensor)]
        for t in targets:
            self._assign(t, result, any(t is i for i in inputs))
        return out

    def _combine(self, name: str, args: tuple, kwargs: dict, parts: list[Sets]) -> Sets:
        if name in _CONSTANT:
            return _EMPTY
        if name in _JOINT:
            return _union(parts)
        batch_statistics = name == "batch_norm" and kwargs.get("training", args[5] if len(args) > 5 else False)
        renormalised = name == "embedding" and kwargs.get("max_norm", args[3] if len(args) > 3 else None) is not None
        if name in _PRODUCT and not batch_statistics and not renormalised:
            return _product(parts)
        if name in _DIVIDE and all(not lin and not non for lin, non in parts[1:]):
            return _union(parts[:1])
        return frozenset(), frozenset().union(*(lin | non for lin, non in parts))  # anything else: not linear

    def _assign(self, t: Tensor, result: Sets, in_place: bool) -> None:
        has_views = id(t) in self.viewed and self.viewed[id(t)]() is t
        if in_place and result != self.sets(t) and (t._base is not None or has_views):
            self.lost = True  # the change reaches aliases this tracker cannot follow
        if t._base is not None:
            self.viewed[id(t._base)] = weakref.ref(t._base)
        if id(t) not in self.index_of:
            self.known[id(t)] = (weakref.ref(t), result)
