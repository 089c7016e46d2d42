"""Fisher-aware training: a Fisher penalty for the loss and a Tr(F) monitor.

* :class:`FisherPenalty` — the Fisher penalty of Jastrzębski et al. (2021), a 0-dim tensor to add
  to the task loss (``kind="batch_gradient"``, the paper's, or ``kind="trace"``), with the paper's
  compute-every-T-steps schedule.
* :class:`FisherTraceMonitor` — the unbiased ``Tr(F)`` estimate on held inputs with its standard
  error, every ``every`` steps, kept in ``.history`` and optionally written to CSV / TensorBoard.
* :func:`plot_trace` — Tr(F) over training with its error band, from monitors or their CSV files
  (:func:`read_trace_csv` reads one back).
* ``torchfim.train.trainer_callback.FisherTraceCallback`` — the monitor in transformers' ``Trainer``, saved
  in its checkpoints and resumed with them; ``FisherPenaltyCallback`` does the same for the penalty's state
  (that module imports transformers; this package does not).

See ``docs/math.md`` §7 (the Fisher penalty).
"""

from .monitor import FisherTraceMonitor
from .penalty import KINDS, FisherPenalty
from .trace_plot import plot_trace, read_trace_csv
from .trace_record import TraceRecord

__all__ = ["KINDS", "FisherPenalty", "FisherTraceMonitor", "TraceRecord", "plot_trace", "read_trace_csv"]
