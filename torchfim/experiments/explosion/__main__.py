"""``python -m torchfim.experiments.explosion [options]``: the same as ``torchfim reproduce explosion``."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
