"""What :meth:`~torchfim.train.FisherPenalty.penalised_loss` takes beside the inputs: the task loss, and the
module it runs.

Under several processes, ``DistributedDataParallel`` averages the gradients of its own forwards only. A
penalised loss that ran the bare model would leave each process with its own gradient, and the processes'
copies of the model would drift apart without an error. So ``model=`` takes the wrapper to run (the module a
``Trainer``'s ``compute_loss`` receives), which must hold the penalty's trainable parameters; and a loss taken
through a module that synchronises nothing, while several processes train, is named by a warning. Parameters
managed by torch.distributed (FSDP, DTensors) are refused: the penalty differentiates plain tensors.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from .._processes import process_group
from ..engine.derivative_settings import made_in_inference_mode
from ..engine.model_checks import check_not_distributed
from ..errors import TorchfimError, warn_user
from .arguments import trainable


def check_task_loss(task_loss: object) -> None:
    """Refuse a ``task_loss`` that is not a function of the outputs."""
    if not callable(task_loss):
        raise TorchfimError(
            f"task_loss must be a function of the model's outputs returning the scalar task loss, got "
            f"{type(task_loss).__name__}; pass e.g. lambda out: F.cross_entropy(out, y)"
        )


def scalar_task_loss(task_loss: Callable[[object], Tensor], out: object) -> Tensor:
    """``task_loss(out)`` as a 0-dim tensor; refused unless it is a one-element tensor."""
    loss = task_loss(out)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TorchfimError(
            f"task_loss must return the scalar task loss (a one-element tensor), got {shape}; "
            "reduce it, e.g. F.cross_entropy(out, y) with its default reduction='mean'"
        )
    return loss if loss.dim() == 0 else loss.reshape(())


def penalised_parameters(model: nn.Module, every_module: bool = False) -> tuple[list[str], list[Tensor]]:
    """The names and tensors of the trainable parameters; refused where there are none, or where torch.distributed
    manages them (FSDP, DTensors): the model and its parameters are looked at on each step, and with
    ``every_module`` (at construction) every module in it too."""
    names, params = trainable(model)
    check_not_distributed(model, "the Fisher penalty", params, modules=every_module)
    made = [name for name, p in zip(names, params) if made_in_inference_mode(p)]  # a lazy one is refused later
    if made:  # torch's own refusal comes from inside the penalty's forward
        raise TorchfimError(
            f"the model's parameters ({', '.join(made[:3])}{', ...' if len(made) > 3 else ''}) were made in "
            "torch.inference_mode() (the model was built or loaded under it), so it cannot be trained: torch refuses "
            "to save them for backward; build or load it outside inference mode (torch.no_grad() serves for "
            "loading), or load its state into a model built outside: fresh.load_state_dict(model.state_dict())"
        )
    return names, params


def running_module(penalty_model: nn.Module, given: nn.Module | None) -> nn.Module:
    """The module a penalised loss runs: ``given`` (checked to hold the penalty's trainable parameters, in
    order), else the penalty's own model; a warning when several processes train and it synchronises no
    gradient."""
    module = penalty_model if given is None else given
    if not isinstance(module, nn.Module):
        raise TorchfimError(f"model must be a torch.nn.Module (the wrapper to run), got {type(module).__name__}")
    check_not_distributed(module, "the Fisher penalty", [], modules=False)  # first: FSDP replaces the parameters
    if module is not penalty_model:
        ours, theirs = trainable(penalty_model)[1], [p for p in given.parameters() if p.requires_grad]
        if len(ours) != len(theirs) or any(a is not b for a, b in zip(ours, theirs)):
            raise TorchfimError(
                f"model= must run the penalty's model: its trainable parameters are not the penalty's "
                f"({len(theirs)} tensors against {len(ours)}, or other tensors); pass a wrapper of the model the "
                "penalty was built on, such as its DistributedDataParallel or torch.compile module"
            )
    if _processes() > 1 and not any(isinstance(m, _averaging()) for m in module.modules()):
        warn_user(
            f"FisherPenalty.penalised_loss runs {type(module).__name__}, which averages no gradient over the "
            f"{_processes()} processes: each keeps the gradient of its own batch and their models drift apart. "
            "Pass the DistributedDataParallel wrapper as model= (in a Trainer's compute_loss: model=model), or "
            "build the penalty on it; if you average the gradients yourself, ignore this warning"
        )
    return module


def _processes() -> int:
    """The number of processes of the default group (1 without one)."""
    return (process_group() or (0, 1))[1]


def _averaging() -> type:
    """The module type whose forwards prepare the averaging of gradients over processes (imported when asked)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel
