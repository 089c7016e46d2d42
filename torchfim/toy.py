"""Toy networks and their training, shared by the demo, the report and the paper reproductions.

Every builder initialises with PyTorch's default initialisation under ``torch.manual_seed(seed)``
inside ``torch.random.fork_rng``, so a seed always gives the same weights and the caller's global
random state is left as it was. Training is plain mini-batch cross-entropy; the caller owns the
optimiser and the ``torch.Generator`` that orders the mini-batches, so runs are reproducible.

This module serves :mod:`torchfim.demo`, :mod:`torchfim.report` and :mod:`torchfim.experiments`;
it is not part of the library's API.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from .errors import TorchfimError

__all__ = [
    "ACTIVATIONS",
    "HIDDEN",
    "BATCH_SIZE",
    "LEARNING_RATE",
    "mlp",
    "cnn1d",
    "cnn2d",
    "train_epoch",
    "train_classifier",
]

#: Activation name -> module class (PyTorch defaults: Softplus beta=1, GELU exact erf form, ELU alpha=1).
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "gelu": nn.GELU,
    "elu": nn.ELU,
}

#: The demo network's hidden widths (input 64, output 10, tanh between layers), also the report's default.
HIDDEN = (32, 32)
#: Mini-batch size and Adam learning rate of :func:`train_classifier`.
BATCH_SIZE = 64
LEARNING_RATE = 1e-3


def mlp(
    n_in: int,
    hidden: tuple[int, ...],
    n_out: int,
    activation: str = "tanh",
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> nn.Sequential:
    """``Linear(n_in, hidden[0]), act, …, Linear(hidden[-1], n_out)``; no hidden layer: one Linear.

    ``activation`` is a key of :data:`ACTIVATIONS`; the weights are drawn in ``dtype``.
    """
    _check_fits(n_in, hidden, n_out, dtype)
    act = ACTIVATIONS[activation]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = n_in
        for h in hidden:
            layers += [nn.Linear(width, h, dtype=dtype), act()]
            width = h
        layers.append(nn.Linear(width, n_out, dtype=dtype))
        return nn.Sequential(*layers)


def _check_fits(n_in: int, hidden: tuple[int, ...], n_out: int, dtype: torch.dtype) -> None:
    """Refuse widths whose MLP would not fit in memory: torch would fail with a bare allocation error, or
    the machine swap, with widths such as 100000,100000 (10¹⁰ parameters, 40 GB in float32)."""
    from ._memory import fits_in_memory, size_text

    widths = (n_in, *hidden, n_out)
    n = sum((a + 1) * b for a, b in zip(widths, widths[1:]))
    # weights, gradients and Adam's two moments (4n numbers: fits_in_memory counts 2n with its working copy):
    # what training the model, or its Fisher, holds at least
    ok, needed, free = fits_in_memory(2 * n, dtype, torch.device("cpu"))
    if not ok:
        raise TorchfimError(
            f"hidden widths {','.join(map(str, hidden))} make an MLP of {n:,} parameters, which needs "
            f"{size_text(needed)} (weights, gradients and optimiser state) of the {size_text(free)} of "
            "memory available; choose smaller hidden widths (the command line's --hidden)"
        )


def cnn1d(length: int, channels: int, n_out: int, seed: int = 0) -> nn.Sequential:
    """A 1-D CNN on ``(batch, 1, length)`` sequences, no BatchNorm.

    Conv1d(1→C, 5) → Conv1d(C→C, 3) → max-pool 2 → Conv1d(C→C, 3) → max-pool 2 → Linear(C·(length//4)
    → n_out), ReLU after each convolution, 'same' padding (C = ``channels``; 9,610 parameters for
    length 40, C = 32, 10 outputs).
    """
    C = channels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv1d(1, C, 5, padding=2), nn.ReLU(),
            nn.Conv1d(C, C, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Conv1d(C, C, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2),
            nn.Flatten(), nn.Linear(C * (length // 4), n_out),
        )  # fmt: skip


def cnn2d(channels: int, n_out: int, seed: int = 0) -> nn.Sequential:
    """A 2-D CNN on ``(batch, 1, 8, 8)`` images, no BatchNorm.

    Conv2d(1→C/2, 3) → Conv2d(C/2→C, 3) → max-pool 2 → Conv2d(C→C, 3) → max-pool 2 → Linear(4C →
    n_out), ReLU after each convolution, 'same' padding (C = ``channels``).
    """
    C = channels
    h = max(1, C // 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.Sequential(
            nn.Conv2d(1, h, 3, padding=1), nn.ReLU(),
            nn.Conv2d(h, C, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(C, C, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(C * 4, n_out),
        )  # fmt: skip


def train_epoch(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    X: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator | None,
) -> float:
    """One pass of ``opt`` on the mean cross-entropy over mini-batches of a shuffled ``X``.

    The order is ``torch.randperm(len(X), generator=generator)``. Returns the mean over the
    inputs of the mini-batch losses (each taken before its step).
    """
    n = X.shape[0]
    perm = torch.randperm(n, generator=generator)
    total = 0.0
    for i in range(0, n, batch_size):
        idx = perm[i : i + batch_size]
        loss = F.cross_entropy(model(X[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * idx.numel()
    return total / n


def train_classifier(
    model: nn.Module,
    X: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seconds: float | None = None,
    batch_size: int = BATCH_SIZE,
    lr: float = LEARNING_RATE,
    generator: torch.Generator | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
) -> dict:
    """Adam on the mean cross-entropy, ``epochs`` times :func:`train_epoch`.

    Stops after ``epochs`` epochs, or at the end of the first epoch that ends past ``seconds``
    (wall clock), whichever comes first. With the epoch cap reached the run is deterministic for a
    given ``generator`` seed. ``on_epoch(epoch, loss)`` is called after each epoch. Leaves the
    model in eval mode. Returns ``{"epochs", "stopped_by_time", "seconds", "loss", "accuracy"}``
    (loss and accuracy on the whole of ``X`` after training).
    """
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    start = time.perf_counter()
    done = 0
    stopped_by_time = False
    model.train()
    for epoch in range(1, epochs + 1):
        loss = train_epoch(model, opt, X, y, batch_size, generator)
        done = epoch
        if on_epoch is not None:
            on_epoch(epoch, loss)
        if seconds is not None and epoch < epochs and time.perf_counter() - start >= seconds:
            stopped_by_time = True
            break
    model.eval()
    with torch.no_grad():
        logits = model(X)
        final_loss = F.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return {
        "epochs": done,
        "stopped_by_time": stopped_by_time,
        "seconds": time.perf_counter() - start,
        "loss": final_loss,
        "accuracy": accuracy,
    }
