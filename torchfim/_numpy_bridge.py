"""Whether torch can exchange arrays with the installed NumPy, asked once at import."""

from __future__ import annotations

import numpy
import torch

from .errors import warn_user

__all__ = ["check_numpy_bridge"]

BROKEN = ("torchfim: torch {torch} cannot exchange arrays with NumPy {numpy} ({error}; a torch built against NumPy 1, "
          "as torch 2.2's wheels are, cannot use NumPy 2), so torchfim's data sets, reports, forecasts and matrix "
          "Fisher family fail where they convert; install numpy<2 beside this torch (pip install 'numpy<2') or a "
          "newer torch")


def check_numpy_bridge() -> bool:
    """Warn, naming the fix, where ``torch.from_numpy`` fails (torch 2.2 beside NumPy 2: torch's "Numpy is not
    available", raised wherever torchfim converts, far from the cause); whether the bridge works."""
    try:
        torch.from_numpy(numpy.zeros(1))
    except RuntimeError as err:
        warn_user(BROKEN.format(torch=torch.__version__, numpy=numpy.__version__, error=err))
        return False
    return True
