"""torchfim: Fisher information of PyTorch models, with error bars.

The main entry point is :func:`torchfim.fisher`; :func:`torchfim.fisher_variance`
and the bounds say how accurate its estimators are; output distributions live in
:mod:`torchfim.families`; :mod:`torchfim.train` has the Fisher penalty and the
Tr(F) monitor for a training loop; :mod:`torchfim.compare` compares runs over seeds;
:mod:`torchfim.score_norms` gives the score estimate's squared norms per input, label and parameter
tensor, with error bars from their spread, where the closed forms would not fit in memory.
"""

from . import compare, families, forecast, score_norms, structures, train
from ._numpy_bridge import check_numpy_bridge
from .bounds import (
    hessian_variance_bound_spectral,
    score_variance_bound_kurtosis,
    score_variance_bound_spectral,
    variance_bound,
)
from .combined import combined_variance
from .covariance import fisher_covariance
from .errors import TorchfimError
from .estimators import ESTIMATORS
from .fisher import STRUCTURES, fisher
from .planning import EstimatorComparison, compare_estimators, samples_needed
from .result_structure import as_structure
from .variance import fisher_variance

__all__ = [
    "ESTIMATORS",
    "STRUCTURES",
    "EstimatorComparison",
    "TorchfimError",
    "as_structure",
    "combined_variance",
    "compare",
    "compare_estimators",
    "families",
    "forecast",
    "structures",
    "fisher",
    "fisher_covariance",
    "fisher_variance",
    "hessian_variance_bound_spectral",
    "samples_needed",
    "score_norms",
    "score_variance_bound_kurtosis",
    "score_variance_bound_spectral",
    "train",
    "variance_bound",
]
__version__ = "0.1.0"

check_numpy_bridge()
