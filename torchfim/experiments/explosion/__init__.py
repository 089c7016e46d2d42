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
(b) *Fisher penalty*: test accuracy (at the step of the best validation accuracy, the paper's
    early stopping; the final one beside it) is lower at η*/10 than at η*, and adding the Fisher
    penalty (:class:`torchfim.train.FisherPenalty`, ``kind="batch_gradient"``, ``every=10``, the
    paper's Eq. 3 with its every-10-steps cache) at η*/10 closes most of that gap (the fraction
    closed, with a bootstrap interval over the paired seeds).
(c) *Memorisation*: with a fraction of the training labels replaced by uniformly drawn ones, the
    Fisher penalty slows the fitting of the corrupted examples more than that of the clean ones
    (training accuracy on each subset, against the labels used for training, over training), at
    η*/10 and at η*, with a tuned α (and, optionally, a fixed α: ``noisy_fixed_alpha``).

Every run trains until its training accuracy plateaus: at least ``epochs`` per data set (100 on MNIST-1D; on
the digits enough for the un-penalised small-learning-rate runs to fit their training set), then on, checked every
tenth of them, until it moved by at most ``plateau_tolerance`` over the last fifth of the run's steps, up to
``max_epochs``; the study reports the epochs each configuration trained and whether its mean training accuracy had
plateaued. Hyper-parameters are chosen on validation
accuracy, on ``n_tuning_seeds`` tuning seeds derived from the master seed apart from the
evaluation seeds: η* is the learning rate of ``lr_grid`` with the best mean, over the tuning
seeds, of the best validation accuracy over training (a rate that diverges on any tuning seed is
never chosen; ties go to the smaller value), and α the value of ``alpha_grid`` with the best mean
of the same criterion at η*/10 with the penalty. On noisy labels α is tuned the same way,
separately, over ``noisy_alpha_grid`` at each noisy-run learning rate (validation labels are clean).

Every configuration is trained on ``n_seeds`` seeds, ``torchfim.compare.seeds(n_seeds,
master_seed)``, each split by :func:`torchfim.compare.derive_seeds` into the seeds of the weight
initialisation, the data order, the data split (validation/test sets and the held Tr(F) subset), the
label-noise draw and the label sampling of the Fisher penalty and the monitor. The configurations
of one seed share that seed, so the comparisons, :func:`torchfim.compare.prob_outperform`, are
paired by seed.

Interrupting and resuming. Each (configuration, seed) result is written, atomically, to
``DIR/runs/<run id>.json`` as soon as that run finishes; the same command run again loads those and runs only
the missing ones, where this code made them all (else it refuses them, and ``--resume`` goes on all the same, mixing
them with this code's runs). ``results.json``, ``summary.md`` and the figures are always rebuilt from the run
files, and every run is deterministic (one intra-op thread, ``torch.use_deterministic_algorithms``,
seeded generators), so an interrupted and resumed study writes the same ``results.json`` as an
uninterrupted one. Wall-clock times are kept out of ``results.json``, in ``timings.json``.
``results.json`` also keeps every run file's content, and ``--from-results results.json --out DIR``
writes those run files back and rebuilds the outputs from them (no training).

The package, one job per module: :mod:`.settings` (presets, run specifications, names),
:mod:`.data` (splits and networks), :mod:`.train` (one run), :mod:`.plan` (which runs, tuning),
:mod:`.store` (run files), :mod:`.study` (running them all), :mod:`.assemble` (results.json),
:mod:`.gap` (the fraction of the gap closed), :mod:`.figures`, :mod:`.summary` and :mod:`.claims`
(summary.md), :mod:`.command` (the command
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
