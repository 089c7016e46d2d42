"""Paper reproductions at CPU scale: the ``torchfim reproduce EXPERIMENT`` command.

Each experiment is a module listed in :data:`EXPERIMENTS` that provides ``HELP``,
``add_arguments(parser)`` and ``main(args) -> int`` (the same protocol as :mod:`torchfim.cli`'s
commands). Experiments import their optional dependencies (matplotlib, scikit-learn, mnist1d) inside
``main``/``run``, so ``torchfim --help`` works without them.

- ``soen-sun``: :mod:`torchfim.experiments.soen_sun`, the variance of the Fisher estimators Î1 and
  Î2 (Soen & Sun, NeurIPS 2021).
"""

from __future__ import annotations

import argparse
import importlib

__all__ = ["EXPERIMENTS", "HELP", "add_arguments", "main"]

#: Experiment name -> module implementing it.
EXPERIMENTS: dict[str, str] = {
    "soen-sun": "torchfim.experiments.soen_sun",
}

HELP = "regenerate a paper's experiments at CPU scale (figures, results.json/.csv, summary.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per experiment, each with that experiment's options."""
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", parser_class=type(parser))
    sub.required = True
    for name, module_name in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_experiment=module.main)


def main(args: argparse.Namespace) -> int:
    """Run the experiment chosen on the command line."""
    return int(args._experiment(args) or 0)
