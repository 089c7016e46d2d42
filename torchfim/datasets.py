"""Small data sets for the demo and the experiments, built locally (nothing is downloaded or cached).

Both loaders need the optional command-line extras (``pip install 'torchfim[cli]'``):
scikit-learn for :func:`load_digits`, mnist1d for :func:`load_mnist1d`.
"""

from __future__ import annotations

import importlib
import random
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["load_digits", "load_mnist1d", "MNIST1D"]

_EXTRA_HINT = "pip install 'torchfim[cli]'"


def _require(module: str, what: str):
    """Import ``module`` or raise an ImportError that names the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"{what} needs the optional package {module.split('.')[0]!r}, which is not installed: "
            f"run {_EXTRA_HINT}"
        ) from exc


def load_digits(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 handwritten digits (ships with scikit-learn; no download).

    Returns ``(X, y)``: ``X`` of shape (1797, 64) and dtype ``dtype`` with pixel intensities
    scaled from 0..16 to [0, 1]; ``y`` of shape (1797,), dtype int64, class indices 0..9.
    """
    sk_datasets = _require("sklearn.datasets", "load_digits")
    bunch = sk_datasets.load_digits()
    X = torch.as_tensor(np.asarray(bunch.data) / 16.0, dtype=dtype)
    y = torch.as_tensor(np.asarray(bunch.target), dtype=torch.int64)
    return X, y


class MNIST1D(NamedTuple):
    """The MNIST-1D train/test split, unpackable as ``x_train, y_train, x_test, y_test``."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_mnist1d(
    num_samples: int | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> MNIST1D:
    """Generate MNIST-1D (Greydanus 2020) locally with the ``mnist1d`` package.

    Uses ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())``, the package's default
    recipe (5000 sequences of length 40, 80/20 train/test split, seed 42), never its download
    path, and writes nothing to disk. ``num_samples`` and ``seed`` override those two settings.
    The global ``random`` and ``numpy.random`` states, which mnist1d reseeds, are restored after.

    Returns an :class:`MNIST1D` named tuple ``(x_train, y_train, x_test, y_test)``: inputs of shape
    (n, 40) in ``dtype``, labels int64 in 0..9. Takes about 3 s for the default 5000 samples.
    """
    data = _require("mnist1d.data", "load_mnist1d")
    args = data.get_dataset_args()
    if num_samples is not None:
        if int(num_samples) < 10:
            raise ValueError(f"num_samples must be at least 10 (one per class), got {num_samples}")
        args.num_samples = int(num_samples)
    if seed is not None:
        args.seed = int(seed)

    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        ds = data.make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)

    def _x(a):
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    def _y(a):
        return torch.as_tensor(np.asarray(a), dtype=torch.int64)

    return MNIST1D(_x(ds["x"]), _y(ds["y"]), _x(ds["x_test"]), _y(ds["y_test"]))
