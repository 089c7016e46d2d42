"""``python -m torchfim.experiments.soen_sun [options]``: the same as ``torchfim reproduce soen-sun``."""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
