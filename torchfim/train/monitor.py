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
  held inputs is typically within a couple of ``stderr``. That conditional standard error, the label noise alone (to
  compare measurements on the same held inputs), is what ``subset=N`` (all ``N`` held inputs) with
  ``n_samples ≥ 2`` records: the finite-population correction below removes the input spread entirely.

Two options make it cheaper or steadier (formulas in :mod:`torchfim.train.trace_stats`):

* ``subset=m``: each measurement uses ``m`` of the ``N`` held inputs, the next window of a fixed
  random permutation (drawn once from the monitor's generator; windows follow each other and
  wrap around), so a measurement costs ``m/N`` of a full one. The target is then the mean over
  all ``N`` held inputs, and ``stderr`` is the finite-population standard error
  ``√(((1 − f) s² + f v̄)/m)``, ``f = m/N``, where ``s²`` is the spread of the ``mᵢ`` (input
  sampling and label noise) and ``v̄`` the label variance of an ``mᵢ`` (estimated from the k
  labels when k ≥ 2; ``s²`` stands in for it when k = 1, which errs on the safe side by at most
  ``1/(1 − f)`` in variance). The correction shrinks only the input-sampling part, so the label
  noise is counted whole even when ``m = N``.
* ``control_variate=True``: each measurement also re-draws the previous measurement's labels (same
  random numbers) at the current weights, and carries the previous estimate over by the paired
  difference; the estimate stays unbiased, its variance drops when the weights moved little, and
  each record's ``variance_ratio`` says by how much (see
  :class:`~torchfim.train.trace_stats.ControlVariate`). It costs two passes per measurement.
  The target is the mean over the held inputs (like ``subset``); without a subset and with
  ``k = 1`` the between-input spread stays in the variances, so the SE errs on the safe side. On
  windows of a few inputs per chain the SE is low as the plain subset's is (5 per chain, skewed
  norms: about 10 % in variance), since a small window's variance estimate errs with its mean.

Sampling order (what a generator seeded identically reproduces): without options, each held
mini-batch's labels come from one call ``family.sample(o, k, generator)`` on its outputs, batch
after batch. With ``subset``, the first measurement first draws ``torch.randperm(N, generator=g)``
over the held inputs (pooled in order; with ``control_variate`` two permutations, one per chain),
and each window is one mini-batch: with ``control_variate`` the first chain's ``⌈m/2⌉`` inputs
followed by the second's ``⌊m/2⌋`` (without a subset the chains are the even and odd held
inputs). Held mini-batches that do not join into one pool (other sequence lengths) are pooled by group
(:mod:`.held`, rows numbered through the groups); a window is then one mini-batch per group, in that order.
With ``control_variate`` the generator's state is saved before each fresh draw, and the next measurement
re-draws that window's labels from a copy of the generator set to that state.

Under several processes (``torch.distributed``), ``across_processes=True`` shares each measurement between
them: each measures its share of the held inputs and the records combine the shares
(:mod:`torchfim.train.process_share`); otherwise each process measures its own held inputs on its own.

Measuring is done in ``eval()`` mode (BatchNorm uses its running statistics, Dropout is off; the paper measures
Tr(F) the same way) on the monitor's copy of the model, whose own modules keep their mode; modules in training mode
that this changes are named in one warning (:mod:`.eval_note`). It leaves no gradients in ``.grad`` and draws
labels only from its own generator, so adding a monitor does not change a training run. A measurement that raises
or is interrupted (Ctrl-C) leaves the monitor as it found it: measuring again draws the window and the labels that
measurement would have drawn, and counts the parameters as unmeasured.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .._batches import Inputs
from .._processes import announced, model_device
from .._settings_digest import family_settings, function_settings
from ..engine.labels import ModelLabels
from ..engine.output_reading import check_class_dim
from ..errors import TorchfimError, check_n_samples, warn_user
from ..families import Family, get_family
from ..keyword_hints import explains_keywords
from .arguments import check_int
from .checkpoint import VERSION, checked, generator_state, inputs_checksum, parameter_shapes, restored_generator
from .engine_path import EnginePath
from .eval_note import EvalNote
from .held import hold, pooled_groups, window_batches
from .process_share import FAILED_BEFORE, shared
from .record_sinks import CsvSink, TensorBoardSink, process_paths
from .step_order import StepOrder
from .trace_record import COLUMNS, TraceRecord
from .trace_stats import ControlVariate, Windows, mean_and_variance
from .window_options import check_output_and_mask, check_window, check_window_options

