"""A report's finished steps kept on disk, so that an interrupted report goes on where it stopped.

A full report is a dozen passes over the data (:func:`~torchfim.report.compute._total_steps`), up to the
half hour of :data:`~torchfim.report.settings.FULL_REPORT_SECONDS`. Each step's result is written, as it
finishes, to its own file in the folder :data:`FOLDER` inside ``--out``; the same report run again (the
same weights, forward and backward, data, options and versions: :func:`fingerprint`) reads those
instead of computing them. A report of anything else clears the folder first, warning how many steps it
removed. The folder is removed once the report is published, so a finished report leaves nothing of it behind.

The results are plain: tensors, numbers, strings, None, and lists and dicts of them, read back with
``torch.load(weights_only=True)``, which builds no other object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import _io
from ..errors import warn_user
from .check import outputs_on
from .data import Data

__all__ = ["FOLDER", "KeptSteps", "fingerprint", "discard"]

#: The folder of kept steps inside ``--out``.
FOLDER = ".torchfim-report-steps"
#: The file naming the report whose steps the folder keeps.
_KEY = "fingerprint.txt"


def _update(digest: Any, value: object) -> None:
    """Feed ``value`` to ``digest``: a tensor's dtype, shape and bytes; a dict's keys and values in order;
    anything else by its ``repr``."""
    if isinstance(value, Tensor):
        t = value.detach().cpu()
        t = (t if t.layout == torch.strided else t.to_dense()).contiguous()  # a sparse buffer (an adjacency)
        digest.update(f"tensor {t.dtype} {tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            _update(digest, key)
            _update(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            _update(digest, item)
    else:
        digest.update(f"{value!r};".encode())


def fingerprint(model: nn.Module, data: Data, options: dict) -> str:
    """What a report's results depend on, hashed: the model's parameters and buffers (names, dtypes, values,
    which are trainable, their device), what it computes (:func:`_computed`: an edited forward or backward
    changes it), the data's inputs and targets, the report's ``options`` and the versions of torch and
    torchfim."""
    import torchfim

    digest = hashlib.sha256()
    first = next(p for p in model.parameters() if p.requires_grad)
    for value in (model.state_dict(keep_vars=True),
                  [n for n, p in model.named_parameters() if p.requires_grad], str(first.device),
                  data.inputs, data.targets, options, [torch.__version__, torchfim.__version__]):
        _update(digest, value)
    for value in _computed(model, data):
        _update(digest, value)
    return digest.hexdigest()


def _computed(model: nn.Module, data: Data, rows: int = 8) -> Iterator[object]:
    """The model's outputs on every input (``rows`` at a time, so that a language model's logits of a few
    inputs are all that is held) and the gradient, with respect to its trainable parameters, of a fixed random
    projection of its outputs on the first ``rows``."""
    o = outputs_on(model, data, slice(0, min(rows, data.n)), differentiable=True)
    yield o.detach() if isinstance(o, Tensor) else o
    for start in range(rows, data.n, rows):
        yield outputs_on(model, data, slice(start, min(start + rows, data.n)))
    if not isinstance(o, Tensor) or not o.requires_grad:
        return
    v = torch.randn(o.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(o.device, o.dtype)
    yield torch.autograd.grad((o * v).sum(), [p for p in model.parameters() if p.requires_grad], allow_unused=True)


class KeptSteps:
    """The finished steps of the report ``key`` (a :func:`fingerprint`) in ``folder``; None keeps nothing.

    An existing folder of another report's steps is cleared; ``resumed`` counts the steps read back. Each file
    holds the key too, and is read back only under it (a report of another model started into the same
    ``--out`` while this one runs relabels the folder, not this report's files).
    """

    def __init__(self, folder: str | os.PathLike | None, key: str) -> None:
        self.folder, self.key = (None if folder is None else Path(folder)), key
        self.resumed = 0
        if self.folder is None:
            return
        try:
            same = (self.folder / _KEY).read_text(encoding="utf-8") == key
        except OSError:
            same = False
        if not same:
            _discard_another(self.folder)
            self._write(lambda: _io.write_text(self.folder / _KEY, key))

    @classmethod
    def of(cls, folder: str | os.PathLike | None, model: nn.Module, data: Data, options: dict) -> KeptSteps:
        """The kept steps of this report in ``folder`` (None: nothing kept, and no fingerprint computed). A
        fingerprint that cannot be taken (a model that cannot run twice alike) keeps nothing, with a warning."""
        if folder is None:
            return cls(None, "")
        try:
            key = fingerprint(model, data, options)
        except Exception as exc:  # noqa: BLE001 - keeping is an aid: the report goes on without it
            warn_user(f"torchfim report: the finished steps are not kept, so an interruption would lose them "
                      f"(the report's fingerprint failed: {type(exc).__name__}: {' '.join(str(exc).split())})")
            return cls(None, "")
        return cls(folder, key)

    def get(self, name: str) -> tuple[bool, object, list[str]]:
        """``(True, result, warnings)`` for the step ``name`` finished before (the library's warnings it raised),
        else ``(False, None, [])``."""
        path = self._path(name)
        if path is None or not path.is_file():
            return False, None, []
        try:
            kept = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a file cut short by a crash: the step is computed again
            return False, None, []
        if not isinstance(kept, dict) or kept.get("name") != name or kept.get("key") != self.key:
            return False, None, []
        self.resumed += 1
        return True, kept["result"], kept.get("warnings", [])

    def put(self, name: str, result: object, said: list[str]) -> None:
        """Keep the finished step ``name``'s ``result`` and the library's warnings ``said`` while it computed
        (written to a temporary file, then renamed)."""
        path = self._path(name)
        kept = {"name": name, "key": self.key, "result": result, "warnings": said}
        if path is not None:
            self._write(lambda: _io.atomic_write(path, lambda f: torch.save(kept, f), binary=True))

    def _write(self, write: Callable[[], object]) -> None:
        """``write()``; where the disk refuses (full, read-only), keep nothing more, with a warning: the report
        itself goes on."""
        try:
            write()
        except OSError as exc:
            warn_user(f"torchfim report: the finished steps are no longer kept in {self.folder} ({exc}), so an "
                      "interruption would lose them; the report goes on")
            self.folder = None

    def _path(self, name: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{hashlib.sha256(name.encode()).hexdigest()[:20]}.pt"


def _discard_another(folder: Path) -> None:
    """Clear the folder of another report's steps, saying so where it held some: a report run again after an
    interruption with other options (weights, data) than the command said to repeat computes them all again."""
    n = len(list(folder.glob("*.pt"))) if folder.is_dir() else 0
    discard(folder)
    if n:
        warn_user(f"torchfim report: the {n} finished step{'' if n == 1 else 's'} kept in {folder} {'was' if n == 1 else 'were'} "
                  "of another report (other options, weights or data than this one's): they are removed, and this "
                  "report computes every step")


def discard(folder: str | os.PathLike) -> None:
    """Remove the folder of kept steps (nothing when there is none)."""
    shutil.rmtree(folder, ignore_errors=True)
