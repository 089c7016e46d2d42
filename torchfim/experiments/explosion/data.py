"""The study's data: the digits and MNIST-1D split per seed, label noise, and the networks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ... import toy
from ...errors import TorchfimError
from .settings import N_CLASSES, Settings

__all__ = ["Split", "make_split", "build_model"]

_DATA_CACHE: dict[tuple[str, int | None], tuple[torch.Tensor, ...]] = {}


def _raw_data(dataset: str, settings: Settings) -> tuple[torch.Tensor, ...]:
    """``(X, y)`` for digits, ``(x_train, y_train, x_test, y_test)`` for MNIST-1D (cached)."""
    key = (dataset, settings.mnist1d_samples if dataset == "mnist1d" else None)
    if key not in _DATA_CACHE:
        if dataset == "digits":
            from ...datasets import load_digits

            _DATA_CACHE[key] = load_digits(dtype=torch.float32)
        elif dataset == "mnist1d":
            from ...datasets import load_mnist1d

            _DATA_CACHE[key] = tuple(load_mnist1d(num_samples=settings.mnist1d_samples, dtype=torch.float32))
        else:
            raise TorchfimError(f"unknown data set {dataset!r}; choose 'digits' or 'mnist1d'")
    return _DATA_CACHE[key]


@dataclass
class Split:
    """One seed's training, validation and test sets, its label noise and its held Tr(F) inputs."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # labels used for training (noisy where corrupted)
    y_train_true: torch.Tensor
    noisy: torch.Tensor  # bool mask: label changed by the noise draw
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    held: torch.Tensor  # indices into the training set of the Tr(F) inputs


def _shape_inputs(x: torch.Tensor, dataset: str, model: str) -> torch.Tensor:
    if model == "mlp":
        return x
    if dataset == "digits":
        return x.reshape(-1, 1, 8, 8)
    return x.reshape(-1, 1, x.shape[-1])


def make_split(dataset: str, model: str, settings: Settings, plan: Any, noise_fraction: float) -> Split:
    """Split the data with the plan's ``data_split`` seed and corrupt labels with its ``label_noise`` seed.

    Digits: a seeded permutation gives the test set (``test_fraction``), then the validation set
    (``val_fraction`` of the rest), then the training set. MNIST-1D: its own test set; validation
    is ``val_fraction`` of its training sequences. The held ``Tr(F)`` inputs are the first
    ``monitor_inputs`` training inputs of a second permutation of the same stream. Label noise:
    ``round(noise_fraction·n_train)`` training examples get a label drawn uniformly from the 10
    classes (it may equal the true one, as in the paper); the *noisy* subset is those whose label
    actually changed.
    """
    g = plan.generator("data_split")
    raw = _raw_data(dataset, settings)
    if dataset == "digits":
        X, y = raw
        n = X.shape[0]
        perm = torch.randperm(n, generator=g)
        n_test = int(round(settings.test_fraction * n))
        test, rest = perm[:n_test], perm[n_test:]
        x_test, y_test = X[test], y[test]
        X, y = X[rest], y[rest]
    else:
        X, y, x_test, y_test = raw
    n = X.shape[0]
    perm = torch.randperm(n, generator=g)
    n_val = int(round(settings.val_fraction * n))
    val, train = perm[:n_val], perm[n_val:]
    x_train, y_true = X[train], y[train]
    held = torch.randperm(x_train.shape[0], generator=g)[: settings.monitor_inputs]

    y_used = y_true.clone()
    if noise_fraction > 0:
        gn = plan.generator("label_noise")
        n_noise = int(round(noise_fraction * x_train.shape[0]))
        idx = torch.randperm(x_train.shape[0], generator=gn)[:n_noise]
        y_used[idx] = torch.randint(0, N_CLASSES, (n_noise,), generator=gn)
    noisy = y_used != y_true

    def s(x: torch.Tensor) -> torch.Tensor:
        return _shape_inputs(x, dataset, model).contiguous()

    return Split(s(x_train), y_used, y_true, noisy, s(X[val]), y[val], s(x_test), y_test, held)


def build_model(dataset: str, model: str, settings: Settings, seed: int) -> nn.Module:
    """The network, initialised (PyTorch defaults) under ``torch.manual_seed(seed)``; no BatchNorm.

    * ``mlp``: ``d → W → W → 10`` with ReLU (``W = mlp_width``; d = 64 digits, 40 MNIST-1D).
    * ``cnn`` on MNIST-1D (the digest's 1-D CNN), :func:`torchfim.toy.cnn1d` with ``C =
      cnn_channels`` (9,610 parameters at C = 32).
    * ``cnn`` on the digits (8×8), :func:`torchfim.toy.cnn2d` with ``C = cnn_channels``.
    """
    d_in = {"digits": 64, "mnist1d": 40}[dataset]
    if model == "mlp":
        return toy.mlp(d_in, (settings.mlp_width, settings.mlp_width), N_CLASSES, activation="relu", seed=seed)
    if model == "cnn" and dataset == "mnist1d":
        return toy.cnn1d(d_in, settings.cnn_channels, N_CLASSES, seed=seed)
    if model == "cnn" and dataset == "digits":
        return toy.cnn2d(settings.cnn_channels, N_CLASSES, seed=seed)
    raise TorchfimError(f"unknown model {model!r}; choose 'mlp' or 'cnn'")
