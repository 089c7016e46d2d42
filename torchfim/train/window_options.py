"""The checks of :class:`~torchfim.train.FisherTraceMonitor`'s window options (``subset``, ``control_variate``),
of its ``output`` and ``mask``, shared with the Hugging Face Trainer callback."""

from __future__ import annotations

from torch import Tensor

from ..engine.output_reading import check_output_map
from ..errors import TorchfimError
from .arguments import check_int

__all__ = ["check_output_and_mask", "check_window", "check_window_options"]


def check_window_options(subset: object, control_variate: object) -> int | None:
    """``subset`` (a positive int or None, returned) and ``control_variate`` (a bool), refused otherwise."""
    if subset is not None:
        subset = check_int("subset", subset, 1, "pass the number of held inputs per measurement, or None for all")
    if not isinstance(control_variate, bool):
        raise TorchfimError(f"control_variate must be True or False, got {control_variate!r}")
    return subset


def check_window(size: int, control_variate: bool, world: int = 1, by_subset: bool = True) -> None:
    """Refuse ``control_variate=True`` on measurements of fewer than 4 inputs (per process, across ``world``
    processes), naming the fix: a larger subset where ``by_subset`` (its window is the limit), else more inputs."""
    if control_variate and size < 4:
        where = "" if world == 1 else " per process" + (f" (each of the {world} measures ⌈subset/{world}⌉ of its "
                                                         "share)" if by_subset else "")
        fix = (f"pass subset ≥ {4 * world} (or hold more inputs)" if by_subset else
               f"hold at least {4 * world} inputs" + (" in a mini-batch, shared row by row" if world > 1 else ""))
        raise TorchfimError(
            f"control_variate=True needs at least 4 inputs per measurement (two chains of 2), got {size}{where}; "
            f"{fix}"
        )


def check_output_and_mask(output: object, mask: object) -> tuple[object, object]:
    """``output`` (a function of the model's outputs, or None) and ``mask`` (a key of dict inputs or a
    function of a held mini-batch, or None), refused otherwise."""
    check_output_map(output)
    if mask is not None and (isinstance(mask, Tensor) or not (isinstance(mask, str) or callable(mask))):
        raise TorchfimError(
            f"mask must name a key of dict held inputs (e.g. 'attention_mask') or be a function of a held "
            f"mini-batch returning (batch, *positions) booleans, got {type(mask).__name__}; a tensor would not "
            "follow the subset windows"
        )
    return output, mask
