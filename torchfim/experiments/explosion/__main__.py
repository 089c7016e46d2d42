"""``python -m torchfim.experiments.explosion [options]``: the same as ``torchfim reproduce explosion``, messages
included (a bad option or --out is one line naming the fix, not a traceback)."""

import sys

from ...cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "explosion", *sys.argv[1:]]))
