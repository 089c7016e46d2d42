"""What the processes of a shared computation (``across_processes=True``) must have alike beyond their weights, as
numbers for the one ``all_gather`` and the refusals when they differ: the model's dtype and kind of device
(:func:`model_kind`), its outputs on the first inputs (:func:`check_same_outputs`), and how the inputs are cut into
mini-batches (:func:`check_same_cut`)."""

from __future__ import annotations

import itertools
import math

import torch

from ._settings_digest import settings_number
from .errors import TorchfimError

__all__ = ["CUT_NUMBERS", "MODEL_NUMBERS", "check_same_cut", "check_same_kind", "check_same_outputs",
           "check_same_wrapping", "cut_numbers", "model_kind", "model_numbers", "model_parts", "names_numbers"]

#: How many numbers :func:`model_numbers` gives: 4 of the outputs, 2 of the kind, 2 of the names.
MODEL_NUMBERS = 8


def model_numbers(model: torch.nn.Module, outputs: list[float]) -> list[float]:
    """What the processes compare of their models beyond the weights, as numbers for the one ``all_gather``, last in
    its row: ``outputs`` (:func:`torchfim.engine.output_probe.output_digest`), :func:`model_kind` and
    :func:`names_numbers`; :func:`model_parts` reads them back."""
    return [*outputs, *model_kind(model), *names_numbers(model)]


def model_parts(every: list[list[float]]) -> tuple[list[list[float]], list[list[float]], list[list[float]]]:
    """Every process's outputs' digest, kind and names from the gathered rows, each ending in its
    :func:`model_numbers`: for :func:`check_same_outputs`, :func:`check_same_kind` and :func:`check_same_wrapping`."""
    return [e[-8:-4] for e in every], [e[-4:-2] for e in every], [e[-2:] for e in every]


#: The dtypes and device kinds that :func:`model_kind` numbers (by their place; -1: another).
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_DEVICES = ("cpu", "cuda", "mps", "xpu", "hpu", "npu", "meta")


def model_kind(model: torch.nn.Module) -> list[float]:
    """The dtype and device kind of the model's first trainable parameter (as :func:`torchfim._processes.model_device` picks it), as
    two numbers (:data:`_DTYPES`, :data:`_DEVICES`); NaN for what is no module or has no parameter."""
    params = list(model.parameters()) if isinstance(model, torch.nn.Module) else []
    first = next((p for p in params if p.requires_grad), params[0] if params else None)
    if first is None:
        return [math.nan, math.nan]
    return [float(_DTYPES.index(first.dtype)) if first.dtype in _DTYPES else -1.0,
            float(_DEVICES.index(first.device.type)) if first.device.type in _DEVICES else -1.0]


def check_same_kind(kinds: list[list[float]], what: str) -> None:
    """Refuse, for the call ``what``, processes whose models (:func:`model_kind`) are in other dtypes or on other
    kinds of device, naming each process's (each converts its inputs to its model's: a trial was told its inputs
    differed)."""
    for place, (differs, names, fix) in enumerate(_KINDS):
        known = [k[place] for k in kinds if math.isfinite(k[place])]
        if len(set(known)) > 1:
            said = ", ".join(f"process {r}'s {names[int(k[place])] if k[place] >= 0 else 'another'}"
                             for r, k in enumerate(kinds) if math.isfinite(k[place]))
            raise TorchfimError(f"{what} needs the model in one {differs} on every process, but they differ "
                                f"({said}); {fix}")


#: What :func:`check_same_kind` names for each number of :func:`model_kind`: the word, the names, the fix.
_KINDS = (("dtype", [str(d) for d in _DTYPES],
           "convert it alike on each (model.double(), model.float(), model.to(dtype))"),
          ("kind of device", list(_DEVICES), "put it on one kind of device on each (each process its own GPU)"))


#: Why processes whose models give other outputs are refused (``{}``: the call).
DIFFERENT_OUTPUTS = (
    "{} needs the same model on every process, but with the same weights and inputs the processes' models give "
    "other outputs (on the first inputs of the first mini-batch): their forwards differ, e.g. another activation, "
    "an attribute such as a temperature, a forward hook or a module in training mode on some processes alone; "
    "build the model, and set its mode, the same way on every process"
)


