"""``FisherTraceMonitor``: the trace of the Fisher on held inputs, measured during training.

On held inputs ``x_1..x_n`` with ``k = n_samples`` labels ``y_ij ~ p(·|xᵢ)`` drawn from the
model per input, the monitor records

* ``trace = (1/(nk)) Σᵢⱼ sᵢⱼ`` with ``sᵢⱼ = ‖Jᵢᵀ u_ij‖² = ‖∇_θ log p(y_ij|xᵢ)‖²``, the per-sample
  squared score norms: the unbiased estimate of ``Tr(F) = (1/n) Σᵢ tr(Jᵢᵀ Λᵢ Jᵢ)`` (the same as
  ``torchfim.fisher(model, inputs, estimator="score", structure="trace", n_samples=k)``). It is
  *not* the squared norm of the batch-mean gradient, which estimates ``Tr(F)/n``.
* ``stderr = std_i(mᵢ) / √n`` with ``mᵢ = (1/k) Σⱼ sᵢⱼ`` the per-input means and ``std`` the
  sample standard deviation (divisor n − 1). For the default ``k = 1`` this is the sample std of
  the ``nk`` per-(input, label) values over ``√(nk)``. It is the standard error of ``trace`` as an
  estimate of ``E_x Tr(F(x))`` when the held inputs are an i.i.d. sample of the data and the
  labels are drawn from the model: it counts the spread between inputs *and* the label noise.
  Conditional on the held inputs (the same inputs measured again with fresh labels) the spread
  of ``trace`` is smaller or equal, ``√((1/(n²k)) Σᵢ Var_y(sᵢ))``; so ``|trace − Tr(F)|`` on the
  held inputs is typically within a couple of ``stderr``.

Measuring is done with the model in ``eval()`` mode (BatchNorm uses its running statistics,
Dropout is off; the paper measures Tr(F) the same way) and each module's mode is restored
afterwards. It leaves no gradients in ``.grad`` and draws labels only from its own generator, so
adding a monitor does not change a training run.
"""

from __future__ import annotations

import csv
import io
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn

from .._batches import Inputs, iter_batches
from ..engine import ENGINE_LOCK, Backend, ModelView, batches, make_backend, run
from ..errors import TorchfimError, check_n_samples
from ..families import Family, get_family
from .penalty import _check_int

#: Seed of the private generator used when no ``generator`` is given.
DEFAULT_SEED = 0


@dataclass(frozen=True)
class TraceRecord:
    """One measurement of ``Tr(F)`` on the held inputs.

    Attributes:
        step: the training step it was taken at.
        trace: the unbiased estimate of ``Tr(F)``, the mean over held inputs and sampled labels of
            the per-sample squared score norms ``‖∇_θ log p(y|x)‖²``.
        stderr: its standard error (per-input means' sample std over √n_inputs; see the module
            docstring for exactly what it covers). NaN when there is a single input.
        n_inputs: number of held inputs ``n``.
        n_samples: labels drawn per input ``k``.
        seconds: wall-clock time the measurement took.
    """

    step: int
    trace: float
    stderr: float
    n_inputs: int
    n_samples: int
    seconds: float

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


COLUMNS = tuple(f.name for f in fields(TraceRecord))


