"""How a computing step of :class:`~torchfim.train.FisherPenalty` makes the penalty's value and gradient: the
labels, the batch-gradient and trace penalties by double backprop or by finite differences, each from a forward
of its own or from the one forward the task loss shares (``penalised_loss``), and the cached-gradient surrogate.
The schedule (which steps compute, what is cached and reused) is :mod:`.penalty`'s."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..engine.batch import Batch
from ..engine.derivative_settings import per_input_passes
from ..engine.model_checks import check_mode
from ..errors import TorchfimError, warn_user
from .double_backward import penalty_gradients
from .finite_difference import batch_gradient_fd, batch_gradient_fd_shared, leading, penalty_gradient, trace_fd
from .kink_replay import KinkReplay
from .model_io import ModelIO, inner_module, leading_rows
from .penalised_arguments import scalar_task_loss
from .position_outputs import PositionOutputs
from .reached import reached_parameters
from .squared_gradients import per_input_squares, squared_norm, widest_dtype
from .surrogate import OnBackward, fixed_gradient, zero_term


class PenaltyTerms:
    """The penalty's computations on one computing step, over the settings :class:`~torchfim.train.FisherPenalty`
    holds (a base class of it: the two share these attributes, set and checked by its constructor)."""

    model: nn.Module
    family: PositionOutputs
    io: ModelIO
    kind: str
    grad_method: str
    alpha: float
    fd_step: float | None
    generator: torch.Generator | None
    _second_derivatives_checked: bool
    _kinks_named: bool

    def _shared_forward(
        self, x: Batch, rows: int, names: list[str], params: list[Tensor], task_loss: Callable[[object], Tensor],
        keep: OnBackward | None,
    ) -> tuple[Tensor, Tensor]:
        """Loss and penalty value from one forward (exact penalty, or ``kind="trace"``); with ``keep`` (a cache), the
        term hands its gradient and value to it when back-propagated."""
        if self.kind == "trace":
            _check_trace_mode(self.model)
        out = self.io.call(self.model, x)
        o = leading(self.io.tensor(out, x), rows)
        if self.kind == "batch_gradient":
            value, grads = self._batch_gradient(o, params), None
        else:
            y, x = self._outputs_and_labels(o), leading_rows(x, rows)
            if self.grad_method == "finite_difference":
                self._name_trace_kinks(params)
                value, grads = trace_fd(self.model, self.io, self.family, list(zip(names, params)), x, y, self.alpha,
                                        self.fd_step, reached_parameters(o, params))
            else:
                value, grads = self._trace(x, names, params, y), None
        if grads is None:
            grads = self._double_backprop(value, params, keep is not None, retain=True)
        term = value if grads is None else self._surrogate(params, grads, value.detach(), keep)
        return scalar_task_loss(task_loss, out) + term, value

    def _shared_fd(
        self, x: Batch, rows: int, named: list[tuple[str, Tensor]], task_loss: Callable[[object], Tensor],
        keep: OnBackward | None,
    ) -> tuple[Tensor, Tensor]:
        """Loss and penalty value by the two passes of the finite difference; with ``keep`` (a cache), the term hands
        its gradient and value to it when back-propagated."""
        params = [p for _, p in named]
        out, nll, coef, value, last = batch_gradient_fd_shared(
            self.model, self.io, self.family, named, x, rows, self._outputs_and_labels, self.alpha, self.fd_step,
            keep is not None)
        task = scalar_task_loss(task_loss, out)
        if keep is None:  # one backward: ∇task(θ') + c·∇L(θ') − c·g
            return task + coef * (nll - nll.detach()) + last, value
        grads = penalty_gradient(nll, params, last, coef)  # c·(∇L(θ') − g), to reuse on the next steps
        return task + self._surrogate(params, grads, value, keep), value

    def _double_backprop(self, value: Tensor, params: list[Tensor], cache: bool,
                         retain: bool) -> list[Tensor | None] | None:
        """The exact penalty's gradient when it is cached (else None). Without a cache it is taken once, on the
        first computed step, and dropped: an operation without a second derivative is then named here, with the
        fix, rather than by torch in the caller's backward."""
        if cache:
            return penalty_gradients(value, params, retain_graph=retain)
        if not self._second_derivatives_checked:
            penalty_gradients(value, params, retain_graph=True)
            self._second_derivatives_checked = True
        return None

    def _outputs_and_labels(self, o: Tensor) -> Tensor:
        self.family.check_output(o)  # first: it says what to do with an output that is not a tensor
        return self.family.sample(o.detach(), 1, self.generator)  # (B, 1, *label_shape)

    def _batch_gradient(self, o: Tensor, params: list[Tensor]) -> Tensor:
        """``α‖∇_θ L‖²`` with its double-backprop graph, on the outputs ``o`` of the inputs used."""
        y = self._outputs_and_labels(o)
        nll = self.family.nll(o, y)  # (1/B) Σᵢ −log p(ŷᵢ|xᵢ)
        if not nll.requires_grad:  # the outputs do not depend on the trainable parameters
            return zero_term(o.dtype, o.device)
        grads = torch.autograd.grad(nll, params, create_graph=True, allow_unused=True)
        # A parameter the graph does not reach gets no gradient (None), as in plain training.
        reached = [g for g in grads if g is not None]
        return _back_propagating(self.alpha * squared_norm(reached)) if reached else zero_term(o.dtype, o.device)

    def _trace_labels(self, x: Batch) -> Tensor:
        """One label per input for ``kind="trace"``, from outputs without a graph: ``(B, 1, *label)``."""
        _check_trace_mode(self.model)
        return self._outputs_and_labels(self.io.label_outputs(self.model, x))

    def _trace_labels_reached(self, x: Batch, params: list[Tensor]) -> tuple[Tensor, list[bool]]:
        """:meth:`_trace_labels`, and which of ``params`` the outputs' graph reaches (the finite difference's
        per-input gradients, torch.func's, are zeros for a parameter the model does not use: they cannot tell). The
        forward has a graph, so it runs the module inside a ``DistributedDataParallel`` wrapper: a forward of the
        wrapper with a graph would be the one it searches for the parameters the caller's backward reaches."""
        _check_trace_mode(self.model)
        o = self.io.label_outputs(inner_module(self.model)[0], x, graph=True)
        return self._outputs_and_labels(o), reached_parameters(o, params)

    def _finite_difference(self, x: Batch, names: list[str], params: list[Tensor]
                           ) -> tuple[Tensor, list[Tensor | None]]:
        named, io = list(zip(names, params)), self.io
        if self.kind == "batch_gradient":
            return batch_gradient_fd(self.model, io, self.family, named, x, self._outputs_and_labels, self.alpha,
                                     self.fd_step)
        y, reached = self._trace_labels_reached(x, params)
        self._name_trace_kinks(params)
        return trace_fd(self.model, io, self.family, named, x, y, self.alpha, self.fd_step, reached)

    def _name_trace_kinks(self, params: list[Tensor]) -> None:
        """Warn once where ``kind="trace"``'s per-input finite differences run below float64 on a network with kinks,
        which they do not keep on the first pass's side (:mod:`.kink_replay` serves the batch gradient only)."""
        if self._kinks_named or params[0].dtype == torch.float64:
            return
        self._kinks_named = True
        kinked = sorted({type(m).__name__ for m in KinkReplay(self.model).modules})
        if kinked:
            warn_user(f"torchfim: FisherPenalty(kind='trace', grad_method='finite_difference') on a network with kinks "
                      f"({', '.join(kinked)}) in {str(params[0].dtype).removeprefix('torch.')}: the per-input steps move "
                      "units across them, where the gradient jumps (4.5 times the gradient's size off on a ReLU MLP in "
                      "float32); pass grad_method='exact', or kind='batch_gradient', whose finite difference keeps "
                      "each kink on the first pass's side")

    def _trace(self, x: Batch, names: list[str], params: list[Tensor], y: Tensor | None = None) -> Tensor:
        """``α (1/B) Σᵢ ‖gᵢ‖²`` by per-sample gradients (labels ``y``, or drawn from a forward of ``x``)."""
        y = self._trace_labels(x) if y is None else y
        masks = self.family.mask
        log_p = self.io.input_log_prob(self.model, self.family, x)
        with per_input_passes(self.model):  # the per-sample passes see σ and the buffers as the labels' forward left them
            per_sample = self.io.per_input_gradients(log_p, dict(zip(names, params)), None, x, y, masks)
        sq = per_input_squares(list(per_sample.values()))
        value = (self.alpha * sq.mean()).to(widest_dtype(list(per_sample.values())))
        return _back_propagating(value)  # torch.func's zeros for an unused parameter reach none

    @staticmethod
    def _surrogate(params: list[Tensor], grads: list[Tensor | None], value: Tensor,
                   keep: OnBackward | None = None) -> Tensor:
        """The linear surrogate: value exactly ``v``, gradient exactly ``c`` (handed to ``keep`` on its first
        backward), and none to a parameter whose ``c`` is None."""
        return fixed_gradient(params, grads, value, keep)


def _back_propagating(value: Tensor) -> Tensor:
    """``value``, plus an exact 0 that back-propagates where it reaches no parameter (``pen(x).backward()`` works)."""
    return value if value.requires_grad else value + zero_term(value.dtype, value.device)


def _check_trace_mode(model: nn.Module) -> None:
    """``kind="trace"`` needs per-sample gradients, hence a model that treats samples independently: refused as the
    Fisher refuses it, with the other kind, which takes a model in training mode, named beside ``eval()``."""
    try:
        check_mode(model)
    except TorchfimError as err:
        raise TorchfimError(f"{err}; or use FisherPenalty(kind='batch_gradient'), the gradient of the batch's mean "
                            "loss, which takes the model in training mode") from None
