"""``python -m torchfim`` runs the command line (see :mod:`torchfim.cli`)."""

import sys

from torchfim.cli import main

if __name__ == "__main__":
    sys.exit(main())
