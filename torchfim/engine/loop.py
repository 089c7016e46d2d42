"""The one loop over mini-batches that every public function and the monitor run.

For each non-empty mini-batch: one recorded forward by the backend, the family that reads the
flat outputs (wrapped over positions, with the mask), the output checks, and the independence
check on the first samples; the caller then asks the backend for products of that recording.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch

from .._progress import ProgressBar
from ..errors import TorchfimError, all_finite
from ..families import Family
from .backend import Backend, Recording
from .batch import Batch
from .fast_path_check import observed_outputs
from .functional import FunctionalBackend
from .model_checks import forward_error
from .per_module import PerModuleBackend
from .view import Mask, ModelView

#: Names of the computation paths (``"layers"`` is accepted as the old name of ``"modules"``).
BACKENDS = ("auto", "modules", "functional")


def backend_name(backend: str, method: str | None) -> str:
    """The backend chosen by ``backend=``, or by the deprecated ``method=`` (with a warning)."""
    if method is not None:
        warnings.warn("method= is deprecated; use backend= ('auto', 'modules' or 'functional')",
                      DeprecationWarning, stacklevel=3)
        backend = {"layers": "modules"}.get(method, method)
    if backend == "layers":
        backend = "modules"
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise TorchfimError(f"unknown backend {backend!r}; choose one of {', '.join(map(repr, BACKENDS))}")
    return backend


#: Whether the public call in progress was given a choice of backend by its caller (False within
#: :func:`without_backend_choice`).
_OFFERS_FUNCTIONAL: ContextVar[bool] = ContextVar("torchfim_offers_functional", default=True)


@contextmanager
def without_backend_choice() -> Iterator[None]:
    """Within: the engine's refusals name no ``backend=``, for a caller of the public functions that takes none
    (``torchfim report``, whose user cannot pass one)."""
    token = _OFFERS_FUNCTIONAL.set(False)
    try:
        yield
    finally:
        _OFFERS_FUNCTIONAL.reset(token)


def make_backend(view: ModelView, backend: str, offers_functional: bool | None = None) -> Backend:
    """The backend named ``backend`` for ``view`` (``"auto"``: the per-module backend); ``offers_functional``: whether
    the caller takes ``backend=`` (a module that only the generic rule covers and that fails is refused naming
    ``backend='functional'`` as a way out only then; None: as :func:`without_backend_choice` says, else True)."""
    if backend == "functional":
        return FunctionalBackend(view)
    return PerModuleBackend(view, _OFFERS_FUNCTIONAL.get() if offers_functional is None else offers_functional)


def run(
    view: ModelView,
    backend: Backend,
    batches: Iterable[Batch],
    family: Family,
    mask: Mask = None,
    progress: bool = False,
    desc: str = "torchfim",
    split: bool = False,
    whole: bool = False,
    grams: bool = False,
    total: int | None = None,
) -> Iterator[tuple[Recording, Family]]:
    """Recordings of every mini-batch, each with the family of its flat outputs (checked), under a progress bar
    that counts inputs as their computation ends (``total``: their number, where known).

    With ``split`` (for computations that pull many vectors back and draw nothing at random), a
    large mini-batch is recorded in the groups of rows the backend asks for
    (:meth:`~.backend.Backend.row_groups`), each yielded as a mini-batch of its own. With ``whole`` too
    (closed forms, which pull back all output numbers of an input together), the groups are sized for
    that, and a group whose pull-back would not fit in memory is recorded again in as many smaller groups
    as it takes (:meth:`~.backend.Backend.rows_for_whole_outputs`; ``grams``: the computation builds an
    output Gram matrix per input too).
    """
    checked = 0
    versions = view.versions()
    with ProgressBar(desc=desc, unit="input", total=total, disable=not progress) as bar:
        for index, batch in enumerate(batches):
            _check_finite_inputs(batch, index)
            view.check_call(batch)
            # A mask tensor that does not fit the batch is not cut: the family refuses it below, whole.
            cuttable = split and (not isinstance(mask, torch.Tensor) or (mask.dim() > 0 and mask.shape[0] == batch.size))
            groups = backend.row_groups(batch, whole) if cuttable else [slice(0, batch.size)]
            for rows, part, rec in _recordings(view, backend, batch, groups, whole and cuttable, grams):
                cut = rows != slice(0, batch.size)
                part_mask = mask[rows] if cut and isinstance(mask, torch.Tensor) else mask
                fam = view.family_for(rec.shape, part, family, part_mask)
                fam.check_output(rec.output)  # with its graph, where the backend keeps one: it names the last operation
                view.check_fast_path(part, rec.values, observed_outputs(fam, rec.values))
                checked = view.check_independent_unmoved(part, rec.values, checked, versions)
                yield rec, fam
                bar.update(rec.batch.size)  # after the caller's work on it: a large mini-batch's groups move the bar
                view.check_unchanged(versions)


def closed_form_groups(backend: Backend, rec: Recording, mask: Mask, whole: bool, grams: bool) -> list[slice] | None:
    """The groups of rows in which :func:`run` with ``split`` (and ``whole``, ``grams``) would record ``rec``'s
    mini-batch for a closed form, or None where it would record it whole, so that ``rec`` serves as it is: for a
    closed form computed in the pass of an estimate that draws labels, whose mini-batches are never cut (cutting
    would change which labels their rows get). A group too large for a pull-back of all its output numbers is cut
    into the groups :func:`_recordings` would cut it into; raises where one input does not fit."""
    batch = rec.batch
    if isinstance(mask, torch.Tensor) and not (mask.dim() > 0 and mask.shape[0] == batch.size):
        return None  # a mask tensor that does not fit the batch is not cut (run's rule)
    groups = backend.row_groups(batch, whole)
    if groups != [slice(0, batch.size)]:
        return groups
    most = backend.rows_for_whole_outputs(rec, grams) if whole else batch.size
    if most >= batch.size:
        return None
    step = math.ceil(batch.size / math.ceil(batch.size / most))
    return [slice(start, min(batch.size, start + step)) for start in range(0, batch.size, step)]


def group_recordings(view: ModelView, backend: Backend, batch: Batch, groups: list[slice], family: Family,
                     mask: Mask, whole: bool, grams: bool) -> Iterator[tuple[Recording, Family]]:
    """Recordings of ``batch``'s rows in ``groups`` (:func:`closed_form_groups`), each with the family of its flat
    outputs, as :func:`run` yields them (its checks were made on the whole mini-batch)."""
    for rows, part, rec in _recordings(view, backend, batch, groups, whole, grams):
        part_mask = mask[rows] if isinstance(mask, torch.Tensor) else mask
        yield rec, view.family_for(rec.shape, part, family, part_mask)


def _recordings(view: ModelView, backend: Backend, batch: Batch, groups: list[slice],
                whole: bool, grams: bool) -> Iterator[tuple[slice, Batch, Recording]]:
    """``(rows, their batch, its recording)`` for each group of ``batch``'s rows; with ``whole``, a group
    too large for a pull-back of all its output numbers is recorded again in smaller groups of nearly
    equal size (one forward more, against the output width's backward passes)."""
    for rows in groups:
        part = batch if rows == slice(0, batch.size) else batch.rows(rows)
        rec = recorded(view, backend, part)
        most = backend.rows_for_whole_outputs(rec, grams) if whole else part.size
        if most >= part.size:
            yield rows, part, rec
            continue
        del rec  # its taps go before the smaller groups record theirs
        count = math.ceil(part.size / most)
        step = math.ceil(part.size / count)
        for start in range(rows.start, rows.stop, step):
            sub = slice(start, min(rows.stop, start + step))
            piece = batch.rows(sub)
            yield sub, piece, recorded(view, backend, piece)


def recorded(view: ModelView, backend: Backend, part: Batch) -> Recording:
    """``backend.record(part)``; a forward that fails on inputs it does not take raises :func:`.forward_error`'s
    clear error, any other failure its own."""
    try:
        return backend.record(part)
    except (RuntimeError, IndexError, ValueError) as err:
        clear = err if isinstance(err, TorchfimError) else forward_error(
            part, view.input_dtype, err, in_forward=Batch.raised_in_call(err))
        if clear is err:
            raise
        raise clear from err


def _check_finite_inputs(batch: Batch, index: int) -> None:
    """Refuse NaN or Inf in a floating-point input tensor, named by its argument and its mini-batch (from 0)."""
    named = [(f"positional argument {i}", a) for i, a in enumerate(batch.args)]
    for name, t in named + [(f"input {k!r}", v) for k, v in batch.kwargs.items()]:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not all_finite(t):
            raise TorchfimError(
                f"the inputs contain NaN or Inf ({name} of mini-batch {index}, counting from 0); clean or drop "
                "those samples before computing the Fisher (torch.isfinite(x).flatten(1).all(1) marks the finite rows)"
            )


def check_finite_result(value: torch.Tensor | dict, what: str, dtype: torch.dtype) -> None:
    """Refuse a result with NaN/Inf entries, saying where they come from."""
    values = value.values() if isinstance(value, dict) else [value]
    if all(all_finite(v) for v in values):
        return
    if dtype == torch.float64:  # .double() is no fix: the outputs themselves are out of range
        raise TorchfimError(
            f"{what} has non-finite entries: the per-sample products overflowed even in torch.float64, or the "
            "model produced non-finite derivatives. In float64 that takes extreme outputs: the family's moments "
            "of them (a Poisson rate e^o squared at o ≈ 700, 1/σ⁴ for σ near 1e-80, a variance e^s at s ≈ ±700, "
            "a gamma shape e^o that underflows to 0 below o ≈ −745 and divides the label draw) or activations "
            "beyond 1e154; check the largest and the smallest outputs the model returns and rescale the inputs or "
            "the output layer"
        )
    if dtype == torch.float16:  # the sums are float32's: what overflows is often the result, returned in float16
        raise TorchfimError(
            f"{what} has non-finite entries: the result does not fit in torch.float16, whose largest number is "
            "65504 (an entry of the mean beyond it, though summed in float32), or the per-sample products overflowed, "
            "or the model produced non-finite derivatives; compute in float32 with model.float() (bfloat16 has "
            "float32's range), or rescale the inputs"
        )
    raise TorchfimError(
        f"{what} has non-finite entries: the per-sample products overflowed in {dtype} (inputs or activations too "
        "large for it, or the family's moments of the outputs: a Gaussian's 1/σ² and 1/σ⁴ for a small σ, a Poisson "
        "rate e^o at large o) or the model produced non-finite derivatives; rescale the inputs (the targets, for a "
        "Gaussian σ far from 1), or compute in float64 with model.double()"
    )
