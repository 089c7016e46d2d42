"""Benchmarks of torchfim against its peers (BackPACK, nngeometry, curvlinops).

Usage (from the repository root)::

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python benchmarks/run.py --json bench.json --markdown docs/performance.md
    .venv/bin/python benchmarks/run.py --quick --json /tmp/quick.json       # seconds, tiny sizes
    .venv/bin/python benchmarks/run.py --workloads diag-exact-mlp,floor      # a subset
    .venv/bin/python benchmarks/run.py --render bench.json --markdown docs/performance.md

What a run does, per workload (scikit-learn digits, all 1797 inputs, mini-batches of 256,
``torch.set_num_threads(2)``, float32):

1. builds every contender that can compute the workload (torchfim, the ``floor`` and each
   installed peer; peers that cannot compute it exactly are listed with the reason);
2. runs each contender once — the warm-up — and checks that all results agree: the relative
   error ``‖a − b‖ / max(‖a‖, ‖b‖)`` must be below ``--tol`` (1e-4). The largest group of
   mutually agreeing results wins (ties go to torchfim); a contender outside it is *flagged*,
   reported with its error in the details file and in the markdown, and not timed;
3. times the agreeing contenders over ``--reps`` (≥ 5) rounds, interleaved (round r runs the
   contenders in an order rotated by r, so that load changes on the machine hit all of them
   alike; a contender whose warm-up took under 0.3 s is timed up to 10 times per round), and
   keeps the median. Before each timed call it waits for other jobs to leave the cores free and
   retakes calls that ran under contention (:func:`suite.timing.contention_probe`, ``--quiet-wait``).

Outputs (each written atomically, temporary file + rename, after every workload):

* ``--json FILE``: exactly ``{workload: {contender: median seconds}}``;
* ``FILE`` with ``.details.json`` in place of ``.json`` (the sibling structure): ratios to the
  floor (``ratios``), the reference each ratio uses, agreement errors, flagged contenders,
  errors, notes, the raw samples, peer versions, the environment, the targets with met/missed,
  and the scaling sweep;
* ``--markdown FILE`` (with ``--plots DIR``, default ``<markdown dir>/performance``): the report
  that docs/performance.md is.

The scaling sweep (``--sweep``; implied by ``--markdown`` unless ``--no-sweep``) times
``torchfim.fisher(estimator="exact", structure="diag")`` against the width (P from ~1e3 to
~1e6), the batch size, the number of classes and the data-set size, each point in a fresh
subprocess that measures its peak resident memory (see :func:`suite.sweep.sweep_point`).

The suite, one job per module: :mod:`.config`, :mod:`.models` (networks and data),
:mod:`.workload` (contenders, the floor), :mod:`.workloads` (the registry of workloads, and their
builders by kind), :mod:`.peers` (the peers' computations), :mod:`.labels` and :mod:`.references`
(the labels of the score estimator; independent checks), :mod:`.agreement`, :mod:`.timing`,
:mod:`.sweep` and :mod:`.plots`, :mod:`.targets`, :mod:`.store` (the run's files),
:mod:`.render` (the markdown report) and :mod:`.cli` (the command line of ``run.py``).
"""