#: Seed of the private generator used when no ``generator`` is given.
DEFAULT_SEED = 0


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
        model: the network being trained (outputs ``(B, C)``, or ``(B, *pos, C)`` with one observation
            per position as in :func:`torchfim.fisher`; samples treated independently in eval mode).
        inputs: held inputs, a tensor whose first dimension is the batch, a dict of keyword inputs
            (Hugging Face style) or an iterable of such mini-batches (or of ``(inputs, targets)`` pairs);
            read once, at construction. Labels (a dict's ``labels``, a pair's targets) are not passed to the
            model, but decide which positions count, as the model's loss reads them and as in
            :func:`torchfim.fisher`: a causal language model's are shifted, a position labelled -100 is left
            out, and an encoder-decoder without ``decoder_input_ids`` gets those built from them. The labels
            of the estimate are drawn from the model, never these (docs/models.md).
        family: output family name or :class:`~torchfim.families.Family`.
        every: measure on steps with ``step % every == 0``.
        n_samples: labels drawn per input per measurement.
        generator: ``torch.Generator`` for the labels. When None the monitor uses a private
            generator seeded with ``DEFAULT_SEED`` (plus the process's rank with ``across_processes``;
            never torch's global RNG, so measuring does not change the training run's random stream).
        csv_path: file to append records to (parent directories are created). Under several processes
            (``torch.distributed``) without ``across_processes``, each measures its own held inputs and writes
            its own file: process r > 0 ``<stem>.rank<r><suffix>`` beside it
            (:func:`~torchfim.train.record_sinks.process_paths`).
        tensorboard_dir: log directory for a ``SummaryWriter`` (process r > 0: its folder ``rank<r>``).
        subset: measure on this many held inputs per measurement (rotating windows, see the module
            docstring); None for all of them. A subset larger than the held inputs uses them all. Across W
            processes (``across_processes``) each measures ``⌈m/W⌉`` of its share, ``W·⌈m/W⌉`` in all. With few
            inputs per window the standard error is itself estimated from few values, so ``± 2·stderr``
            covers less than 95 %: about 94 % at 16 inputs and 91 % at 8 if the error over its standard error
            follows Student's t (m − 1 degrees of freedom), less where the per-input values are heavy-tailed
            (88 % measured at 8 on a token model).
        control_variate: carry the previous estimate over by common random numbers (see the
            module docstring); adds the record field and CSV column ``variance_ratio`` and the
            TensorBoard tag ``fisher/trace_variance_ratio``. Needs at least 4 inputs per window.
        output: a function mapping the model's output to the tensor of the family's natural
            parameters (e.g. ``lambda out: out.logits``), as in :func:`torchfim.fisher`.
        mask: the observed positions of outputs with positions: the key of a dict input (e.g.
            ``"attention_mask"``) or a function of a held mini-batch returning ``(B, *pos)``
            booleans; padding positions add nothing to the trace.
        class_dim: ``-1`` when the classes are last; ``1`` for outputs ``(B, C, *pos)`` as
            ``F.cross_entropy`` takes them; None as in :func:`torchfim.fisher`.
        across_processes: share each measurement between the processes of a ``torch.distributed`` run:
            every process holds the same inputs, measures its share (rows ``r::W``) and gets the record of
            the whole held set, which the first process alone writes; every process must measure at the
            same steps (:mod:`torchfim.train.process_share`); building it is one collective, so every process
            builds it at the same point (one refused when built stops the others there, naming it).

    Example:
        >>> import torch, torchfim.train
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> held = torch.randn(64, 4)
        >>> mon = torchfim.train.FisherTraceMonitor(model, held, every=10, generator=torch.Generator().manual_seed(0))
        >>> [mon.step(s) is None for s in (0, 5, 10)]
        [False, True, False]
        >>> rec = mon.history[-1]
        >>> rec.step, rec.n_inputs, rec.n_samples, rec.trace > 0, rec.stderr > 0
        (10, 64, 1, True, True)
        >>> state = mon.state_dict()  # saved beside the model's and optimiser's, to resume from
        >>> resumed = torchfim.train.FisherTraceMonitor(model, held, every=10, generator=torch.Generator())
        >>> resumed.load_state_dict(state)
        >>> a, b = resumed.measure(20), mon.measure(20)  # the same labels: the generator's state was restored
        >>> (a.trace, a.stderr) == (b.trace, b.stderr), len(resumed.history)
        (True, 3)
        >>> cheap = torchfim.train.FisherTraceMonitor(model, torch.randn(512, 4), subset=64,
        ...                                           control_variate=True)
        >>> recs = [cheap.measure(s) for s in range(3)]
        >>> recs[-1].n_inputs, recs[0].variance_ratio, recs[-1].variance_ratio < 1
        (64, 1.0, True)
    """

    @announced(FAILED_BEFORE)
    @explains_keywords
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
        subset: int | None = None,
        control_variate: bool = False,
        output: Callable[[object], Tensor] | None = None,
        mask: str | Callable[[object], Tensor] | None = None,
        class_dim: int | None = None,
        across_processes: bool = False,
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
        self.every = check_int("every", every, 1, "pass e.g. every=10 to measure every 10 steps")
        self.n_samples = check_n_samples(n_samples)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TorchfimError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        self.generator = generator
        self.output, self.mask = check_output_and_mask(output, mask)
        self.class_dim = check_class_dim(class_dim)
        held = hold(inputs, ModelLabels(model))
        self.inputs, self._share = shared(held, across_processes)  # this process's share, and its place
        self._path, self._eval_note = EnginePath(), EvalNote("FisherTraceMonitor", self._share is None or self._share.rank == 0)
        self.n_inputs = sum(b.size for b in held)
        self._checksum: str | None = None  # of the held inputs, taken when a state is first saved or loaded
        self.history: list[TraceRecord] = []
        self._order, self._unseen_noted = StepOrder(model), False
        self.subset, self.control_variate = self._check_options(subset, control_variate)
        self._plan()
        self.columns = COLUMNS + (("variance_ratio",) if self.control_variate else ())

        if self._share is not None and self._share.rank > 0:  # the first process writes the shared records
            csv_path = tensorboard_dir = None
        self.csv_path, self.tensorboard_dir = process_paths(csv_path, tensorboard_dir)
        self._csv = None if self.csv_path is None else CsvSink(self.csv_path, self.columns)
        self._tensorboard = None if self.tensorboard_dir is None else TensorBoardSink(self.tensorboard_dir)
        if self._share is not None:
            self._share.built(model)

    def __repr__(self) -> str:
        return (
            f"FisherTraceMonitor(family={self.family!r}, every={self.every}, n_samples={self.n_samples}, "
            f"n_inputs={self.n_inputs}, subset={self.subset}, control_variate={self.control_variate}, "
            f"records={len(self.history)})"
        )

    # --------------------------------------------------------------- public
    def step(self, step: int) -> TraceRecord | None:
        """Measure when ``step % every == 0`` and return the record; else return None. A second call at the last
        measured step, the parameters unmoved, returns its record (:mod:`.step_order`)."""
        step = check_int("step", step, 0, "pass the optimisation step counter (0, 1, 2, ...)")
        if step % self.every != 0:
            return None
        return self._order.repeated(step, self.history) or self.measure(step)

    def measure(self, step: int) -> TraceRecord:
        """Measure now (whatever ``every`` says), record and return the :class:`TraceRecord`."""
        step = check_int("step", step, 0, "pass the optimisation step counter (0, 1, 2, ...)")
        start = time.perf_counter()
        with self._kept_on_failure():
            if self._share is None:
                (trace, variance, plain), measured = self._estimate(), self._window_size
            else:  # the generator lives on the model's device, known before any engine is built
                generator = self._label_generator(model_device(self.model))
                trace, variance, plain, measured = self._share.measured(
                    lambda: (*self._estimate(), self._window_size), generator, self.model, self._shared_settings(),
                    lambda: self._path.outputs(self._path.current(self.model, self.output, self.class_dim),
                                               self._share.first))
        # After the measurement: one that fails must not stamp the parameters as measured (a later call at this
        # step would return the previous record, taken at other parameters)
        self._order.measuring(step, self.history)
        record = TraceRecord(
            step=step,
            trace=trace,
            stderr=math.sqrt(variance),
            n_inputs=measured,
            n_samples=self.n_samples,
            seconds=time.perf_counter() - start,
            variance_ratio=(variance / plain if plain > 0 else math.nan) if self.control_variate else None,
        )
        self._note_unseen_spread(record)
        self.history.append(record)
        if self._csv is not None:
            self._csv.append(record)
        if self._tensorboard is not None:
            self._tensorboard.log(record)
        return record

    def to_rows(self) -> list[dict[str, float | int]]:
        """The history as a list of dicts (keys ``step, trace, stderr, n_inputs, n_samples, seconds``,
        and ``variance_ratio`` with ``control_variate=True``)."""
        return [r.as_dict() for r in self.history]

    as_dicts = to_rows

    def state_dict(self) -> dict[str, object]:
        """What resuming needs (:mod:`torchfim.train.checkpoint`): the history, the generator's state, the subset
        windows' permutations and positions, the control-variate chains, the previous window's rows and the weights'
        fingerprint where they have not moved since the last record (:mod:`.step_order`)."""
        return {
            "version": VERSION, "settings": self._settings(), "history": [r.as_dict() for r in self.history],
            "generator": generator_state(self.generator), "windows": [w.state() for w in self._windows],
            "chains": None if self._cv is None else self._cv.state(),
            "previous": None if self._previous is None else list(self._previous), "order": self._order.state(),
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Go on from a saved :meth:`state_dict` as the saved run would (the same labels and windows); refused,
        with the difference named, for a monitor made with other held inputs or options, or on a model of other
        parameters (their number and shapes). The generator passed at construction, if any, is set to the saved
        state; ``csv_path`` is rewritten to hold exactly the restored history, and the TensorBoard events after its
        last step are purged. ``step`` at the restored last step, the weights as they were then, returns its record
        (:mod:`.step_order`)."""
        state = checked(state, "FisherTraceMonitor", self._settings(),
                        ("history", "generator", "windows", "chains", "previous"))
        self.history = [TraceRecord(**row) for row in state["history"]]
        self._order.load(state.get("order"))  # a state saved before it was kept has none
        self.generator = restored_generator(self.generator, state["generator"], "FisherTraceMonitor")
        for windows, saved in zip(self._windows, state["windows"]):
            windows.load(saved)
        if self._cv is not None:
            self._cv.load(state["chains"])
        self._previous = None if state["previous"] is None else tuple(state["previous"])
        if self._csv is not None:
            self._csv.rewrite(self.history)
        if self._tensorboard is not None:
            self._tensorboard.resume_after(self.history[-1].step if self.history else None)

    def close(self) -> None:
        """Flush and close the TensorBoard writer (the CSV file is never held open)."""
        if self._tensorboard is not None:
            self._tensorboard.close()

    def __enter__(self) -> FisherTraceMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ internals
    def _settings(self) -> dict[str, object]:
        """The options a saved state depends on."""
        if self._checksum is None:
            self._checksum = inputs_checksum(self.inputs)
        return {"family": self.family.name, "n_samples": self.n_samples, "n_inputs": self.n_inputs,
                "subset": self.subset, "control_variate": self.control_variate, "inputs_checksum": self._checksum,
                "processes": None if self._share is None else [self._share.rank, self._share.world],
                "parameters": parameter_shapes(self.model)}

    def _shared_settings(self) -> tuple:
        """What every process's monitor must have alike under ``across_processes`` (functions by their names and
        code)."""
        return (family_settings(self.family), self.every, self.n_samples, self.subset, self.control_variate,
                self.class_dim, function_settings(self.mask), function_settings(self.output))

    def _check_options(self, subset: object, control_variate: object) -> tuple[int | None, bool]:
        subset = check_window_options(subset, control_variate)
        n, m = self._local_sizes(subset)
        # Under across_processes, the process that measures the fewest decides, on every process alike.
        n = n if self._share is None else self._share.smallest
        size = n if m is None else min(m, n)
        where = " per process" if self._share is not None else ""
        check_window(size, control_variate, 1 if self._share is None else self._share.world, m is not None and m < n)
        # A window of one input that is its process's whole share (subset given) with k ≥ 2: its label noise alone,
        # a finite error. Across processes the record's variance is Σ_r (N_r/N)² V_r, NaN where any V_r is: so
        # finite where every window of one is a whole share: windows of ⌈m/W⌉ ≥ 2, or every share one input.
        largest = n if self._share is None else self._share.largest
        label_only = m is not None and self.n_samples > 1 and (m >= 2 or largest == 1)
        if size < 2 and not label_only and (self._share is None or self._share.rank == 0):  # said once
            world = 1 if self._share is None else self._share.world
            # Where a process holds one input, windows of ⌈subset/W⌉ ≥ 2 measure it whole, for its label noise.
            whole = ("subset=1" if world == 1 else f"subset ≥ {world + 1}") + " with n_samples ≥ 2 for the label noise of " \
                + ("the one held input alone" if world == 1 else "a process's one input, measured whole")
            fix = (f"pass subset ≥ {2 * world}" if m is not None and m < 2 and n >= 2 else  # a window can grow
                   f"hold at least {2 * world} inputs" + (" in a mini-batch" if world > 1 else "") +
                   (f", or pass {whole}" if n == 1 else ""))
            warn_user(f"torchfim: FisherTraceMonitor measures {size} input{where} per measurement, so its standard "
                      "error (the spread of the per-input values, which it needs two inputs to see) will be NaN; "
                      f"{fix}")
        return subset, control_variate

    def _note_unseen_spread(self, record: TraceRecord) -> None:
        """Say once that a standard error of 0 beside a trace above 0 is a spread not seen (every label of every input
        measured gave one value: a dominant class drawn every time), not an exact trace; its square stays an unbiased
        variance estimate over the measurements."""
        if record.stderr == 0.0 and record.trace > 0.0 and not self._unseen_noted and \
                (self._share is None or self._share.rank == 0):
            self._unseen_noted = True
            warn_user(f"torchfim: FisherTraceMonitor's measurement at step {record.step} gave the same squared score "
                      f"norm for every label of its {record.n_inputs} input{'s' if record.n_inputs != 1 else ''}, "
                      "so its standard error is 0: a spread not seen, not an exact trace; measure more inputs or draw "
                      "more labels (subset, n_samples)")

    def _local_sizes(self, subset: int | None) -> tuple[int, int | None]:
        """The held inputs this process measures, and its window (``⌈subset/W⌉`` across W processes)."""
        n = sum(b.size for b in self.inputs)
        if subset is None or self._share is None:
            return n, subset
        return n, -(-subset // self._share.world)

    def _plan(self) -> None:
        """Windows, control-variate chains and variance targets for the chosen options."""
        n, subset = self._local_sizes(self.subset)
        self._window_size = n if subset is None else min(subset, n)
        self._population = None if subset is None else n  # None: the held inputs as an i.i.d. sample
        self._windows: list[Windows] = []
        if subset is not None:
            self.inputs = pooled_groups(self.inputs)  # the pool to draw windows from
            half = (self._window_size + 1) // 2
            sizes = [half, self._window_size - half] if self.control_variate else [self._window_size]
            self._windows = [Windows(n, size) for size in sizes]
        self._cv: ControlVariate | None = None
        self._previous: tuple[Tensor | None, Tensor] | None = None  # window rows and generator state of the last draw
        if self.control_variate:
            size = self._window_size
            if self.subset is None:  # two fixed halves: the target is their mean, label noise only
                rows = [torch.arange(0, size, 2), torch.arange(1, size, 2)]
                self._cv = ControlVariate(rows, [len(r) for r in rows])
            else:  # two chains, each on its own permutation
                rows = [torch.arange(0, self._windows[0].size), torch.arange(self._windows[0].size, size)]
                self._cv = ControlVariate(rows, [n, n])

    @contextmanager
    def _kept_on_failure(self) -> Iterator[None]:
        """Within the block, a measurement; where it raises (or is interrupted), the subset windows, the window and
        generator state the control variate replays, and the generator go back to the states they had (a private
        generator the failed measurement made is made again), so that measuring again draws what it would have."""
        generator, previous = self.generator, self._previous
        windows = [w.state() for w in self._windows]
        drawn = None if generator is None else generator.get_state()
        try:
            yield
        except BaseException:
            for w, saved in zip(self._windows, windows):
                w.load(saved)
            self.generator, self._previous = generator, previous
            if generator is not None:
                generator.set_state(drawn)
            raise

    def _label_generator(self, device: torch.device) -> torch.Generator:
        if self.generator is None:
            rank = 0 if self._share is None else self._share.rank  # independent labels in each process
            self.generator = torch.Generator(device=device).manual_seed(DEFAULT_SEED + rank)
        return self.generator

    def _estimate(self) -> tuple[float, float, float]:
        self._eval_note.check(self.model)  # eval mode is set on the engine's copy, never on the user's modules
        return self._estimate_eval()

    def _window(self, generator: torch.Generator) -> Tensor | None:
        """The rows of the pooled held inputs this measurement uses: the next subset window (None: all)."""
        if not self._windows:
            return None
        picks = [w.next(generator) for w in self._windows]
        return picks[0] if len(picks) == 1 else torch.cat(picks)

    def _estimate_eval(self) -> tuple[float, float, float]:
        """``(trace, variance, variance of the fresh labels alone)``."""
        path = self._path.current(self.model, self.output, self.class_dim)  # once per measurement: walks the modules

        def norms_of(rows: Tensor | None, generator: torch.Generator) -> Tensor:
            picked = (self.inputs, None) if rows is None else window_batches(self.inputs, rows)
            return self._path.squared_norms(path, picked, generator, self.family, self.mask, self.n_samples)

        generator = self._label_generator(path[0].device)
        window = self._window(generator)
        if self._cv is None:
            trace, variance = mean_and_variance(norms_of(window, generator), self._population)
            return trace, variance, variance
        state = generator.get_state()
        fresh = norms_of(window, generator)
        replay = None
        if self._previous is not None:
            earlier, earlier_state = self._previous
            replayed = torch.Generator(device=generator.device)
            replayed.set_state(earlier_state)  # the same random numbers as that draw: common random numbers
            replay = norms_of(earlier, replayed)
        self._previous = (window, state)
        return self._cv.update(fresh, replay)
