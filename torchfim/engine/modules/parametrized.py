"""Layers whose weight is a function of other tensors (``torch.nn.utils.parametrize``): weight norm, spectral
norm, orthogonal maps.

The layer's own rule gives the per-sample gradients of the tensor it uses, ``G = ∂(vᵀo)/∂W`` with
``W = P(u₁, …, u_r)``; those of the trainable originals follow by the chain rule,
``∂(vᵀo)/∂u_k = (∂P/∂u_k)ᵀ G``: a vector–Jacobian product of ``P`` alone, one linear map for every sample
and vector (``P`` does not read the input), applied to all of them at once by ``torch.func``. Weight norm,
``W = g ⊙ v/‖v‖`` (the norm over every dim but one), so keeps a Linear or a convolution on its rule (the
positional convolution of Hugging Face's speech models) instead of the generic rule's second run of the
layer; its map is written out (torch's fused weight-norm backward has no batching rule):
``∂/∂g = Σ(G ⊙ v)/‖v‖`` and ``∂/∂v = (g/‖v‖) G − g Σ(G ⊙ v) v/‖v‖³``, the sums over the norm's dims.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils.parametrizations import _WeightNorm

from ..function_forwards import function_forwards
from .base import Call, Grads, Rule

#: The prefix of the originals' names below a parametrized module.
PREFIX = "parametrizations."


def parametrized_names(module: nn.Module) -> frozenset[str]:
    """The names of ``module``'s tensors computed by a parametrization (empty for a plain module)."""
    parametrizations = getattr(module, "parametrizations", None)
    return frozenset(parametrizations.keys()) if isinstance(parametrizations, nn.ModuleDict) else frozenset()


def split_originals(params: dict[str, int]) -> tuple[dict[str, int], dict[str, int]] | None:
    """``params`` as the base rule's (each parametrized tensor under a placeholder index, negative) and the
    placeholders by tensor name; None where a parameter belongs to a parametrization itself (a learned one)."""
    base: dict[str, int] = {}
    placeholders: dict[str, int] = {}
    for name, index in params.items():
        if not name.startswith(PREFIX):
            base[name] = index
            continue
        tensor, _, original = name[len(PREFIX):].partition(".")
        if not original.startswith("original") or "." in original:
            return None
        placeholders.setdefault(tensor, -1 - len(placeholders))
    return {**base, **placeholders}, placeholders


#: Per-sample rows of a derived tensor's gradient ``(R, numel)`` → those of each trainable original, by its
#: name in the module (``(R, *original.shape)``).
PullBack = Callable[[Tensor], dict[str, Tensor]]
#: For a pull-back that multiplies elementwise (a pruning mask): the factor of each original, by its name.
Factors = Callable[[], dict[str, Tensor]]


class ParametrizedRule(Rule):
    """The per-sample gradients of ``base`` (the layer's rule), with those of each derived tensor taken back to
    its trainable originals by its pull-back (module docstring): a parametrization's, or a forward
    pre-hook's (:mod:`.hooked`)."""

    #: A derivation may be anything: the coverage check confirms the rule, else the generic rule stands.
    on_probation = True

    def __init__(self, base: Rule, params: dict[str, int], placeholders: dict[str, int],
                 pull_backs: dict[str, PullBack], elementwise: dict[str, Factors] | None = None) -> None:
        super().__init__(base.module, params)
        self.base = base
        self.placeholders = placeholders
        self.pull_backs = pull_backs
        self.elementwise = elementwise or {}
        self.reads_regrouped_rows = base.reads_regrouped_rows
        self.recording_forward = base.recording_forward

    def take_recorded(self, call: Call) -> list[Tensor]:
        return self.base.take_recorded(call)

    def size(self) -> int:
        """The entries of the originals and of the tensors the layer uses: both are formed per sample."""
        named = dict(self.module.named_parameters())
        return sum(named[n].numel() for n in self.params) + sum(getattr(self.module, n).numel() for n in self.placeholders)

    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        used = self.base.grads(call, sens, rows)
        out = {i: g for i, g in used.items() if i >= 0}
        for name, placeholder in self.placeholders.items():
            if placeholder in used:
                g = used[placeholder]
                b, m = g.shape[:2]
                per_row = self.pull_backs[name](g.reshape(b * m, -1))
                out.update({self.params[n]: t.reshape(b, m, -1) for n, t in per_row.items() if n in self.params})
        return out

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        """The base rule's squares, where every derived tensor's pull-back is elementwise: ``(G ⊙ c)² = G² ⊙ c²``."""
        if not set(self.placeholders) <= set(self.elementwise):
            return None
        used = self.base.squares(call, sens)
        if used is None:
            return None
        out = {i: sq for i, sq in used.items() if i >= 0}
        for name, placeholder in self.placeholders.items():
            if placeholder in used:
                out.update({self.params[n]: used[placeholder] * c.reshape(-1).square()
                            for n, c in self.elementwise[name]().items() if n in self.params})
        return out


