"""The monitor's one warning that it measures in eval mode what the user's model runs in training mode.

:class:`~torchfim.train.FisherTraceMonitor` (and ``FisherTraceCallback``, which builds one) measures on its own
copy of the model in ``eval()`` mode: the Fisher of per-sample terms is undefined where BatchNorm normalises by the
batch's statistics or Dropout makes the outputs random, which :func:`torchfim.fisher` and ``FisherPenalty(kind=
"trace")`` refuse with ``model.eval()`` named as the fix. A training loop calls the monitor with the model in
training mode, so the monitor cannot refuse it; it did switch silently, and a user measuring a BatchNorm network at
step 0 got the trace under its initial running statistics unaware (9.85 on a trial, 7.82 under the batch's).
:class:`EvalNote` now names the modules whose forward the switch changes, once per monitor; the user's modules keep
their mode (only the copy is switched).
"""

from __future__ import annotations

from torch import nn

from .._words import agreeing, counted
from ..errors import warn_user

__all__ = ["EvalNote", "switched_modules"]


def _kind(module: nn.Module) -> str | None:
    """What ``eval()`` changes in ``module``'s forward, as a kind of module (None: nothing, or not in training mode)."""
    if not module.training:
        return None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "BatchNorm" if module.track_running_stats else None  # without running statistics it never changes
    if isinstance(module, nn.modules.instancenorm._InstanceNorm):
        return "InstanceNorm" if module.track_running_stats else None
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return "Dropout" if module.p > 0 else None
    if isinstance(module, nn.RReLU):
        return "RReLU" if module.lower != module.upper else None
    inner = isinstance(module, nn.MultiheadAttention) or (isinstance(module, nn.RNNBase) and module.num_layers > 1)
    return type(module).__name__ if inner and module.dropout > 0 else None


def switched_modules(model: nn.Module) -> dict[str, list[str]]:
    """The modules of ``model`` in training mode whose forward ``eval()`` changes, by kind (``"Dropout"``,
    ``"BatchNorm"``, ``"InstanceNorm"``, ``"RReLU"``, or the class of a module with a dropout of its own such as
    ``"MultiheadAttention"``), each kind's module names in the model's order.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Dropout(0.1), nn.Linear(4, 2), nn.Dropout(0.2))
        >>> switched_modules(m)
        {'BatchNorm': ['1'], 'Dropout': ['2', '4']}
        >>> switched_modules(m.eval())
        {}
    """
    found: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is not None:
            found.setdefault(kind, []).append(name or type(module).__name__)
    return found


def _named(kind: str, names: list[str], most: int = 3) -> str:
    """``2 Dropout modules ('1', '3')``: a kind, counted, with its first names."""
    shown = ", ".join(repr(n) for n in names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
    return f"{counted(len(names), kind + ' module')} ({shown})"


class EvalNote:
    """Warn, the first time :meth:`check` finds modules in training mode that ``eval()`` changes, that ``who``
    measures in eval mode; at most once (the monitor is called in training mode at every measurement)."""

    def __init__(self, who: str, speaks: bool = True) -> None:
        self.who = who
        self.said = not speaks  # a process other than the first of a shared measurement says nothing

    def check(self, model: nn.Module) -> None:
        """Warn once, naming what the eval-mode copy switched, where ``model`` holds such modules in training mode."""
        if self.said:
            return
        found = switched_modules(model)
        if not found:
            return
        self.said = True
        kinds = [_named(kind, names) for kind, names in found.items()]
        listed = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " and " + kinds[-1]
        effects = " and ".join(dict.fromkeys(_EFFECTS.get(kind, "no dropout") for kind in found))
        total = sum(len(names) for names in found.values())
        warn_user(
            f"torchfim: {self.who} measures Tr(F) in eval mode (torchfim.fisher refuses training mode, where "
            f"per-sample Fisher terms are undefined): {listed} {agreeing(total, 'was', 'were')} in training "
            f"mode, and the monitor's copy of the model runs {agreeing(total, 'it', 'them')} as model.eval() does "
            f"({effects}); the model's own modules stay in training mode (said once per monitor; docs/training.md)"
        )


#: What ``eval()`` changes, by kind (a module with a dropout of its own: no dropout).
_EFFECTS = {"Dropout": "no dropout", "BatchNorm": "BatchNorm normalising by its running statistics rather than the batch's",
            "InstanceNorm": "InstanceNorm by its running statistics", "RReLU": "RReLU at its mean slope"}