def check_same_outputs(digests: list[list[float]], what: str) -> None:
    """Refuse, for the call ``what``, processes whose :func:`torchfim.engine.output_probe.output_digest` (with the
    output dtype's eps appended) differ beyond rounding; those that could not take one (NaN) are not compared."""
    known = [d for d in digests if all(math.isfinite(v) for v in d)]
    if len(known) < 2:
        return
    # The digest's sums move by at most tol·Σ|o| (its weights ≤ 1.5: 1.5·tol·Σ|o|) where every output entry
    # agrees to a relative tol, so processes whose outputs agree entry by entry pass. Same code, weights and inputs
    # on one kind of device give the same bits; other thread counts or devices sum in other orders, some eps apart
    # per entry. 1e-4 is about 800 float32 eps, and an output that moves that little moves the Fisher about as
    # little, well inside its error bars; half precision rounds each entry to its eps (2⁻⁷ for bfloat16): 8 eps.
    tol = max(1e-4, 8 * max(d[3] for d in known))
    scale = max(d[2] for d in known)
    first = known[0]
    if any(abs(d[0] - first[0]) > tol * scale or abs(d[1] - first[1]) > 1.5 * tol * scale for d in known[1:]):
        raise TorchfimError(DIFFERENT_OUTPUTS.format(what))


def names_numbers(model: torch.nn.Module) -> list[float]:
    """Two numbers of the names of ``model``'s trainable parameters: of the names, and of the names without their
    leading ``module.`` (a ``DistributedDataParallel`` wrapper's); NaN for what is no module."""
    if not isinstance(model, torch.nn.Module):
        return [math.nan, math.nan]
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    bare = [name.removeprefix("module.") for name in names]
    return [settings_number(names), settings_number(bare)]


def check_same_wrapping(numbers: list[list[float]], what: str) -> None:
    """Refuse, for the call ``what``, processes whose trained parameters' names (:func:`names_numbers`) differ only by
    a ``module.`` prefix: a ``DistributedDataParallel`` wrapper on some processes and its ``.module`` on others."""
    known = [n for n in numbers if all(math.isfinite(v) for v in n)]
    if len({n[0] for n in known}) > 1 and len({n[1] for n in known}) == 1:
        raise TorchfimError(
            f"{what} needs the same model on every process, but some pass a DistributedDataParallel wrapper and "
            "others its .module (their parameters' names differ by the prefix 'module.'); pass the same on each, "
            "e.g. model.module everywhere"
        )


#: How many numbers :func:`cut_numbers` gives.
CUT_NUMBERS = 4


def cut_numbers(sizes: list[int]) -> list[float]:
    """How inputs are cut into mini-batches of ``sizes``, as numbers for the one ``all_gather``: a digest of the sizes
    in order, how many mini-batches, the first's size and the inputs in all (:func:`check_same_cut` reads them)."""
    return [settings_number(sizes), float(len(sizes)), float(sizes[0] if sizes else 0), float(sum(sizes))]


def check_same_cut(cuts: list[list[float]], sizes: list[int], rank: int, what: str,
                   shares: list[float] | None = None) -> None:
    """Refuse, for the call ``what``, processes that hold as many inputs cut into other mini-batches (their
    :func:`cut_numbers`, ``cuts``; this process, ``rank``, cuts them into ``sizes``), or whose ``shares`` of them
    do not add up to them all: each takes its rows of every mini-batch, so other cuts leave some inputs to two
    processes and others to none. Processes that hold other numbers of inputs are left to the check of the inputs
    themselves."""
    totals = {c[3] for c in cuts}
    if len(totals) > 1 or (len({c[0] for c in cuts}) == 1 and (shares is None or sum(shares) == cuts[0][3])):
        return
    others = "; ".join(f"process {r}: {int(c[1])} mini-batches, the first of {int(c[2])}" if c[1] > 1 else
                       f"process {r}: one mini-batch of {int(c[2])}" for r, c in enumerate(cuts) if r != rank)
    raise TorchfimError(
        f"{what} needs the same mini-batches on every process (each computes on its rows of every mini-batch), but "
        f"the processes' {int(cuts[0][3])} inputs are in mini-batches cut differently (sizes {sizes_said(sizes)} "
        f"here, on process {rank}; {others}); cut them alike on every process: the same batch_size (and drop_last) "
        "in each one's DataLoader, or the same mini-batches passed to each"
    )


def sizes_said(sizes: list[int], runs: int = 6) -> str:
    """Mini-batch sizes for a message, runs of one size as ``8 ×12``, the first ``runs`` runs and the last."""
    counted = [(size, len(list(run))) for size, run in itertools.groupby(sizes)]
    said = [f"{size} ×{n}" if n > 1 and len(sizes) > runs else ", ".join([str(size)] * n) for size, n in counted]
    return ", ".join(said if len(said) <= runs + 1 else [*said[:runs], "…", said[-1]])
