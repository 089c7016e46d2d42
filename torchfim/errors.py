"""Exceptions raised by torchfim for bad input.

Every error torchfim raises on purpose is a :class:`TorchfimError`, a subclass of
:class:`ValueError`, whose message says what is wrong and what to do about it.
"""

from __future__ import annotations

import math
import numbers
import os
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import torch

_PACKAGE = str(Path(__file__).resolve().parent) + os.sep


class TorchfimError(ValueError):
    """Bad input to a torchfim function; the message names the problem and the fix.

    A ``ValueError``, so code that catches those catches it too.

    Example:
        >>> import torch, torchfim
        >>> try:
        ...     torchfim.fisher(torch.nn.Linear(2, 2), torch.randn(3, 2), structure="dense")
        ... except torchfim.TorchfimError as err:
        ...     print(isinstance(err, ValueError), err)
        True unknown structure 'dense'; choose one of 'full', 'diag', 'trace', 'blocks', ...
    """


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite (no NaN, no ±Inf).

    One sum decides in the common case (a NaN or Inf entry makes it non-finite); only a sum that
    overflows from finite entries falls back to the entrywise test, which costs several times more.
    """
    t = t.detach()  # a number is read back: no graph (and no warning about one)
    if math.isfinite(float(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


#: Packages that call torchfim back (a Trainer calls the callbacks): a warning goes past them to the user's line.
_CALLERS = ("transformers.", "accelerate.")


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn with ``message``, attributed to the first caller outside torchfim and the libraries that call it back
    (transformers' ``Trainer``): the user's line."""
    frame, level = sys._getframe(1), 2  # stacklevel 1 is this function, 2 its caller
    while frame is not None and (str(Path(frame.f_code.co_filename).resolve()).startswith(_PACKAGE)
                                 or str(frame.f_globals.get("__name__", "")).startswith(_CALLERS)):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


_KFAC = "Kronecker-factored structures (K-FAC, EK-FAC) are not in torchfim; docs/peers.md says what is"
_MC, _EF = "the Monte Carlo Fisher is estimator='score'", "the empirical Fisher is estimator='empirical'"
_BLOCKS = "structure='blocks' (one block per parameter tensor)"
#: The peers' names for torchfim's choices (BackPACK, nngeometry, curvlinops, laplace-torch, ASDL), named in the
#: error where a user passes one.
PEER_NAMES = {
    "kron": _KFAC, "kfac": _KFAC, "ekfac": _KFAC, "kflr": _KFAC, "mc": _MC, "fisher_mc": _MC,
    "ef": _EF, "emp": _EF, "fisher_emp": _EF, "ggn": "the generalised Gauss-Newton is estimator='exact'",
    "fisher_exact": "estimator='exact'", "dense": "structure='full'", "diagonal": "structure='diag'",
    "block_diag": _BLOCKS, "blockdiag": _BLOCKS,
}


