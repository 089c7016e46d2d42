"""The engine: one loop over mini-batches, backends behind one interface, per-module rules.

Data flows one way: a public function chooses output-space vectors (:mod:`torchfim.estimators`),
the loop (:mod:`.loop`) records each mini-batch with a backend (:mod:`.per_module`, or the
whole-model :mod:`.functional` reference), the backend's rules (:mod:`.modules`) turn vectors into
per-sample products, and a structure (:mod:`torchfim.structures`) accumulates them.
"""

from __future__ import annotations

from .backend import Backend, Recording
from .batch import Batch, batches
from .loop import BACKENDS, backend_name, check_finite_result, make_backend, run
from .view import ENGINE_LOCK, ModelView, engine_session

__all__ = [
    "BACKENDS",
    "ENGINE_LOCK",
    "Backend",
    "Batch",
    "ModelView",
    "Recording",
    "backend_name",
    "batches",
    "check_finite_result",
    "engine_session",
    "make_backend",
    "run",
]
