"""The record of one Tr(F) measurement of :class:`~torchfim.train.FisherTraceMonitor`, and the CSV columns it is
written in."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["COLUMNS", "TraceRecord"]


@dataclass(frozen=True)
class TraceRecord:
    """One measurement of ``Tr(F)`` on the held inputs.

    Attributes:
        step: the training step it was taken at.
        trace: the unbiased estimate of ``Tr(F)``, the mean over held inputs and sampled labels of
            the per-sample squared score norms ``‖∇_θ log p(y|x)‖²``.
        stderr: its standard error (per-input means' sample std over √n_inputs; see the module
            docstring for exactly what it covers, and for ``subset`` and ``control_variate``). NaN
            when there is a single input (the monitor warns when built so), save one held input
            measured with ``subset=1`` and ``n_samples ≥ 2``: its label noise alone.
        n_inputs: inputs the estimate is a mean over: all held inputs, or the ``subset`` window.
        n_samples: labels drawn per input ``k``.
        seconds: wall-clock time the measurement took.
        variance_ratio: with ``control_variate=True``, ``stderr²`` over the variance of the same
            measurement's fresh labels alone (below 1: the control variate helped); else None.

    Example:
        >>> import torch, torchfim
        >>> _ = torch.manual_seed(0)
        >>> model, held = torch.nn.Linear(4, 3).double(), torch.randn(200, 4, dtype=torch.float64)
        >>> mon = torchfim.train.FisherTraceMonitor(model, held, n_samples=4, generator=torch.Generator().manual_seed(0))
        >>> record = mon.step(0)
        >>> record.step, record.n_inputs, record.n_samples
        (0, 200, 4)
        >>> exact = float(torchfim.fisher(model, held, structure="trace"))  # what the estimate is unbiased for
        >>> abs(record.trace - exact) < 4 * record.stderr
        True
    """

    step: int
    trace: float
    stderr: float
    n_inputs: int
    n_samples: int
    seconds: float
    variance_ratio: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        """The fields as a dict (``variance_ratio`` only when it was measured)."""
        row = asdict(self)
        if self.variance_ratio is None:
            del row["variance_ratio"]
        return row


#: CSV columns (``variance_ratio`` is appended with ``control_variate=True``).
COLUMNS = tuple(f.name for f in fields(TraceRecord) if f.name != "variance_ratio")