def _parametrization_pull_back(module: nn.Module, name: str) -> PullBack:
    """``(∂P/∂u_k)ᵀ G`` for each trainable original ``u_k`` of the parametrized tensor ``name``."""
    chain = module.parametrizations[name]

    def pull_back(rows: Tensor) -> dict[str, Tensor]:
        originals = {n: p.detach() for n, p in chain.named_parameters(recurse=False)}
        if len(chain) == 1 and isinstance(chain[0], _WeightNorm):
            per_row = weight_norm_grads(rows.reshape(-1, *originals["original1"].shape), originals["original0"],
                                        originals["original1"], chain[0].dim)
            per_row = {"original0": per_row[0], "original1": per_row[1]}
        else:
            tensor, vector_jacobian = vjp(lambda u: _parametrized(chain, u), originals)
            (per_row,) = vmap(vector_jacobian)(rows.reshape(-1, *tensor.shape))
        return {PREFIX + f"{name}.{n}": t for n, t in per_row.items()}

    return pull_back


def _parametrized(chain: nn.Module, originals: dict[str, Tensor]) -> Tensor:
    """The tensor the parametrization ``chain`` makes of ``originals``, as of the function (:mod:`..function_forwards`)."""
    with function_forwards():
        return functional_call(chain, originals, ())


def weight_norm_grads(rows: Tensor, scale: Tensor, direction: Tensor, dim: int) -> tuple[Tensor, Tensor]:
    """The weight-norm map of the module docstring for rows ``G`` ``(R, *v.shape)``: the rows of ``g``
    (``scale``) and of ``v`` (``direction``), the norm over every dim of ``v`` but ``dim`` (over all of them
    for ``dim = -1``, as torch has it)."""
    dims = [d for d in range(direction.dim()) if dim == -1 or d != dim % direction.dim()]
    norm = direction.square().sum(dims, keepdim=True).sqrt()
    along = (rows * direction).sum([d + 1 for d in dims], keepdim=True)  # Σ G ⊙ v, (R, *norm.shape)
    return (along / norm).reshape(rows.shape[0], *scale.shape), (scale / norm) * rows - (scale * along / norm**3) * direction


def parametrized_rule(module: nn.Module, params: dict[str, int], base_rule) -> Rule | None:
    """The :class:`ParametrizedRule` of a parametrized ``module`` whose base rule ``base_rule(module, params,
    own)`` (the layer's, over its own and its parametrized tensors' names) exists; None otherwise."""
    split = split_originals(params)
    if split is None:
        return None
    base_params, placeholders = split
    own = set(dict(module.named_parameters(recurse=False))) | parametrized_names(module)
    base = base_rule(module, base_params, own)
    if base is None:
        return None
    return ParametrizedRule(base, params, placeholders, {n: _parametrization_pull_back(module, n) for n in placeholders})
