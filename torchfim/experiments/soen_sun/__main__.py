"""``python -m torchfim.experiments.soen_sun [options]``: the same as ``torchfim reproduce soen-sun``, messages
included (a bad option or --out is one line naming the fix, not a traceback)."""

import sys

from ...cli import main

if __name__ == "__main__":
    sys.exit(main(["reproduce", "soen-sun", *sys.argv[1:]]))
