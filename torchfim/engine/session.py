"""One pass of the engine over a data set, as every public computation makes it.

``with engine_pass(model, ...) as p:`` holds the engine session (the lock, autocast off), builds
the private view and the backend; ``p.batches(...)`` runs the one loop (:func:`.loop.run`) over the
inputs, counting them in ``p.n`` and refusing an empty data set.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import TorchfimError
from ..families import Family
from .backend import Backend, Recording
from .batch import Batch, batches, input_count
from .kept_buffers import private_buffers
from .loop import make_backend, run
from .view import Mask, ModelView, engine_session

EMPTY = "inputs is empty: pass at least one input (a tensor with batch size ≥ 1)"


@dataclass
class Pass:
    """The view and backend of one pass, and the number of inputs seen so far."""

    view: ModelView
    backend: Backend
    n: int = 0

    def batches(self, inputs: object, targets: object, family: Family, mask: Mask, progress: bool,
                desc: str, split: bool = False, whole: bool = False, grams: bool = False,
                rows: Callable[[Iterator[Batch]], Iterator[Batch]] | None = None) -> Iterator[tuple[Recording, Family]]:
        """Each mini-batch's recording and family; raises after the loop when there was no input.

        ``split``: large mini-batches may come as groups of their rows; ``whole``: cut further where a pull-back
        of all output numbers of their inputs (``grams``: and an output Gram matrix each) would not fit in
        memory (see :func:`.loop.run`); ``rows``: the rows of each mini-batch to compute on (a process's share,
        which may be empty: the caller refuses no input in all), with a progress bar on the first process alone
        (the others' bars, over shares of the same inputs, drew over it in the same terminal).
        """
        view = self.view
        if rows is not None and progress and torch.distributed.is_available() and torch.distributed.is_initialized():
            progress = torch.distributed.get_rank() == 0
        self.backend.directions.progress = progress
        mini_batches = batches(inputs, targets, view.device, view.input_dtype, labels=view.labels,
                               defaults=view.call_defaults())
        if rows is not None:
            mini_batches = rows(mini_batches)
        for rec, fam in run(view, self.backend, mini_batches, family, mask, progress, desc, split, whole, grams,
                            total=input_count(inputs) if progress and rows is None else None):
            yield rec, fam
            self.n += rec.batch.size
        if self.n == 0 and rows is None:  # a process's share may be empty where the others' are not
            raise TorchfimError(EMPTY)


@contextmanager
def engine_pass(model: nn.Module, backend: str, output: Callable[[object], Tensor] | None = None,
                class_dim: int | None = None) -> Iterator[Pass]:
    """The engine session with a private view of ``model`` and the backend named ``backend``; the model's
    buffers are left as they were (:func:`.kept_buffers.private_buffers`)."""
    with engine_session():
        view = ModelView(model, output, class_dim)
        with private_buffers(view.model, view.constants):
            yield Pass(view, make_backend(view, backend))
