"""The benchmark's models and data: tanh MLPs and a small CNN, the digits in mini-batches."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import Config

__all__ = ["arch", "make_mlp", "make_cnn", "num_params", "Data", "load_data", "model_for"]


def arch(sizes: tuple[int, ...]) -> str:
    """``64-256-256-10 tanh``: an MLP's description."""
    return "-".join(str(s) for s in sizes) + " tanh"


def make_mlp(sizes: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Tanh MLP ``sizes[0] → … → sizes[-1]``, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_cnn(channels: tuple[int, int], seed: int = 0, classes: int = 10) -> nn.Module:
    """1×8×8 input → conv3×3 (c1, padding 1) → ReLU → conv3×3 (c2, padding 1) → ReLU → linear."""
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * 64, classes),
    )


def num_params(model: nn.Module) -> int:
    """Trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Data:
    """Mini-batches of inputs and their targets."""
    batches: list[Tensor]
    targets: list[Tensor]

    @property
    def n(self) -> int:
        """The number of inputs."""
        return sum(x.shape[0] for x in self.batches)


def load_data(cfg: Config, image: bool = False) -> Data:
    """The digits (first ``cfg.n_inputs``), as mini-batches; ``image``: shaped (1, 8, 8)."""
    from torchfim.datasets import load_digits

    X, y = load_digits(torch.float32)
    if cfg.n_inputs is not None:
        X, y = X[: cfg.n_inputs], y[: cfg.n_inputs]
    if image:
        X = X.reshape(-1, 1, 8, 8)
    return Data(list(X.split(cfg.batch_size)), list(y.split(cfg.batch_size)))


def model_for(cfg: Config, which: str) -> tuple[nn.Module, Data, str]:
    """``(model, data, description)``: ``"mlp"`` MLP-A, ``"mlps"`` MLP-S, ``"cnn"`` the CNN (on images)."""
    if which == "cnn":
        c1, c2 = cfg.cnn_channels
        return make_cnn(cfg.cnn_channels, cfg.seed), load_data(cfg, image=True), f"CNN 1x8x8-conv{c1}-conv{c2}-10 relu"
    sizes = cfg.mlp_a if which == "mlp" else cfg.mlp_s
    return make_mlp(sizes, cfg.seed), load_data(cfg), f"MLP {arch(sizes)}"
