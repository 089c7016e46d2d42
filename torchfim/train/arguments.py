"""Checks of the arguments the training tools take (:class:`~torchfim.train.FisherPenalty`,
:class:`~torchfim.train.FisherTraceMonitor`): each refuses a bad value with the fix named."""

from __future__ import annotations

from torch import Tensor, nn

from ..errors import TorchfimError, real_number, whole_number


def check_int(name: str, value: object, minimum: int, hint: str) -> int:
    """``value`` as an int when it is an integer ≥ ``minimum`` (:func:`~torchfim.errors.whole_number`: a NumPy
    integer or a 0-dim integer tensor too, not a bool); else an error that ends with ``hint``."""
    whole = whole_number(value)
    if whole is None or whole < minimum:
        raise TorchfimError(f"{name} must be an integer ≥ {minimum}, got {value!r}; {hint}")
    return whole


def check_step(step: object) -> int:
    """A training step counter, as an int: required (the schedules follow it), an integer ≥ 0."""
    if step is None:
        raise TorchfimError(
            "FisherPenalty needs the training step to follow its schedule: pass step=step (0, 1, 2, ...)"
        )
    return check_int("step", step, 0, "pass the optimisation step counter (0, 1, 2, ...)")


def check_alpha(alpha: object) -> float:
    """The penalty coefficient: a finite number ≥ 0 (:func:`~torchfim.errors.real_number`), as a float."""
    value = real_number(alpha)
    if value is None or not value >= 0 or value == float("inf"):
        raise TorchfimError(
            f"alpha must be a finite number ≥ 0 (the penalty coefficient), got {alpha!r}; "
            "the paper tunes it log-uniformly in about [1e-3, 1e-1]"
        )
    return value


def trainable(model: nn.Module) -> tuple[list[str], list[Tensor]]:
    """Names and tensors of the parameters with ``requires_grad=True``, in ``model.named_parameters()`` order;
    refused when there are none (a penalty would have nothing to act on)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise TorchfimError(
            "the model has no parameters with requires_grad=True, so the Fisher penalty has nothing "
            "to act on; enable gradients on the parameters you want (p.requires_grad_(True)), or, in a phase of "
            "training where the penalised module is frozen, leave the penalty out of the loss (its gradient is 0: "
            "`if any(p.requires_grad for p in model.parameters()): loss = loss + pen(x, step=step)`)"
        )
    return [n for n, _ in named], [p for _, p in named]
