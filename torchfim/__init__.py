"""torchfim: Fisher information of PyTorch models, with error bars.

The main entry point is :func:`torchfim.fisher`; output distributions live in
:mod:`torchfim.families`.
"""

from . import families
from .errors import TorchfimError
from .fisher import ESTIMATORS, STRUCTURES, fisher

__all__ = ["ESTIMATORS", "STRUCTURES", "TorchfimError", "families", "fisher"]
__version__ = "0.1.0"
