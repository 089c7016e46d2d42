"""torchfim: Fisher information of PyTorch models, with error bars.

The main entry point is :func:`torchfim.fisher`; output distributions live in
:mod:`torchfim.families`.
"""

from . import families
from .errors import TorchfimError
from .fisher import ESTIMATORS, STRUCTURES, fisher
from .planning import EstimatorComparison, compare_estimators, samples_needed
from .variance import (
    fisher_variance,
    hessian_variance_bound_spectral,
    score_variance_bound_kurtosis,
    score_variance_bound_spectral,
    variance_bound,
)

__all__ = [
    "ESTIMATORS",
    "STRUCTURES",
    "EstimatorComparison",
    "TorchfimError",
    "compare_estimators",
    "families",
    "fisher",
    "fisher_variance",
    "hessian_variance_bound_spectral",
    "samples_needed",
    "score_variance_bound_kurtosis",
    "score_variance_bound_spectral",
    "variance_bound",
]
__version__ = "0.1.0"
