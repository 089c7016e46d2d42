"""Soen & Sun (NeurIPS 2021), "On the Variance of the Fisher Information for Deep Learning", at CPU scale.

``torchfim reproduce soen-sun [--out DIR] [--quick]`` runs :func:`run`, which regenerates the
paper's kind of evidence for small MLPs with torchfim's closed-form variances (docs/math.md §2–3):

(a) ``bound_ratios``: the ratio of each upper bound on the variance to the exact variance, for every
    diagonal entry of the Fisher (summarised per layer as box-plot statistics) and for the trace,
    for the score estimator Î1 (spectral and kurtosis bounds) and the Hessian estimator Î2
    (spectral bound), across activations;
(b) ``activations``: Var(Î1) against Var(Î2), summed over each layer's diagonal and for the trace
    estimator, across ReLU, tanh, sigmoid, softplus, GELU and ELU at initialisation, on the digits
    and MNIST-1D, with the categorical family (classification) and, on the digits, the ``gaussian``
    family (a regression head with the same 10 outputs); repeated without the bounds for further
    initialisation seeds (``seeds``, summarised in ``seed_ranges``: the error bars of figure (b));
(c) ``depth_width``: the same trace and summed-diagonal variances against depth and width (tanh);
(d) ``training``: Tr(F), both trace variances, the relative standard error with one label per input
    and :func:`torchfim.samples_needed` for a 10% relative standard error (one σ), at checkpoints while Adam trains the tanh and
    softplus MLPs on the digits.

Everything is float64, seeded, and conditional on a fixed set of ``n`` inputs (variances are those
of the estimators with one sampled label per input, ``n_samples=1``). The output folder gets PNG
figures, ``results.json`` (every number plotted, plus the settings), ``results.csv`` (every number of
its measured sections in long form, one row each, the record's configuration in the columns; the settings
are in results.json alone) and ``summary.md``. Every file is written atomically, and ``results.json`` /
``results.csv`` / ``summary.md`` are rewritten after every measurement, so an interrupted run keeps
what it had finished. A progress bar (stderr) covers the whole run.

Cost: exact Var(Î2) needs every diagonal output Hessian entry ``∂²o_a(xᵢ)/∂θ_p²``: on torchfim's
general path one forward-over-forward pass per parameter direction, a cost that grows like ``n·P²``
(its per-layer fast path for dense layers needs one per hidden unit). The networks are kept at
P ≲ 2000 parameters (the width sweep goes to P ≈ 9000 once) so that the run takes minutes on 2
CPU cores either way.

The package, one job per module: :mod:`.settings`, :mod:`.data` (data sets and MLPs),
:mod:`.measure` (the variances and records), :mod:`.study` (running the experiments),
:mod:`.tables` (results.json, results.csv), :mod:`.figures`, :mod:`.summary` and
:mod:`.conclusions` (summary.md), :mod:`.command` (the command line).
"""

from .command import HELP, add_arguments, main
from .data import build_mlp, load_dataset, measurement_indices
from .settings import ACTIVATIONS, BOUNDS, DEFAULT_OUT, FILES, FULL, QUICK, REL_ERROR, ZERO_VARIANCE_RTOL, Settings
from .study import run

__all__ = [
    "ACTIVATIONS",
    "BOUNDS",
    "FILES",
    "REL_ERROR",
    "ZERO_VARIANCE_RTOL",
    "Settings",
    "FULL",
    "QUICK",
    "build_mlp",
    "load_dataset",
    "measurement_indices",
    "run",
    "main",
    "HELP",
    "add_arguments",
    "DEFAULT_OUT",
]