def _load_summary_writer() -> type | None:
    """``torch.utils.tensorboard.SummaryWriter``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter


class FisherTraceMonitor:
    """Measure ``Tr(F)`` on fixed held inputs every ``every`` training steps.

    ``mon.step(step)`` returns None when ``step % every != 0``; otherwise it measures and returns
    a :class:`TraceRecord` with the unbiased trace estimate and its standard error (see the module
    docstring for the formulas), appends it to ``mon.history``, to the CSV file ``csv_path`` (one
    flushed line per record, header written once when the file is new or empty, so an interrupted
    run keeps its rows; an existing file must have the same header and is appended to) and to
    TensorBoard (tags ``fisher/trace`` and ``fisher/trace_stderr``) when ``tensorboard_dir`` is
    given and tensorboard is installed (otherwise a warning is issued once, at construction).

    Args:
        model: the network being trained (outputs ``(B, C)``; samples treated independently in
            eval mode).
        inputs: held inputs, a tensor whose first dimension is the batch or an iterable of
            mini-batches (tensors or ``(inputs, targets)`` pairs); read once, at construction.
        family: output family name or :class:`~torchfim.families.Family`.
        every: measure on steps with ``step % every == 0``.
        n_samples: labels drawn per input per measurement.
        generator: ``torch.Generator`` for the labels. When None the monitor uses a private
            generator seeded with ``DEFAULT_SEED`` (never torch's global RNG, so measuring does not
            change the training run's random stream).
        csv_path: file to append records to (parent directories are created).
        tensorboard_dir: log directory for a ``SummaryWriter``.

    Example:
        >>> import torch, torchfim.train
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> mon = torchfim.train.FisherTraceMonitor(model, torch.randn(64, 4), every=10,
        ...                                         generator=torch.Generator().manual_seed(0))
        >>> [mon.step(s) is None for s in (0, 5, 10)]
        [False, True, False]
        >>> rec = mon.history[-1]
        >>> rec.step, rec.n_inputs, rec.n_samples, rec.trace > 0, rec.stderr > 0
        (10, 64, 1, True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Inputs,
        family: str | Family = "categorical",
        every: int = 10,
        n_samples: int = 1,
        generator: torch.Generator | None = None,
        csv_path: str | os.PathLike | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TorchfimError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(p.requires_grad for p in model.parameters()):
            raise TorchfimError(
                "the model has no parameters with requires_grad=True, so its Fisher is empty; "
                "enable gradients on the parameters you want (p.requires_grad_(True))"
            )
        self.model = model
        self.family = get_family(family)
        self.every = _check_int("every", every, 1, "pass e.g. every=10 to measure every 10 steps")
        self.n_samples = check_n_samples(n_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TorchfimError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.inputs = self._hold(inputs)
        self._path_key: tuple[int, ...] | None = None
        self._path_cache: tuple[ModelView, Backend] | None = None
        self.n_inputs = sum(x.shape[0] for x in self.inputs)
        self.history: list[TraceRecord] = []

        self.csv_path = None if csv_path is None else Path(csv_path)
        if self.csv_path is not None:
            self._check_csv(self.csv_path)
        self.tensorboard_dir = None if tensorboard_dir is None else Path(tensorboard_dir)
        self._writer_cls = None
        self._writer = None
        if self.tensorboard_dir is not None:
            self._writer_cls = _load_summary_writer()
            if self._writer_cls is None:
                warnings.warn(
                    "tensorboard is not installed, so FisherTraceMonitor will not log to "
                    f"{str(self.tensorboard_dir)!r} "
                    "(records still go to .history and csv_path); pip install tensorboard to enable it",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def __repr__(self) -> str:
        return (
            f"FisherTraceMonitor(family={self.family!r}, every={self.every}, n_samples={self.n_samples}, "
            f"n_inputs={self.n_inputs}, records={len(self.history)})"
        )

    # --------------------------------------------------------------- public
    def step(self, step: int) -> TraceRecord | None:
        """Measure when ``step % every == 0`` and return the record; else return None."""
        _check_int("step", step, 0, "pass the optimisation step counter (0, 1, 2, ...)")
        if step % self.every != 0:
            return None
        return self.measure(step)

    def measure(self, step: int) -> TraceRecord:
        """Measure now (whatever ``every`` says), record and return the :class:`TraceRecord`."""
        _check_int("step", step, 0, "pass the optimisation step counter (0, 1, 2, ...)")
        start = time.perf_counter()
        trace, stderr = self._estimate()
        record = TraceRecord(
            step=step,
            trace=trace,
            stderr=stderr,
            n_inputs=self.n_inputs,
            n_samples=self.n_samples,
            seconds=time.perf_counter() - start,
        )
        self.history.append(record)
        if self.csv_path is not None:
            self._append_csv(record)
        if self._writer_cls is not None:
            self._log_tensorboard(record)
        return record

    def to_rows(self) -> list[dict[str, float | int]]:
        """The history as a list of dicts (keys ``step, trace, stderr, n_inputs, n_samples, seconds``)."""
        return [r.as_dict() for r in self.history]

    as_dicts = to_rows

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the CSV file is never held open)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> FisherTraceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    @staticmethod
    def _hold(inputs: Inputs) -> list[Tensor]:
        held = []
        for x, _ in iter_batches(inputs):
            if not isinstance(x, Tensor):
                raise TorchfimError(
                    f"each mini-batch of held inputs must be a torch.Tensor, got {type(x).__name__}"
                )
            if x.dim() == 0:
                raise TorchfimError("held inputs must have a batch dimension first, got a 0-dim tensor")
            if x.shape[0] > 0:
                held.append(x.detach())
        if not held:
            raise TorchfimError("the held inputs are empty: pass at least one input to measure Tr(F) on")
        return held

    def _label_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            self.generator = torch.Generator(device=device).manual_seed(DEFAULT_SEED)
        return self.generator

    def _estimate(self) -> tuple[float, float]:
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            return self._estimate_eval()
        finally:
            flags = {t for _, t in modes}
            if len(flags) == 1:
                self.model.train(flags.pop())
            else:
                for module, training in modes:
                    module.training = training

    def _engine(self) -> tuple[ModelView, Backend]:
        """The engine's view of the model, rebuilt whenever a parameter's storage, dtype or device changes.

        The view shares the parameter objects, so in-place updates by the optimiser are read live;
        ``p.data = ...``, ``model.double()`` or ``.to(device)`` give new storage and a new view.
        """
        key = tuple((id(p), p.data_ptr(), p.dtype, p.device, p.requires_grad) for p in self.model.parameters())
        if self._path_key != key:
            view = ModelView(self.model)
            self._path_cache = (view, make_backend(view, "auto"))
            self._path_key = key
        return self._path_cache

    def _estimate_eval(self) -> tuple[float, float]:
        view, backend = self._engine()
        generator = self._label_generator(view.device)
        k = self.n_samples
        norms = []
        with ENGINE_LOCK:
            for rec, fam in run(view, backend, batches(self.inputs, None, view.device, view.dtype), self.family):
                o = rec.values
                u = fam.output_score(fam.sample(o, k, generator), o)  # (B, k, C)
                norms.append(backend.sample_squares(rec, u))  # (B, k): ‖Jᵢᵀ u_ij‖²
        s = torch.cat(norms).double()  # (n, k)
        per_input = s.mean(1)
        trace = float(per_input.mean())
        n = per_input.shape[0]
        stderr = float(per_input.std() / math.sqrt(n)) if n > 1 else math.nan
        return trace, stderr

    def _check_csv(self, path: Path) -> None:
        if path.exists() and path.is_dir():
            raise TorchfimError(f"csv_path {str(path)!r} is a directory; pass a file path such as 'trace.csv'")
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                header = f.readline().strip()
            if header != ",".join(COLUMNS):
                raise TorchfimError(
                    f"csv_path {str(path)!r} exists with header {header!r}, not {','.join(COLUMNS)!r}; "
                    "pass a new path or delete the file (records are appended to an existing file)"
                )

    def _append_csv(self, record: TraceRecord) -> None:
        path = self.csv_path
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        if not path.exists() or path.stat().st_size == 0:
            writer.writerow(COLUMNS)
        writer.writerow([repr(v) if isinstance(v, float) else v for v in (getattr(record, c) for c in COLUMNS)])
        with path.open("a", newline="") as f:
            f.write(buf.getvalue())  # one write per record: header (first time) and row together
            f.flush()

    def _log_tensorboard(self, record: TraceRecord) -> None:
        if self._writer is None:
            self.tensorboard_dir.mkdir(parents=True, exist_ok=True)
            self._writer = self._writer_cls(log_dir=str(self.tensorboard_dir))
        self._writer.add_scalar("fisher/trace", record.trace, record.step)
        self._writer.add_scalar("fisher/trace_stderr", record.stderr, record.step)
        self._writer.flush()
