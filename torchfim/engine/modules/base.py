"""The interface of a per-module rule, and one recorded call of a module.

A rule knows one kind of module. From a recorded call (the module's inputs) and the output
sensitivities ``g = ∂(vᵀo)/∂z`` of the call's output ``z`` for output-space vectors ``v`` (m per
sample), it returns the per-sample gradients ``∂(vᵢⱼᵀ oᵢ)/∂θ`` of the module's own trainable
parameters, and, where the module's structure allows it more cheaply, their entrywise squares
summed over samples and vectors, or their squared norms per sample (docs/math.md §6).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

Grads = dict[int, Tensor]  # parameter index in θ -> per-sample gradients (b, m, size)
#: A use's per-sample gradient ``Σ_k u_k v_kᵀ`` of a weight over positions ``k``: ``(u, v)``, each dense
#: ``(m or 1, B, K, n)`` or the token ids ``(B, K)`` of one-hot rows (:mod:`..factored`).
Factors = tuple[Tensor, Tensor]

#: Elements of the per-sample products that :func:`positions_squares` builds at once: a chunk small
#: enough that it and its accumulator of squares stay in cache from the product to the square. On the
#: benchmark transformer's layers (256 sequences of 32; in, out ∈ {128, 384, 512}) 2**18 took 0.79-0.95 of the
#: time of 2**19 with a reduction per chunk; 2**17 and below were slower (more, smaller products).
SQUARES_ELEMENTS = 2**18


#: The key of :attr:`Call.cache` under which a rule keeps the taps its :meth:`Rule.take_recorded` added after the
#: call's outputs (a list; their sensitivities come last).
PARTS = "parts"

#: The layouts of a call's rows that a positions rule reads (:attr:`Call.layout`).
LAYOUTS = frozenset({"folded", "sequence_first"})


@dataclass
class Call:
    """One call of a module in a recorded forward: its inputs (detached) and its output taps."""

    module: nn.Module
    args: tuple
    kwargs: dict
    taps: list[Tensor]  # the call's output tensors, with autograd history
    size: int  # batch size of the forward
    versions: list[int] = field(default_factory=list)  # the taps' versions when recorded
    cache: dict = field(default_factory=dict)  # per-call quantities a rule reuses across vector groups
    #: Whether the call returned two or more outputs in a container the recording could not rebuild with views
    #: of them (:func:`..recording.own_outputs`): their sensitivities then hold the paths from one through another.
    unviewed: bool = False
    #: Whether the call's rule reads its rows by sample in a layout of its own (Llama 4's experts: ``(E·B·T, d)``
    #: block by block), set by :meth:`Rule.take_recorded`; the call counts as carrying the batch.
    own_layout: bool = False
    #: ``k`` where the call's input and outputs lead with ``size·k`` rows, sample by sample (the batch folded
    #: with ``k`` positions, as ``x.view(-1, d)`` does): its input is kept as ``(size, k, ...)`` and its
    #: sensitivities come as ``(m, size, k, ...)``, so a rule that reads positions reads the folded rows as
    #: positions (:attr:`Rule.reads_regrouped_rows`). 1 otherwise.
    fold: int = 1
    #: Whether the call's input and outputs came sequence first, ``(T, size, ...)`` (``nn.Transformer``'s
    #: layers with ``batch_first=False``): its input is kept as ``(size, T, ...)`` and its sensitivities
    #: come as ``(m, size, T, ...)``, for a rule that reads positions (:attr:`Rule.reads_regrouped_rows`).
    sequence_first: bool = False

    @property
    def regrouped(self) -> bool:
        """Whether the call's rows are read in another layout than they came (folded or sequence first)."""
        return self.fold > 1 or self.sequence_first

    @property
    def layout(self) -> str | None:
        """The layout its rows were read in: one of :data:`LAYOUTS`, or None (as they came)."""
        return "folded" if self.fold > 1 else "sequence_first" if self.sequence_first else None

    def batch_first(self, t: Tensor, dim: int = 0) -> Tensor:
        """``t``, whose dim ``dim`` holds rows as the call's input and outputs came, in the layout the call's
        input is kept in: that dim as ``(size, k)`` folded, swapped with the next one sequence first, as it
        is otherwise."""
        if self.fold > 1:
            return t.unflatten(dim, (self.size, self.fold))
        return t.transpose(dim, dim + 1) if self.sequence_first else t

    def release(self) -> None:
        """Drop the call's inputs, taps and cache (its recording's last pull-back has used them)."""
        self.args, self.kwargs, self.taps = (), {}, []
        self.cache.clear()