def check_choice(kind: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``, else raise a :class:`TorchfimError` (naming torchfim's choice
    for a peer's name, :data:`PEER_NAMES`)."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        peer = PEER_NAMES.get(value.lower()) if isinstance(value, str) else None
        raise TorchfimError(f"unknown {kind} {value!r}; choose one of {listed}" + (f" ({peer})" if peer else ""))
    return value


def real_number(value: object) -> float | None:
    """``value`` as a float where it is one real number: a Python or NumPy int or float (or a 0-dim NumPy array of
    one), or a 0-dim tensor of a real dtype (with its value, so not on the meta device); None for anything else,
    such as a bool, a complex number, a string or a tensor of another shape. Options that take a real number check
    their range on the float (NaN is in none)."""
    value = _numpy_zero_dim(value)
    if isinstance(value, torch.Tensor):
        real = value.dim() == 0 and not (value.is_complex() or value.dtype == torch.bool or value.is_meta)
        return float(value.item()) if real else None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def whole_number(value: object) -> int | None:
    """``value`` as an int where it is one integer: a Python or NumPy integer (or a 0-dim NumPy array of one), or a
    0-dim tensor of an integer dtype;
    None for anything else, such as a bool, a float (even 3.0) or a tensor of another shape."""
    value = _numpy_zero_dim(value)
    if isinstance(value, torch.Tensor):
        whole = value.dim() == 0 and not (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool
                                          or value.is_meta)
        return int(value.item()) if whole else None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return None
    return int(value)


def _numpy_zero_dim(value: object) -> object:
    """The number a 0-dim NumPy array holds (``np.array(0.5)``, what ``arr.mean(keepdims=...)`` or ``np.asarray``
    of a number give), as a Python number; anything else unchanged (NumPy is not imported for the question)."""
    if type(value).__name__ == "ndarray" and type(value).__module__ == "numpy" and value.shape == ():
        return value.item()
    return value


#: The most labels per input :func:`check_n_samples` takes: torch's sizes are int64 (a larger count met a bare
#: OverflowError deep in torch, where a variance divided by it or labels were drawn).
MAX_N_SAMPLES = 2**63 - 1


def check_n_samples(n_samples: object) -> int:
    """Return ``n_samples`` as an int if it is a positive integer (:func:`whole_number`) of at most
    :data:`MAX_N_SAMPLES`, else raise."""
    value = whole_number(n_samples)
    if value is None or value <= 0:
        raise TorchfimError(
            f"n_samples must be a positive integer (labels drawn per input), got {n_samples!r}; "
            "pass e.g. n_samples=1"
        )
    if value > MAX_N_SAMPLES:
        raise TorchfimError(
            f"n_samples must be at most 2**63 - 1 = {MAX_N_SAMPLES} (torch counts in int64), got {value}; pass a "
            "smaller one (a variance with k labels per input is the one with n_samples=1 divided by k)"
        )
    return value


def check_generator(generator: object) -> None:
    """Refuse anything but a ``torch.Generator`` (or None) as the source of sampled labels."""
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TorchfimError(
            f"generator must be a torch.Generator or None, got {type(generator).__name__}; "
            "pass torch.Generator().manual_seed(seed) for reproducible labels"
        )


def check_label_memory(batch: int, n_samples: int, width: int, device: torch.device) -> None:
    """Refuse to draw ``n_samples`` labels for each of ``batch`` inputs when their output scores
    (``batch × n_samples × width`` numbers, held at once) would not fit in memory."""
    from ._memory import fits_in_memory, size_text

    if batch * n_samples * width < 2**26:  # under 0.5 GiB: not worth reading the free memory
        return
    fits, needed, free = fits_in_memory(batch * n_samples * width, torch.float64, device)
    if not fits:
        raise TorchfimError(
            f"n_samples={n_samples} labels for each of {batch} inputs need about {size_text(needed)} for their "
            f"output scores, but {size_text(free)} is available on {device}; draw fewer labels per call "
            "(average the results of several calls) or pass smaller mini-batches"
        )


def output_hint(raw: object) -> str:
    """An ``output=`` argument that picks the first tensor of a structured output ``raw``, written for its kind
    (``out["key"]`` for a mapping, ``out[i]`` for a tuple or list, ``out.name`` for an object); a generic one where it
    holds none."""
    picks = [access for _, access, value in _entries(raw) if isinstance(value, torch.Tensor)]
    return f"output=lambda out: {picks[0]}" if picks else "output= a function that picks the tensor of outputs"


def _entries(raw: object) -> list[tuple[object, str, object]]:
    """``(name, how an output= function reads it, value)`` for each entry of a structured output ``raw``: a mapping's
    items, a tuple's or list's elements (a named tuple's by their field names), an object's attributes."""
    if isinstance(raw, Mapping):
        return [(key, f"out[{key!r}]", value) for key, value in raw.items()]
    if isinstance(raw, (tuple, list)):
        names = getattr(raw, "_fields", None) or [f"[{i}]" for i in range(len(raw))]
        return [(name, f"out[{i}]", value) for i, (name, value) in enumerate(zip(names, raw))]
    fields = vars(raw).items() if hasattr(raw, "__dict__") else ()
    return [(name, f"out.{name}", value) for name, value in fields]


def tensor_fields(raw: object, most: int = 6) -> str:
    """The tensors a structured output holds, as `` with tensors name (shape), …`` (empty where none): what
    an ``output=`` function may pick."""
    shown = [f"{name} {tuple(value.shape)}" for name, _, value in _entries(raw) if isinstance(value, torch.Tensor)]
    if not shown:
        return ""
    more = f" and {len(shown) - most} more" if len(shown) > most else ""
    return " with tensors " + ", ".join(shown[:most]) + more
