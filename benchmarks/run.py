#!/usr/bin/env python
"""Benchmarks of torchfim against its peers (BackPACK, nngeometry, curvlinops).

The entry point of the benchmark suite (the package ``suite`` beside this file, whose docstring
says what a run does and writes). Usage (from the repository root)::

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python benchmarks/run.py --json bench.json --markdown docs/performance.md
    .venv/bin/python benchmarks/run.py --quick --json /tmp/quick.json       # seconds, tiny sizes
    .venv/bin/python benchmarks/run.py --workloads diag-exact-mlp,floor      # a subset
    .venv/bin/python benchmarks/run.py --render bench.json --markdown docs/performance.md
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from suite.cli import main

if __name__ == "__main__":
    sys.exit(main())
