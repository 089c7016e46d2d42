"""A report's finished steps kept on disk, so that an interrupted report goes on where it stopped.

A full report is a dozen passes over the data (:func:`~torchfim.report.compute._total_steps`), up to the
half hour of :data:`~torchfim.report.settings.FULL_REPORT_SECONDS`. Each step's result is written, as it
finishes, to its own file in the folder :data:`FOLDER` inside ``--out``; the same report run again (the
same weights, data, outputs on a few inputs, options and versions: :func:`fingerprint`) reads those
instead of computing them. A report of anything else clears the folder first. The folder is removed once
the report is published, so a finished report leaves nothing of it behind.

The results are plain: tensors, numbers, strings, None, and lists and dicts of them, read back with
``torch.load(weights_only=True)``, which builds no other object.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .. import _io
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
        t = value.detach().cpu().contiguous()
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


def fingerprint(model: nn.Module, data: Data, outputs: Tensor, options: dict) -> str:
    """What a report's results depend on, hashed: the model's parameters and buffers (names, dtypes, values,
    which are trainable), its outputs on the first inputs (``outputs``: a forward edited since changes them),
    the data's inputs and targets, the report's ``options`` and the versions of torch and torchfim."""
    import torchfim

    digest = hashlib.sha256()
    for value in ({n: t for n, t in model.state_dict(keep_vars=True).items()},
                  [n for n, p in model.named_parameters() if p.requires_grad], outputs, data.inputs, data.targets,
                  options, [torch.__version__, torchfim.__version__]):
        _update(digest, value)
    return digest.hexdigest()


class KeptSteps:
    """The finished steps of the report ``key`` (a :func:`fingerprint`) in ``folder``; None keeps nothing.

    An existing folder of another report's steps is cleared; ``resumed`` counts the steps read back.
    """

    def __init__(self, folder: str | os.PathLike | None, key: str) -> None:
        self.folder = None if folder is None else Path(folder)
        self.resumed = 0
        if self.folder is None:
            return
        try:
            same = (self.folder / _KEY).read_text(encoding="utf-8") == key
        except OSError:
            same = False
        if not same:
            discard(self.folder)
            _io.write_text(self.folder / _KEY, key)

    def get(self, name: str) -> tuple[bool, object]:
        """``(True, result)`` for the step ``name`` finished before, else ``(False, None)``."""
        path = self._path(name)
        if path is None or not path.is_file():
            return False, None
        try:
            kept = torch.load(path, weights_only=True)
        except Exception:  # noqa: BLE001 - a file cut short by a crash: the step is computed again
            return False, None
        if not isinstance(kept, dict) or kept.get("name") != name:
            return False, None
        self.resumed += 1
        return True, kept["result"]

    def put(self, name: str, result: object) -> None:
        """Keep the finished step ``name``'s ``result`` (written to a temporary file, then renamed)."""
        path = self._path(name)
        if path is not None:
            _io.atomic_write(path, lambda f: torch.save({"name": name, "result": result}, f), binary=True)

    def _path(self, name: str) -> Path | None:
        if self.folder is None:
            return None
        return self.folder / f"{hashlib.sha256(name.encode()).hexdigest()[:20]}.pt"


def discard(folder: str | os.PathLike) -> None:
    """Remove the folder of kept steps (nothing when there is none)."""
    shutil.rmtree(folder, ignore_errors=True)
