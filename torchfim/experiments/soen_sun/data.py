"""The study's inputs and networks: the data sets (built locally), the measured rows, the MLPs."""

from __future__ import annotations

import torch
from torch import nn

from ... import toy
from .settings import FULL, Settings

__all__ = ["load_dataset", "measurement_indices", "build_mlp"]


def load_dataset(name: str, settings: Settings = FULL) -> tuple[torch.Tensor, torch.Tensor]:
    """``(X, y)`` in float64 / int64, built locally (never downloaded).

    ``digits``: scikit-learn's 8×8 digits with pixels scaled to [0, 1] (1797 × 64).
    ``mnist1d``: the training part of MNIST-1D made by the ``mnist1d`` package (default recipe:
    4000 × 40), or fewer sequences when ``settings.mnist1d_samples`` is set.
    """
    from ...datasets import load_digits, load_mnist1d

    if name == "digits":
        return load_digits(dtype=torch.float64)
    if name == "mnist1d":
        ds = load_mnist1d(num_samples=settings.mnist1d_samples, dtype=torch.float64)
        return ds.x_train, ds.y_train
    raise ValueError(f"unknown data set {name!r}; choose 'digits' or 'mnist1d'")


def measurement_indices(num_rows: int, n: int, seed: int) -> torch.Tensor:
    """The ``n`` rows the variances are conditioned on: the first ``n`` of a seeded permutation."""
    perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return perm[:n]


def build_mlp(n_in: int, width: int, depth: int, activation: str, n_out: int = 10, seed: int = 0) -> nn.Sequential:
    """``Linear(n_in, width), act, …, Linear(width, n_out)`` with ``depth`` hidden layers, in float64.

    PyTorch's default ``nn.Linear`` initialisation in float32 under ``torch.manual_seed(seed)``
    (:func:`torchfim.toy.mlp`), then cast to float64 (the caller's global random state is left as
    it was).
    """
    return toy.mlp(n_in, (width,) * depth, n_out, activation=activation, seed=seed).double()