class Rule:
    """Per-sample products of one module's own parameters; subclasses implement :meth:`grads`.

    ``params`` maps the module's parameter names (as :meth:`torch.nn.Module.named_parameters` gives
    them below the module) to their index in θ; frozen parameters are absent.
    """

    #: A forward the module runs instead of its own while the engine records (None: its own). It must
    #: compute the same outputs; :meth:`take_recorded` then hands over intermediate taps it kept.
    recording_forward: Callable[..., object] | None = None
    #: Whether :attr:`recording_forward` computes the module's output by the rule's own formula rather than by
    #: the module's class forward: the coverage check compares the recorded output with the model's own, and a
    #: module whose forward computes something else gets the generic rule.
    substitutes_forward: bool = False
    #: Whether the module's class has a forward of its own, unlike the torch class whose rule this is:
    #: the rule stands only where the coverage check finds its per-sample gradients right.
    on_probation: bool = False
    #: Whether the per-sample gradients touch few entries, so that :meth:`add_grads` adds them into another
    #: use's in place (a lookup table tied to an output layer).
    sparse_grads: bool = False
    #: Whether the rule reads a call with the batch folded into its leading dim (:attr:`Call.fold`), or in its
    #: second dim (:attr:`Call.sequence_first`), as positions: one that treats every row of its input alike
    #: and sums its products over positions.
    reads_regrouped_rows: bool = False

    def __init__(self, module: nn.Module, params: dict[str, int]) -> None:
        self.module = module
        self.params = params

    def take_recorded(self, call: Call) -> list[Tensor]:
        """Extra taps of the call just recorded, after its output's (none by default)."""
        return []

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        """Per-sample gradients of the samples ``rows`` for every vector: ``{index: (b, m, size)}``."""
        raise NotImplementedError

    def add_grads(self, call: Call, sens: list[Tensor | None], rows: slice, into: Tensor, index: int) -> Tensor:
        """``into`` (the other uses' per-sample gradients of parameter ``index``, ``(b, m, size)``) plus this
        call's; a rule with :attr:`sparse_grads` adds them in place where ``into`` is contiguous."""
        return into + self.grads(call, sens, rows)[index]

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        """``Σᵢⱼ (∂(vᵢⱼᵀoᵢ)/∂θ)²`` per parameter, flat; None when not cheaper than :meth:`grads`."""
        return None

    def sample_squares(self, call: Call, sens: list[Tensor | None]) -> Tensor | None:
        """``Σ_θ (∂(vᵢⱼᵀoᵢ)/∂θ)²`` over the module's parameters, ``(B, m)``; None when not cheaper."""
        return None

    def tensor_sample_squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        """The same per parameter tensor, ``{index: (B, m)}``; None when not cheaper than :meth:`grads`."""
        return None

    def factors(self, call: Call, sens: list[Tensor | None]) -> dict[int, Factors] | None:
        """Per parameter, the factors of its per-sample gradients (for the squared norms of a parameter
        several calls share, :mod:`..factored`); None where the rule has none."""
        return None

    def unit_input(self, call: Call) -> Tensor | None:
        """For a dense layer seen once per sample: its input ``a`` (B, K), else None (docs/math.md §6)."""
        return None

    def size(self) -> int:
        """Number of trainable entries the rule covers."""
        named = dict(self.module.named_parameters())
        return sum(named[n].numel() for n in self.params)


def runs_torch_forward(module: nn.Module) -> bool:
    """Whether ``module`` runs the forward of the ``torch.nn`` class it derives from (or is not one). A
    subclass with a forward of its own may compute the same (Falcon's Linear) or something else than the
    rule follows (OPT's position embedding takes the attention mask and computes its ids; Gemma's scales
    its lookup): its rule is on probation, and the rules that replace the forward (attention, recurrent
    layers) are not given."""
    for cls in type(module).__mro__:
        if cls is not nn.Module and cls.__module__.startswith("torch.nn.modules."):
            return type(module).forward is cls.forward
    return True


def zero_grads(rule: Rule, b: int, m: int, like: Tensor) -> Grads:
    """Zero per-sample gradients for every parameter of ``rule`` (a call the vectors do not reach)."""
    named = dict(rule.module.named_parameters())
    return {i: like.new_zeros(b, m, named[n].numel()) for n, i in rule.params.items()}


def positions_view(t: Tensor, lead: int) -> Tensor:
    """``t`` with ``lead`` leading dims kept and the dims between them and the last one merged."""
    return t.reshape(*t.shape[:lead], -1, t.shape[-1])


