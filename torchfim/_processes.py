"""The place of this process in a ``torch.distributed`` run, as the tools with ``across_processes=True`` need it
(:func:`torchfim.fisher`, :class:`torchfim.train.FisherTraceMonitor`): its rank and the world's size, where
collectives' tensors live, and a number that tells label generators apart."""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import torch
from torch import Tensor

from ._words import counted
from .errors import TorchfimError, warn_user

Result = TypeVar("Result")

__all__ = ["Attempt", "announced", "check_same_weights", "collective_device", "collective_failed", "gather_numbers",
           "keep_until_next", "model_device", "process_group", "process_place", "same_weights", "trained_names",
           "weights_fingerprint"]


#: Why processes that hold other weights are refused (``{}``: the call).
DIFFERENT_WEIGHTS = (
    "{} needs the same model on every process (each computes on its share of the inputs), but the processes' "
    "weights differ; wrap the model in DistributedDataParallel (which gives every process the first "
    "one's weights and keeps them equal), or load the same weights on every process"
)


def process_group() -> tuple[int, int] | None:
    """``(rank, world size)`` of this process in the default ``torch.distributed`` group; None without one."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return None
    return distributed.get_rank(), distributed.get_world_size()


def says_shared(across_processes: bool) -> bool:
    """Whether this process warns of a result that ``across_processes`` made the same on every process: all do
    otherwise, the first alone of a shared one (each said it once more, a user trial)."""
    place = process_group() if across_processes else None
    return place is None or place[0] == 0


def process_place(across_processes: object) -> tuple[int, int] | None:
    """``(rank, world)`` for ``across_processes=True`` (refused without an initialised process group), else None."""
    if not isinstance(across_processes, bool):
        raise TorchfimError(f"across_processes must be True or False, got {across_processes!r}")
    if not across_processes:
        return None
    place = process_group()
    if place is None:
        raise TorchfimError(
            "across_processes=True shares the computation between the processes of a torch.distributed run, but "
            "no process group is initialised; call torch.distributed.init_process_group first (torchrun does not), "
            "or pass across_processes=False"
        )
    return place


def collective_device(model_device: torch.device) -> torch.device:
    """Where the collectives' tensors live: for NCCL alone, the process's GPU (the model's), else the CPU."""
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return model_device if model_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first trainable parameter, as the engine's (else of its first parameter; the CPU
    without one): known before any engine is built, so a process whose engine fails still joins the collectives
    on the device the others use."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []  # else: refused by the computation
    first = next((p for p in params if p.requires_grad), params[0] if params else None)
    return torch.device("cpu") if first is None else first.device


#: The tensors of this process's last collective, held until its next one (:func:`keep_until_next`).
_LAST_COLLECTIVE: list[Tensor] = []


def keep_until_next(tensors: list[Tensor]) -> None:
    """Hold ``tensors``, the ones a collective just used, until the next collective replaces them.

    gloo's worker thread may let go of a finished collective after the call has returned. Where it drops the last
    reference to a tensor, it frees the tensor's Python object, which takes the GIL; if the main thread is then
    destroying the process group (the last reference to it gone: a ``DistributedDataParallel`` wrapper freed),
    which joins that thread while holding the GIL, the two wait for each other for good. Seen on torch 2.2, in
    two of three runs of ``tests/test_monitor_processes.py``, at the end of a spawned process; the tensors held here
    outlive the worker's reference, so the main thread frees them. One slot for the process: torch.distributed
    takes one collective at a time per group, and a caller ends with a small one where its big ones would
    otherwise stay held (:meth:`torchfim.process_rows.RowShare.mean`).
    """
    _LAST_COLLECTIVE[:] = tensors


def gather_numbers(numbers: list[float], model: torch.nn.Module,
                   what: str = "across_processes=True") -> list[list[float]]:
    """Every process's ``numbers`` (as many on each), in rank order, from one ``all_gather`` in float64 on the
    collectives' device for ``model``; where it fails, :func:`collective_failed` for the call ``what``."""
    global _GATHERS
    _GATHERS += 1
    mine = torch.tensor(numbers, dtype=torch.float64, device=collective_device(model_device(model)))
    every = [torch.empty_like(mine) for _ in range(torch.distributed.get_world_size())]
    with collective_failed(what):
        torch.distributed.all_gather(every, mine)
    keep_until_next([mine, *every])
    return [t.tolist() for t in every]


#: Why a collective of torchfim's failed (``{}``: the call, then what torch.distributed said).
NOT_REACHED = (
    "{}: the collective that shares this call between the processes failed, so another process did not reach "
    "this call or left the run (torch.distributed said: {}); every process must make the call at the same point, "
    "not under `if rank == 0:` (a monitor's step and a Fisher with across_processes=True are each one collective "
    "of all the processes: the first process alone writes the monitor's files), or pass across_processes=False to "
    "compute on one process alone"
)


