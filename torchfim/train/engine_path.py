"""The only code of :class:`~torchfim.train.FisherTraceMonitor` that touches the engine: its view of the model, kept
while the model's tensors stay, and the squared score norms of held mini-batches."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..engine import Backend, Batch, ModelView, engine_session, make_backend
from ..engine.derivative_settings import made_in_inference_mode
from ..engine.kept_buffers import private_buffers
from ..engine.loop import recorded
from ..engine.model_checks import check_initialised
from ..engine.output_probe import output_digest
from ..engine.output_reading import OutputMap
from ..engine.private_tree import forward_signature
from ..engine.view import Mask
from ..estimators import sampled_scores
from ..families import Family

Path = tuple[ModelView, Backend]


class EnginePath:
    """A monitor's view of its model and the backend on it (rebuilt only when the model's tensors or forwards
    change), and the number of samples checked for independence with that view."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._path: Path | None = None
        self._checked = 0  # samples checked for independence with the current view

    def current(self, model: nn.Module, output: OutputMap | None, class_dim: int | None) -> Path:
        """The engine's view of ``model`` (in eval mode) and its backend, rebuilt whenever a parameter or buffer
        tensor is replaced.

        The view shares the parameter and buffer tensors, so in-place updates (the optimiser's,
        BatchNorm's running statistics) are read live, and nothing cached depends on their values
        (keying on ``_version`` would rebuild after every optimiser step for nothing).
        ``p.data = ...``, ``model.double()``, ``.to(device)`` or a reassigned buffer give new storage,
        hence a new key; the old storage stays referenced by the old view, so its address cannot
        be reused by the new one. A module added or replaced brings new tensors, hence a new key too,
        and so does a forward hook registered or removed, or a forward set on an instance.
        """
        # One walk over the modules for the tensors (named_parameters and named_buffers would make two, with
        # names); the copy holds the forward hooks and instance forwards of the time it was made, too.
        tensors = [t for m in model.modules() for held in (m._parameters, m._buffers)
                   for t in held.values() if t is not None]
        try:
            key = tuple((id(t), t.data_ptr(), t.dtype, t.device, t.shape, t.stride(), t.requires_grad)
                        for t in tensors) + forward_signature(model)
        except ValueError:  # torch's refusal of data_ptr() on a lazy module's parameter: say what to do
            check_initialised(model)
            raise
        # Tensors made in inference mode are copied into the view once (ModelView) and may be rewritten in place
        # inside inference mode, unseen: such a view is made afresh for each measurement.
        if self._path is None or self._key != key or any(made_in_inference_mode(t) for t in tensors):
            view = ModelView(model, output, class_dim, eval_mode=True)
            self._path = (view, make_backend(view, "auto", offers_functional=False))  # the monitor takes no backend=
            self._key = key
            self._checked = 0
        return self._path

    def squared_norms(self, path: Path, picked: tuple[list[Batch], Tensor | None], generator: torch.Generator,
                      family: Family, mask: Mask, n_samples: int) -> Tensor:
        """``‖∇_θ log p(y_ij|xᵢ)‖²`` (n, k) in float64 for the held mini-batches and the row order of ``picked``,
        ``k = n_samples`` labels per input, one ``family.sample`` call per mini-batch, in order.

        The engine's loop step by step rather than ``engine.run``, which would re-run its check that
        samples are independent (one extra forward) on every measurement: here it runs
        until 4 samples were checked after each rebuild of the view (the inputs were checked finite
        when held).
        """
        view, backend = path
        (inputs, order), norms = picked, []
        with engine_session(), private_buffers(view.model, view.constants):  # the user's buffers as they were
            for held in inputs:  # checked non-empty and finite when held: no engine.batches() pass
                batch = held.to(view.device, view.input_dtype).with_defaults(view.call_defaults())  # as fisher calls it
                rec = recorded(view, backend, batch)
                fam = view.family_for(rec.shape, batch, family, mask)
                fam.check_output(rec.output)  # with its graph: it names the last operation
                self._checked = view.check_independent(batch, rec.values, self._checked)
                u = sampled_scores(fam, rec.values, n_samples, generator)  # (B, k, C); refused where it would not fit
                norms.append(backend.sample_squares(rec, u, last=True))  # (B, k): ‖Jᵢᵀ u_ij‖²; rec is spent
        norms = norms[0] if len(norms) == 1 else torch.cat(norms)
        return (norms if order is None else norms[order.to(norms.device)]).double()  # in the window's order

    def outputs(self, path: Path, rows: Batch) -> list[float]:
        """The digest of the view's outputs on the held ``rows`` (:func:`~torchfim.engine.output_probe.output_digest`),
        the user's buffers left as they were."""
        view = path[0]
        with engine_session(), private_buffers(view.model, view.constants):
            return output_digest(view, rows.to(view.device, view.input_dtype).with_defaults(view.call_defaults()))
