"""Jastrzębski et al. (ICML 2021), "Catastrophic Fisher Explosion", at CPU scale.

Usage::

    torchfim reproduce explosion [--out DIR] [--quick] [--resume] [--seeds N] [--master-seed S] [--jobs J]

(or ``torchfim explosion``, its earlier name) runs :func:`run`, which trains small networks
without BatchNorm (an MLP and a small CNN: 1-D convolutions on MNIST-1D, 2-D convolutions on the
8×8 scikit-learn digits; both data sets are built locally, nothing is downloaded) with SGD
(momentum 0.9, batch 128, constant learning rate) and checks three of the paper's claims:

(a) *Fisher explosion*: with a small learning rate (η*/10) ``Tr(F)`` rises much higher early in
    training than with the tuned one (η*). ``Tr(F)`` and its standard error are measured with
    :class:`torchfim.train.FisherTraceMonitor` on a fixed held subset of the training inputs (one
    label sampled from the model per input) every ``eval_every_early`` steps in the early phase and
    every ``eval_every`` steps after.
(b) *Fisher penalty*: final test accuracy is lower at η*/10 than at η*, and adding the Fisher
    penalty (:class:`torchfim.train.FisherPenalty`, ``kind="batch_gradient"``, ``every=10``, the
    paper's Eq. 3 with its every-10-steps cache) at η*/10 closes most of that gap.
(c) *Memorisation*: with a fraction of the training labels replaced by uniformly drawn ones, the
    Fisher penalty slows the fitting of the corrupted examples more than that of the clean ones
    (training accuracy on each subset, against the labels used for training, over training), at
    η*/10 and at η*, with a tuned α and with a fixed α (``noisy_fixed_alpha``).

How the hyper-parameters are chosen (on validation accuracy, one tuning seed per data set and
model, as the paper tunes η* "once with a single seed"): η* is the learning rate of ``lr_grid``
with the best final validation accuracy (runs that diverge are never chosen; ties go to the smaller
value), and α is the value of ``alpha_grid`` (the digest's ``{0.01, 0.03, 0.1}`` in the full
study) with the best final validation accuracy at η*/10 with the penalty. On noisy labels α is
tuned separately, as in the paper, over ``noisy_alpha_grid`` at each noisy-run learning rate, by
the best validation accuracy over training (the paper's early stopping; validation labels are
clean). The tuning seed is derived from the master seed apart from the evaluation seeds.

Every configuration is trained on ``n_seeds`` seeds, ``torchfim.compare.seeds(n_seeds,
master_seed)``, each split by :func:`torchfim.compare.derive_seeds` into the seeds of the weight
initialisation, the data order, the data split (validation/test sets and the held Tr(F) subset), the
label-noise draw and the label sampling of the Fisher penalty and the monitor. The configurations
of one seed share that seed, so the comparisons, :func:`torchfim.compare.prob_outperform`, are
paired by seed.

Interrupting and resuming. Each (configuration, seed) result is written, atomically, to
``DIR/runs/<run id>.json`` as soon as that run finishes; ``--resume`` loads those and runs only the
missing ones. ``results.json``, ``summary.md`` and the figures are always rebuilt from the run
files, and every run is deterministic (one intra-op thread, ``torch.use_deterministic_algorithms``,
seeded generators), so an interrupted and resumed study writes the same ``results.json`` as an
uninterrupted one. Wall-clock times are kept out of ``results.json``, in ``timings.json``.

The package, one job per module: :mod:`.settings` (presets, run specifications, names),
:mod:`.data` (splits and networks), :mod:`.train` (one run), :mod:`.plan` (which runs, tuning),
:mod:`.store` (run files), :mod:`.study` (running them all), :mod:`.assemble` (results.json),
:mod:`.figures`, :mod:`.summary` and :mod:`.claims` (summary.md), :mod:`.command` (the command
line).
"""

from .assemble import assemble
from .command import HELP, add_arguments, main
from .data import build_model
from .plan import count_runs
from .settings import DEFAULT_OUT, FULL, QUICK, TINY, RunSpec, Settings
from .study import run
from .train import train_one

__all__ = [
    "HELP",
    "DEFAULT_OUT",
    "Settings",
    "FULL",
    "QUICK",
    "TINY",
    "RunSpec",
    "build_model",
    "train_one",
    "count_runs",
    "run",
    "assemble",
    "add_arguments",
    "main",
]