@contextlib.contextmanager
def collective_failed(what: str) -> Iterator[None]:
    """Around a collective of the call ``what``: its ``RuntimeError`` (gloo's timeout waiting for a process that
    never came, or the connection its exit closed) raised as a :class:`TorchfimError` naming the likely cause and
    the fix, the original chained."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise  # (a RuntimeError too): memory, not a missing process
    except RuntimeError as err:
        said = " ".join(str(err).split())
        raise TorchfimError(NOT_REACHED.format(what, said[:300])) from err


#: How many gathers this process has made: a call's errors before its first are announced (:func:`announced`).
_GATHERS = 0
Call = TypeVar("Call", bound=Callable)


def announced(failed: list[float]) -> Callable[[Call], Call]:
    """Decorate a function with ``model`` and ``across_processes`` arguments (or ``across_processes`` in its
    ``**options``): where it runs across processes and raises before its first collective (a check of its
    arguments, on one process called otherwise than the others), the error is first announced to the other
    processes in the collective they wait in, ``failed`` being this process's numbers there (the failed flag
    set), so that they stop naming it; before, they waited until the process group's timeout (gloo's default: 30
    minutes)."""

    def wrap(function: Call) -> Call:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def call(*args: object, **kwargs: object) -> object:
            gathers = _GATHERS
            try:
                return function(*args, **kwargs)
            except Exception:
                across, model = _across_and_model(signature, args, kwargs)
                if _GATHERS == gathers and across and process_group() is not None:
                    with contextlib.suppress(Exception):  # the error raised here is the one that matters
                        gather_numbers(failed, model)
                raise

        return call  # type: ignore[return-value]

    return wrap


def _across_and_model(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[bool, object]:
    """Whether the call runs across processes (``across_processes``, or the same in its ``**options``), and its
    ``model`` (where the collectives' tensors go: :func:`model_device`, the CPU for anything else); also where the
    call does not bind (a keyword typo on one process), from the arguments as given."""
    try:
        arguments = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        model = kwargs.get("model", next((a for a in args if isinstance(a, torch.nn.Module)), None))
        return kwargs.get("across_processes") is True, model
    options = next((v for k, v in arguments.items() if signature.parameters[k].kind == inspect.Parameter.VAR_KEYWORD),
                   {})
    return arguments.get("across_processes", options.get("across_processes")) is True, arguments.get("model")


def trained_names(model: torch.nn.Module) -> list[str] | None:
    """The names of ``model``'s trainable parameters (None for what is no module: the computation says why)."""
    if not isinstance(model, torch.nn.Module):
        return None
    return [name for name, p in model.named_parameters() if p.requires_grad]


#: Numbers of a parameter tensor that :func:`weights_fingerprint` reduces at once.
_PIECE = 1 << 22
#: The longest period of :func:`weights_fingerprint`'s weights by place (a prime: no row length is a multiple of it).
_PLACES = 65521


def weights_fingerprint(model: torch.nn.Module, buffers: bool = False) -> float:
    """A number that tells the weights of two processes' models apart, frozen ones included (a base model loaded
    otherwise under the same adapter), or with ``buffers`` their floating-point buffers (their non-finite entries
    as 0: a causal mask's -inf would make it NaN, which no check reads): ``Σ_k (k + 1)(‖θ_k‖ + (½ Σᵢ θ_ki +
    ¼ Σᵢ wᵢ θ_ki) / √n_k)`` over those tensors in order, with ``wᵢ = ((i mod m) + 1)/m`` by the entry's place in its
    tensor, ``m = min(n_k, 65521)`` (a ramp, repeating only every 65521 entries, a prime: a transposed square weight
    or rows in another order move it; each term is at least ``¼‖θ_k‖``, so no cancellation), in float64 on their
    devices, in pieces of at most 2²² numbers (no float64 copy of a whole embedding); NaN where it cannot be taken
    (a lazy or meta parameter, a model that is no module: the computation says why) or is not finite, which no
    check reads. It tells apart models from other seeds or trained apart; one weight moved a little in a large model
    may go unseen."""
    try:
        tensors = ([b.detach().nan_to_num(0.0, 0.0, 0.0) for b in model.buffers() if b.is_floating_point()]
                   if buffers else [p.detach() for p in model.parameters()])
        terms = [(k + 1) * _norm_and_sums(t) for k, t in enumerate(tensors)]
        if not terms:
            return 0.0
        total = float(torch.stack([t.to(terms[0].device) for t in terms]).sum())  # one wait for the device
    except Exception:  # noqa: BLE001 (before the collective: raising here would leave the other processes waiting)
        return math.nan
    return total if math.isfinite(total) else math.nan


def _norm_and_sums(t: Tensor) -> Tensor:
    """``‖t‖ + (½ Σᵢ tᵢ + ¼ Σᵢ wᵢ tᵢ) / √n`` (:func:`weights_fingerprint`) in float64, on ``t``'s device."""
    squares, sums = [], []
    flat = t.reshape(-1)
    period = max(1, min(flat.numel(), _PLACES))
    ramp = torch.arange(1, period + 1, dtype=torch.float64, device=t.device)  # m wᵢ at i = 0, …, m − 1
    for start in range(0, max(flat.numel(), 1), _PIECE):
        piece = flat[start : start + _PIECE]
        squares.append(torch.linalg.vector_norm(piece, dtype=torch.float64) ** 2)
        whole = piece.numel() // period * period
        rows = piece[:whole].reshape(-1, period)
        by_place = rows[0].double() if len(rows) == 1 else rows.sum(0, dtype=torch.float64)  # Σ over l ≡ j (mod m)
        by_place[: piece.numel() - whole] += piece[whole:].double()
        weights = ramp.roll(-(start % period)) if start % period else ramp  # m wᵢ at i = start + j
        sums.append(0.5 * by_place.sum() + 0.25 * torch.dot(by_place, weights) / period)
    return torch.stack(squares).sum().sqrt() + torch.stack(sums).sum() / max(t.numel(), 1) ** 0.5


def same_weights(fingerprints: list[float]) -> bool:
    """Whether the processes' :func:`weights_fingerprint` agree (to rounding: processes on unlike devices sum in
    other orders; models that differ, by their initialisation or their training, differ far more)."""
    known = [f for f in fingerprints if math.isfinite(f)]
    return all(math.isclose(f, known[0], rel_tol=1e-9, abs_tol=1e-12) for f in known)


def check_same_weights(fingerprints: list[float], what: str, buffers: list[float] = ()) -> None:
    """Refuse, for the call ``what``, processes whose :func:`weights_fingerprint` differ; warn, once per process,
    where their buffers' differ (:data:`DIFFERENT_BUFFERS`)."""
    global _BUFFERS_NAMED
    if not same_weights(fingerprints):
        raise TorchfimError(DIFFERENT_WEIGHTS.format(what))
    if buffers and not same_weights(list(buffers)) and not _BUFFERS_NAMED:
        _BUFFERS_NAMED = True
        if says_shared(True):  # every process sees the same gathered buffers
            warn_user(DIFFERENT_BUFFERS.format(what))


#: Whether processes with other buffers were named in this process (:func:`check_same_weights`).
_BUFFERS_NAMED = False
#: Why processes whose buffers differ are warned of (``{}``: the call); not refused: plain DDP training leaves them
#: apart between its broadcasts (each process updates BatchNorm's statistics with its own batch).
DIFFERENT_BUFFERS = (
    "torchfim: {} found the processes' floating-point buffers different (BatchNorm's running statistics, which "
    "each process updates with its own batch, and DistributedDataParallel(broadcast_buffers=False) keeps apart): "
    "each process computed with its own, so the result mixes models that differ in them; use SyncBatchNorm, or "
    "give every process rank 0's buffers before the call (for b in model.buffers(): torch.distributed.broadcast(b, "
    "0))"
)


#: Errors of what the model cannot do rather than of what one process's rows hold (a missing forward-mode
#: derivative): where processes failed with one of these alone, the others raise it too (:meth:`Attempt.settle`), so
#: that a caller catching it (``compare_estimators``) gets the same answer on each, a process without rows included.
SHARED_ERRORS: list[type[Exception]] = []


class Attempt(Generic[Result]):
    """This process's part of a shared computation, run to its end or to its error before the collective that every
    process must reach either way (so that none waits for one that never comes); the collective carries
    :attr:`failed` (or :attr:`kind`), and :meth:`settle` then raises where any process failed."""

    def __init__(self, compute: Callable[[], Result]) -> None:
        try:
            self.result: Result | None = compute()
            self.error: Exception | None = None
        except Exception as err:  # noqa: BLE001 (raised by settle, once the other processes know)
            self.result, self.error = None, err

    @property
    def failed(self) -> bool:
        return self.error is not None

    @property
    def kind(self) -> float:
        """0 where it succeeded, ``2 + i`` where its error is of ``SHARED_ERRORS[i]``, else 1."""
        if self.error is None:
            return 0.0
        return float(next((2 + i for i, cls in enumerate(SHARED_ERRORS) if isinstance(self.error, cls)), 1))

    def settle(self, others_failed: int, what: str, kinds: Sequence[float] = ()) -> Result:
        """The result; or this process's error raised; or, where ``others_failed`` other processes failed, an error
        that says so. The error leaves this object and the raising frame as it goes: kept by a frame in its own
        traceback, it would hold the failed computation (engine state, suspended generators) until a later cyclic
        collection, possibly during interpreter teardown."""
        error, self.error = self.error, None
        if error is not None:
            try:
                raise error
            finally:
                error = None
        others = counted(int(others_failed), "other process", "other processes")
        if others_failed and len(set(kinds)) == 1 and kinds[0] >= 2:  # all failed alike, in what the model lacks
            shared = SHARED_ERRORS[int(kinds[0]) - 2]
            raise shared(f"{what}: {others} failed with {shared.__name__} (the error is "
                         f"raised there): {' '.join((shared.__doc__ or '').split())}")
        if others_failed:
            raise TorchfimError(f"{what}: {others} failed (the error is raised there), so "
                                "this one stops too")
        return self.result  # type: ignore[return-value]