def bias_like(rule: Rule, g: Tensor, name: str, sum_dims: tuple[int, ...], out: Grads) -> None:
    """Add the per-sample gradient of an additive parameter ``name``: ``g`` summed over ``sum_dims``."""
    if name in rule.params:
        out[rule.params[name]] = g.sum(sum_dims).transpose(0, 1).reshape(g.shape[1], g.shape[0], -1)


def positions_grads(rule: Rule, g: Tensor, a: Tensor, weight: str, bias: str, out: Grads) -> None:
    """Add the per-sample gradients of a linear map ``z_l = W a_l + b`` applied at positions ``l``:
    ``∂/∂W = Σ_l g_l a_lᵀ`` and ``∂/∂b = Σ_l g_l``, from ``g`` (m, b, L, out) and ``a`` (b, L, in),
    as ``(b, m, size)`` under the rule's indices of ``weight`` and ``bias`` (absent names skipped)."""
    m, b, positions, units = g.shape
    if weight in rule.params:
        stacked = g.permute(1, 0, 3, 2).reshape(b, m * units, positions)  # (b, m·out, L)
        out[rule.params[weight]] = torch.bmm(stacked, a).reshape(b, m, -1)
    if bias in rule.params:
        out[rule.params[bias]] = g.sum(2).transpose(0, 1)


def positions_squares(g: Tensor, a: Tensor, weight: bool = True) -> tuple[Tensor | None, Tensor]:
    """``Σᵢⱼ (Σ_l a_il g_ijlᵀ)²`` ``(in, out)`` and ``Σᵢⱼ (Σ_l g_ijl)²`` ``(out,)``: the squared per-sample
    gradients of a linear map at positions ``l`` (§6.1), in the layout ``(in, out)`` (transpose for a
    weight stored ``(out, in)``), from ``g`` (m, B, L, out) and ``a`` (B, L, in). Without ``weight`` (a
    frozen weight beside a trainable bias) the first is None and no product is formed.

    One vector at a time over chunks of :data:`SQUARES_ELEMENTS` (the product ``aᵢᵀ gᵢⱼ`` reads both
    factors where they lie, without a copy of ``g`` into a stacked layout). Each chunk's squares are added
    into an accumulator of the chunk's shape in one pass (``addcmul_``), summed over its rows once at the
    end: a reduction per chunk would read the products twice more."""
    a, g = as_float(a), as_float(g)
    bias = g.sum(2).square_().sum((0, 1))
    if not weight:
        return None, bias
    m, size, _, units = g.shape
    step = max(1, SQUARES_ELEMENTS // (a.shape[-1] * units))
    inputs = a.transpose(1, 2).split(step)  # (rows, in, L) per chunk, the same for every vector
    buffer = g.new_empty(len(inputs[0]), a.shape[-1], units)
    squares = torch.zeros_like(buffer)
    for k in range(m):
        for x, sens in zip(inputs, g[k].split(step)):
            full = len(x) == step  # the last chunk may be shorter
            products = torch.bmm(x, sens, out=buffer if full else buffer[: len(x)])
            (squares if full else squares[: len(x)]).addcmul_(products, products)
    return squares.sum(0), bias


def as_float(t: Tensor) -> Tensor:
    """Half-precision tensors in float32 for products (the sums are accumulated wide anyway)."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def rounding_tolerance(dtype: torch.dtype) -> float:
    """The relative gap within which two ways of computing the same per-sample gradients in ``dtype`` agree
    (the coverage check's test of the rules against autograd): 1e-8 in float64, 1e-4 in float32, and in half
    precision 8 units in the last place (float16 7.8e-3, bfloat16 6.3e-2), where a rule that accumulates in
    float32 and autograd's kernels round at other steps differ by a few."""
    if dtype in (torch.float16, torch.bfloat16):
        return 8 * torch.finfo(dtype).eps
    return 1e-4 if dtype == torch.float32 else 1e-8


@contextmanager
def forwards_replaced(modules: Iterable[nn.Module], make: Callable[[nn.Module], Callable[..., object]]) -> Iterator[None]:
    """Within the block, each of ``modules`` runs ``make(module)`` as its forward, set on the instance (so
    that calls keep torch's fast path, without hooks); the forward the instance had, or none, is put back
    afterwards. ``make`` sees the module before its forward is replaced."""
    own = {m: m.__dict__.get("forward") for m in modules}  # a forward set on the instance, else None
    for m in own:
        m.__dict__["forward"] = make(m)
    try:
        yield
    finally:
        for m, forward in own.items():
            if forward is None:
                del m.__dict__["forward"]
            else:
                m.__dict__["forward"] = forward
