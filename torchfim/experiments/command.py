"""``torchfim reproduce EXPERIMENT``: one sub-command per paper reproduction in :data:`EXPERIMENTS`."""

from __future__ import annotations

import argparse
import importlib

__all__ = ["EXPERIMENTS", "HELP", "add_arguments", "main"]

#: Experiment name -> the module of its command line (``HELP``, ``add_arguments``, ``main``).
EXPERIMENTS: dict[str, str] = {
    "soen-sun": "torchfim.experiments.soen_sun.command",
    "explosion": "torchfim.experiments.explosion.command",
}

HELP = "regenerate a paper's experiments at CPU scale (figures, results.json, summary.md)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One sub-parser per experiment, each with that experiment's options."""
    sub = parser.add_subparsers(dest="experiment", metavar="EXPERIMENT", parser_class=type(parser))
    sub.required = True
    for name, module_name in EXPERIMENTS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        p.set_defaults(_experiment=module.main, _prog=p.prog)
        module.add_arguments(p)


def main(args: argparse.Namespace) -> int:
    """Run the experiment chosen on the command line."""
    return int(args._experiment(args) or 0)
