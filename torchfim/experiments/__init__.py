"""Paper reproductions at CPU scale, run by ``torchfim reproduce EXPERIMENT`` (:mod:`.command`).

Each experiment is a package whose modules each do one job (settings, data, measure or train,
store, assemble, figures, summary, command line); its ``command`` module provides ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int``, the protocol of :mod:`torchfim.cli`, and is
listed in :data:`torchfim.experiments.command.EXPERIMENTS`. Experiments import their optional
dependencies (matplotlib, scikit-learn, mnist1d) inside their functions, so ``torchfim --help``
works without them.

- ``soen-sun``: :mod:`torchfim.experiments.soen_sun`, the variance of the Fisher estimators Î1 and
  Î2 (Soen & Sun, NeurIPS 2021).
- ``explosion``: :mod:`torchfim.experiments.explosion`, the Catastrophic Fisher Explosion
  (Jastrzębski et al., ICML 2021); also ``torchfim explosion``, its name before ``reproduce``.
"""
