"""Where each trainable parameter tensor sits in the flat parameter vector θ of torchfim's results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .errors import TorchfimError

__all__ = ["Layout", "accumulation_dtype"]


@dataclass
class Layout:
    """Where each trainable parameter tensor sits in the flat parameter vector θ: the model's parameters with
    ``requires_grad=True``, in ``named_parameters()`` order, each flattened in row-major order.

    Example:
        >>> import torch
        >>> from torchfim.layout import Layout
        >>> layout = Layout(["w", "b"], [torch.Size([2, 2]), torch.Size([2])], torch.float32, torch.device("cpu"))
        >>> layout.unflatten(torch.arange(6.0))["w"]
        tensor([[0., 1.],
                [2., 3.]])
        >>> layout.flatten({"b": torch.ones(2), "w": torch.zeros(2, 2), "frozen": torch.ones(9)}).tolist()
        [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    """

    names: list[str]
    shapes: list[torch.Size]
    dtype: torch.dtype
    device: torch.device
    #: The other names of tied parameters (a weight shared by two modules), each with the name θ holds it under.
    aliases: dict[str, str] = field(default_factory=dict)
    sizes: list[int] = field(init=False)
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.sizes = [int(torch.Size(s).numel()) for s in self.shapes]
        self.offsets = [sum(self.sizes[:i]) for i in range(len(self.sizes))]

    @classmethod
    def of(cls, named: list[tuple[str, Tensor]], model: nn.Module | None = None) -> Layout:
        """The layout of the ``(name, parameter)`` pairs ``named`` (the trainable ones, in ``named_parameters()``
        order), in the first one's dtype and on its device; with the ``model``, the other names of its tied ones."""
        first, held = named[0][1], {id(p): n for n, p in named}
        every = [] if model is None else model.named_parameters(remove_duplicate=False)
        aliases = {n: held[id(p)] for n, p in every if id(p) in held and held[id(p)] != n}
        return cls([n for n, _ in named], [p.shape for _, p in named], first.dtype, first.device, aliases)

    @property
    def num_params(self) -> int:
        """``P``, the length of θ."""
        return sum(self.sizes)

    def span(self, index: int) -> slice:
        """The slice of θ that parameter ``index`` occupies."""
        return slice(self.offsets[index], self.offsets[index] + self.sizes[index])

    def locate(self, flat: int) -> tuple[str, tuple[int, ...]]:
        """The parameter that holds entry ``flat`` of θ, and the entry's index within it (row-major)."""
        i = next((i for i in range(len(self.names)) if flat < self.offsets[i] + self.sizes[i]), None)
        if i is None or flat < 0:
            raise TorchfimError(f"entry {flat} lies outside θ's {self.num_params} entries")
        local, index = flat - self.offsets[i], []
        for extent in reversed(tuple(self.shapes[i])):
            local, rest = divmod(local, extent)
            index.append(rest)
        return self.names[i], tuple(reversed(index))

    def index(self, name: str) -> int:
        """The position of parameter ``name`` (or of the tensor a tied name shares); a clear error for unknown names."""
        try:
            return self.names.index(self.aliases.get(name, name))
        except ValueError:
            raise TorchfimError(f"no trainable parameter named {name!r}; known: {', '.join(self.names)}") from None

    def zeros(self, *shape: int) -> Tensor:
        """A zero tensor in the accumulation dtype (float32 or wider) on the parameters' device."""
        return torch.zeros(shape, dtype=accumulation_dtype(self.dtype), device=self.device)

    def unflatten(self, vector: Tensor) -> dict[str, Tensor]:
        """A ``P``-vector (a diagonal, a natural-gradient step) as one tensor per parameter, in its shape:
        ``{name: vector[span].reshape(shape)}``, views of ``vector``."""
        if vector.dim() != 1 or vector.shape[0] != self.num_params:
            raise TorchfimError(f"unflatten takes a vector of the {self.num_params} trainable parameters' entries, "
                                f"got shape {tuple(vector.shape)}")
        return {name: vector[self.span(i)].reshape(shape) for i, (name, shape) in enumerate(zip(self.names,
                                                                                                 self.shapes))}

    def flatten(self, tensors: Mapping[str, Tensor]) -> Tensor:
        """The ``P``-vector of ``tensors`` (by parameter name: ``dict(model.named_parameters())``, gradients by
        name) in this layout's order; names it does not hold (frozen parameters) are left out, as in the
        results (``parameters_to_vector(model.parameters())`` keeps them, and so does not match). Autograd
        history is kept (an EWC penalty differentiates through θ): detach the tensors for a plain vector."""
        missing = [name for name in self.names if tensors.get(name) is None]
        if missing:
            raise TorchfimError(f"flatten needs a tensor for every trainable parameter; missing or None (a parameter "
                                f"without a gradient: pass torch.zeros_like(p)): {', '.join(missing)}")
        wrong = [name for name, shape in zip(self.names, self.shapes) if tensors[name].shape != shape]
        if wrong:
            raise TorchfimError(f"flatten got tensors of another shape than their parameter's for: {', '.join(wrong)}")
        return torch.cat([tensors[name].reshape(-1) for name in self.names])


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision models (sums over many inputs overflow or lose digits), else ``dtype``."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
