"""``torchfim report``: a Fisher-information report of a model on a data set, with error bars.

Usage::

    torchfim report [--model MODULE:FACTORY] [--checkpoint FILE] [--data MODULE:FACTORY]
                    [--family NAME] [--out DIR]

``MODULE:FACTORY`` names an importable callable (the current directory is on ``sys.path``; a path
``dir/file.py:FACTORY`` works too) that takes no arguments. The model factory returns an
``nn.Module``; the data factory returns a tensor of inputs, an ``(inputs, targets)`` pair, a
torch ``Dataset`` yielding ``x`` or ``(x, y)``, or a dict of keyword inputs (a tokenizer's output).
Outputs with positions (a language model's tokens) are read one vector per position, as
:func:`torchfim.fisher` reads them; ``--mask KEY`` names the dict entry marking the observed ones
(:mod:`torchfim.report.outputs`). ``--checkpoint`` is a file written by ``torch.save``:
a state dict (loaded strictly into the ``--model`` or default model) or a whole module. With no
flags, the embedded default is used: the demo's tanh MLP (64-32-32-10), trained for a few seconds
on scikit-learn's digits, and all 1797 digits as data.

The report (:func:`run_report`), written to ``--out`` (default ``torchfim-report/``):

* ``report.md`` -- readable on its own, figures embedded, with the numbers behind each figure;
* ``report.json`` -- every number (key ``"torchfim_report"`` holds the format version);
* ``model.pt`` -- the model's ``state_dict`` (``torchfim report --checkpoint DIR/model.pt`` on the
  default re-creates the same report without training);
* figures: ``trace_per_layer.png`` (per-layer Tr(F), exact, with a score-estimator draw and its
  ±2 standard errors), ``variance_per_layer.png`` (Var of the per-layer trace estimators Î1 and Î2
  with their upper bounds), ``samples_needed.png`` (labels per input for a 10% relative standard
  error, one σ, of each layer's trace), ``spectrum.png`` (eigenvalues of the per-layer exact blocks),
  ``empirical_vs_true.png`` (only when the data has targets) and ``overview.png`` (four panels).

"Layer" means one parameter tensor (``0.weight``, ``0.bias``...): a block of ``structure="blocks"``.
Per-layer variances are exact: what :func:`torchfim.fisher_variance` with ``structure="trace"`` gives
on the model with every other parameter frozen (``requires_grad=False``), which makes θ that one
tensor; the model's and every layer's come from one pass per estimator (:mod:`torchfim.trace_summary`).
Tr(F) and the score-estimator variances use all inputs; the Hessian-estimator parts (one
forward-over-forward pass per parameter and input) use a seeded random subset of
``variance_inputs`` inputs (default 256, shrunk for large models, see
:data:`~torchfim.report.settings.HESSIAN_BUDGET`), and so, for comparability, does the Î1-vs-Î2
comparison.

Cost: besides the Hessian parts, about ``L + 5`` passes over all inputs (L = parameter tensors: one
exact-block pass per layer of at most ``max_block`` parameters for the spectra); about 7 s for the
default on 2 cores. The exact Fisher and the closed forms read every output number of an input (a
language model's tokens × vocabulary): where they would not fit in memory, or would take longer than
:data:`~torchfim.report.settings.FULL_REPORT_SECONDS` by the estimate of :mod:`~torchfim.report.cost`,
the report says so before anything runs and gives the score-only report instead
(:mod:`~torchfim.report.score_only`: Tr(F) per layer by the score estimator with error bars from its own
labels, the empirical Fisher beside it, one figure ``trace_score_only.png``); ``--mode score-only`` asks
for it on any model, ``--mode full`` computes the full report whatever it takes (refusing what does not
fit in memory).

The report is built in memory and only then written into ``--out``, which gets the report's own
files and nothing else: files already there (notes, a ``thesis.tex``, a ``runs/`` folder) stay
untouched, an earlier report's files are replaced, and a file with a report's name that no report
wrote makes the command refuse before computing anything. Every file is written completely to a
temporary file first and then renamed into place, report.json last, so a failed or interrupted
run never removes ``--out`` and never leaves a half-written file (:mod:`torchfim.report.publish`); the
files an interrupted run had already renamed into place are still its own, so the same command run again
replaces them.
While it computes, each finished step is kept in the folder ``.torchfim-report-steps`` inside ``--out``,
removed once the report is written: the same report run again after an interruption (the same weights,
forward and backward, data and options) reads the finished steps back and computes only the rest; ``--no-resume``
computes them all again (:mod:`torchfim.report.kept_steps`).

The package, one job per module: :mod:`~torchfim.report.settings` (file names, defaults, the
variance subset), :mod:`~torchfim.report.load` and :mod:`~torchfim.report.data` (factories,
checkpoints, data), :mod:`~torchfim.report.default` (the embedded default model),
:mod:`~torchfim.report.check` and :mod:`~torchfim.report.outputs`, :mod:`~torchfim.report.measure`, :mod:`~torchfim.report.assemble`
and :mod:`~torchfim.report.compute` (the numbers), :mod:`~torchfim.report.figures`,
:mod:`~torchfim.report.markdown` and :mod:`~torchfim.report.terminal` (rendering), :mod:`~torchfim.report.cost` (the time estimate), :mod:`~torchfim.report.score_only`
and :mod:`~torchfim.report.score_only_render` (the score-only report),
:mod:`~torchfim.report.publish` (writing), :mod:`~torchfim.report.kept_steps` (the finished steps, kept),
:mod:`~torchfim.report.wording` (its options named as the command line's flags or the API's keywords),
:mod:`~torchfim.report.run` (all of it) and
:mod:`~torchfim.report.command` (the command line).
"""

from .compute import compute_report
from .data import Data, as_data
from .default import default_model
from .run import run_report
from .settings import EMPIRICAL_FIGURE, FILES, FORMAT_VERSION

__all__ = ["run_report", "compute_report", "default_model", "Data", "as_data", "FORMAT_VERSION", "FILES",
           "EMPIRICAL_FIGURE"]
