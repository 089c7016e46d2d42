"""The cases of the one-pass tests (``test_stderr_one_pass``, ``test_planning_one_pass``): three float64 models (an
MLP, a Gaussian regressor, a token tagger with a mask), their inputs in three forms (a list, a loader, a generator
that refills one buffer), and the two comparisons (to the bit; to 1e-12 of the largest entry)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset


class Tagger(nn.Module):
    """Token ids ``(B, T)`` → logits ``(B, T, C)``: an output with positions, with a mask."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(7, 5), nn.Linear(5, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def problem(name: str) -> tuple[nn.Module, Tensor, str, object]:
    """Model (float64), inputs, family and mask of each case."""
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double(), \
            torch.randn(11, 4, dtype=torch.float64), "categorical", None
    if name == "gaussian":
        return nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2)).double(), \
            torch.randn(11, 4, dtype=torch.float64), "gaussian", None
    ids = torch.randint(0, 7, (11, 3))
    return Tagger().double(), ids, "categorical", (lambda b: b != 0)


def forms(x: Tensor, loader_itself: bool = False) -> dict[str, Callable[[], object]]:
    """The inputs as a list of uneven mini-batches, a DataLoader (itself, or a generator of its batches' tensors)
    and a one-shot generator that refills one buffer."""

    def refilled() -> Iterator[Tensor]:
        buffer = torch.empty_like(x[:4])
        for start in range(0, len(x), 4):
            part = buffer[: len(x[start : start + 4])]
            part.copy_(x[start : start + 4])
            yield part

    return {"list": lambda: [x[:4], x[4:8], x[8:]],
            "loader": lambda: (DataLoader(TensorDataset(x), batch_size=4) if loader_itself else
                               (b[0] for b in DataLoader(TensorDataset(x), batch_size=4))),
            "refilled": refilled}


def close(got: object, want: object) -> None:
    """Entry by entry to 1e-12 of the largest entry (a dict of blocks: of all blocks, a linear layer's Î2 block
    being 0)."""
    pairs = [(got[k], want[k]) for k in want] if isinstance(want, dict) else [(got, want)]
    scale = max(float(w.abs().max()) for _, w in pairs)
    assert scale > 0
    for g, w in pairs:
        assert g.dtype == w.dtype == torch.float64
        assert float((g - w).abs().max()) <= 1e-12 * scale


def equal(got: object, want: object) -> bool:
    if isinstance(want, dict):
        return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    return torch.equal(got, want)
