"""Loading what ``torchfim report`` analyses: factories, checkpoints and data.

Every mistake a user can make here (a factory that cannot be imported or called, a checkpoint that
does not fit the model, data of the wrong kind or empty) raises a :class:`~torchfim.TorchfimError`
(a ``ValueError``) whose one-line message names the fix, so that the command line prints it as one
line with exit status 2 rather than a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from .errors import TorchfimError

__all__ = ["Data", "load_factory", "call_factory", "as_data", "load_checkpoint", "apply_state_dict"]

#: Keys under which training scripts commonly nest a state dict inside a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def ensure_cwd_on_path() -> None:
    """Put the current directory first on ``sys.path`` (as ``python -m`` would), once."""
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.insert(0, cwd)


def load_factory(spec: str, option: str) -> object:
    """The callable named by ``spec`` = ``MODULE:FACTORY`` (or ``path/to/file.py:FACTORY``).

    ``MODULE`` is imported with the current directory on ``sys.path``; ``FACTORY`` may be dotted
    (``Class.method``). ``option`` (e.g. ``"--model"``) is named in error messages.
    """
    if not isinstance(spec, str) or spec.count(":") < 1:
        raise TorchfimError(
            f"{option} expects MODULE:FACTORY (e.g. {option} mymodels:make), got {spec!r}"
        )
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise TorchfimError(
            f"{option} expects MODULE:FACTORY (e.g. {option} mymodels:make), got {spec!r}"
        )
    ensure_cwd_on_path()
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise TorchfimError(f"{option} {spec}: no file {path}; give an existing .py file")
            unique = f"_torchfim_user_{abs(hash(str(path.resolve())))}"
            loader_spec = importlib.util.spec_from_file_location(unique, path)
            if loader_spec is None or loader_spec.loader is None:
                raise TorchfimError(f"{option} {spec}: cannot import {path} as a Python module")
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[unique] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except TorchfimError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name == module_name or (exc.name and module_name.startswith(exc.name + ".")):
            hint = (
                f"run from the directory that holds {module_name.replace('.', '/')}.py "
                "or add its directory to PYTHONPATH"
            )
        else:
            hint = f"install the package it imports ({exc.name}) or fix the import in {module_name}"
        raise TorchfimError(f"{option} {spec}: cannot import module {module_name!r} ({_one_line(exc)}); {hint}") from exc
    except Exception as exc:  # SyntaxError, errors raised while the module runs, ...
        raise TorchfimError(
            f"{option} {spec}: importing module {module_name!r} failed ({_one_line(exc)}); fix that module"
        ) from exc
    target: object = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise TorchfimError(
                f"{option} {spec}: module {module_name!r} has no attribute {attr!r}; "
                f"name a function defined in it (MODULE:FACTORY)"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TorchfimError(
            f"{option} {spec}: {attr!r} is a {type(target).__name__}, not a callable; "
            "name a function that returns it (MODULE:FACTORY)"
        )
    return target


def call_factory(factory: object, spec: str, option: str) -> object:
    """``factory()``, with any exception it raises turned into a one-line TorchfimError."""
    try:
        return factory()  # type: ignore[operator]
    except TorchfimError:
        raise
    except Exception as exc:
        raise TorchfimError(
            f"{option} {spec}: calling {spec.rpartition(':')[2]}() failed ({_one_line(exc)}); "
            "it must take no arguments and return the object"
        ) from exc


# ------------------------------------------------------------------------------------------- data
@dataclass
class Data:
    """Inputs (first dimension = batch) and, when the data carries them, the true targets."""

    inputs: Tensor
    targets: Tensor | None
    source: str

    @property
    def n(self) -> int:
        return int(self.inputs.shape[0])


def _tensor(value: object, what: str, option: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, np.ndarray) or isinstance(value, (int, float)):
        return torch.as_tensor(np.asarray(value))
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, (int, float)) for v in value):
        return torch.as_tensor(value)
    raise TorchfimError(
        f"{option}: the {what} must be a torch.Tensor (or numpy array), got {type(value).__name__}; "
        "return a tensor, an (inputs, targets) pair of tensors, or a Dataset yielding (x, y)"
    )


def _concat_batches(batches: Iterable[object], option: str) -> tuple[list[Tensor], list[Tensor] | None]:
    xs: list[Tensor] = []
    ys: list[Tensor] | None = []
    for item in batches:
        if isinstance(item, (tuple, list)):
            if not item:
                raise TorchfimError(f"{option}: the data yielded an empty item; yield x or (x, y)")
            x = _tensor(item[0], "inputs", option)
            y = _tensor(item[1], "targets", option) if len(item) > 1 and item[1] is not None else None
        elif isinstance(item, Mapping):
            raise TorchfimError(
                f"{option}: the data yields dicts; return a tensor, an (inputs, targets) pair, "
                "or a Dataset yielding (x, y) tuples"
            )
        else:
            x, y = _tensor(item, "inputs", option), None
        xs.append(x)
        if ys is not None and y is not None:
            ys.append(y)
        else:
            ys = None
    return xs, ys


def as_data(obj: object, source: str, option: str = "--data") -> Data:
    """Normalise what a data factory returned into :class:`Data`.

    Accepts a tensor (or numpy array) of inputs; a tuple ``(inputs, targets)`` (or ``(inputs,)``);
    a map-style ``torch.utils.data.Dataset`` whose items are ``x`` or ``(x, y)``; or an iterable of
    mini-batches (a ``DataLoader``) of tensors or ``(x, y)`` pairs.
    """
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    inputs: Tensor
    targets: Tensor | None = None
    if isinstance(obj, (Tensor, np.ndarray)):
        inputs = _tensor(obj, "inputs", option)
    elif isinstance(obj, (tuple, list)) and 1 <= len(obj) <= 2 and isinstance(obj[0], (Tensor, np.ndarray)) \
            and (len(obj) == 1 or obj[1] is None or isinstance(obj[1], (Tensor, np.ndarray, list, tuple))) \
            and not (len(obj) == 2 and isinstance(obj[1], (Tensor, np.ndarray)) and isinstance(obj[0], Tensor)
                     and obj[0].dim() > 0 and obj[1].shape[:1] != obj[0].shape[:1]
                     and obj[1].shape[1:] == obj[0].shape[1:]):
        # (inputs,) or (inputs, targets); two same-shaped tensors of different lengths are
        # rather two mini-batches, handled below.
        inputs = _tensor(obj[0], "inputs", option)
        if len(obj) == 2 and obj[1] is not None:
            try:
                targets = obj[1] if isinstance(obj[1], Tensor) else torch.as_tensor(np.asarray(obj[1]))
            except Exception as exc:
                raise TorchfimError(
                    f"{option}: the targets could not be made a tensor ({_one_line(exc)}); return "
                    "(inputs, targets) with targets a tensor of one target per input"
                ) from exc
            targets = targets.detach()
    elif isinstance(obj, (Dataset, DataLoader)) or (
        isinstance(obj, Iterable) and not isinstance(obj, (str, bytes, Mapping))
    ):
        if isinstance(obj, Dataset) and not isinstance(obj, IterableDataset):
            try:
                length = len(obj)  # type: ignore[arg-type]
            except TypeError:
                length = None
            if length == 0:
                raise TorchfimError(f"{option}: the dataset is empty; return at least one input")
            batches: Iterable[object] = DataLoader(obj, batch_size=512, shuffle=False)
        elif isinstance(obj, IterableDataset):
            batches = DataLoader(obj, batch_size=512)
        else:
            batches = obj  # already mini-batches (a DataLoader or a list of batches)
        try:
            xs, ys = _concat_batches(batches, option)
        except TorchfimError:
            raise
        except Exception as exc:
            raise TorchfimError(
                f"{option}: reading the data failed ({_one_line(exc)}); a Dataset must yield tensors "
                "x or tuples (x, y) of tensors (or numbers) of equal shapes"
            ) from exc
        if not xs:
            raise TorchfimError(f"{option}: the data is empty; return at least one input")
        try:
            inputs = torch.cat([x if x.dim() else x.reshape(1) for x in xs])
            targets = torch.cat([y.reshape(-1) if y.dim() == 0 else y for y in ys]) if ys else None
        except RuntimeError as exc:
            raise TorchfimError(
                f"{option}: the data's items have different shapes ({_one_line(exc)}); "
                "make every input the same shape"
            ) from exc
    else:
        raise TorchfimError(
            f"{option}: the factory returned a {type(obj).__name__}; return a tensor of inputs, an "
            "(inputs, targets) pair of tensors, or a torch Dataset yielding (x, y)"
        )
    if inputs.dim() == 0 or inputs.shape[0] == 0:
        raise TorchfimError(f"{option}: the data is empty (no inputs); return at least one input")
    if targets is not None:
        if targets.dim() == 0 or targets.shape[0] != inputs.shape[0]:
            raise TorchfimError(
                f"{option}: {inputs.shape[0]} inputs but targets of shape {tuple(targets.shape)}; "
                "return one target per input (or inputs only)"
            )
    return Data(inputs, targets, source)


# ------------------------------------------------------------------------------------ checkpoints
def _is_state_dict(obj: object) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def load_checkpoint(path: str | os.PathLike) -> nn.Module | dict[str, Tensor]:
    """Read a checkpoint written by ``torch.save``: a whole module or a state dict.

    Tries ``weights_only=True`` first (a state dict needs nothing more); whole modules are pickled
    Python objects, so they are then read with ``weights_only=False``, which runs the pickled code:
    only pass checkpoints you trust. A dict that nests the state dict under ``"state_dict"``,
    ``"model_state_dict"``, ``"model"``, ``"net"`` or ``"module"`` is unwrapped.
    """
    ensure_cwd_on_path()
    p = Path(path)
    if not p.is_file():
        raise TorchfimError(f"--checkpoint {path}: no such file; give the file written by torch.save")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            raise TorchfimError(
                f"--checkpoint {path}: it holds a whole module whose class cannot be imported here "
                f"({_one_line(exc)}); save model.state_dict() instead and pass the class's factory "
                "with --model MODULE:FACTORY"
            ) from exc
        except Exception as exc:
            raise TorchfimError(
                f"--checkpoint {path}: not a checkpoint torch.load can read ({_one_line(exc)}); "
                "save it with torch.save(model.state_dict(), FILE) or torch.save(model, FILE)"
            ) from exc
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner):
                return inner
    raise TorchfimError(
        f"--checkpoint {path}: holds a {type(obj).__name__} that is neither a module nor a state dict; "
        "save it with torch.save(model.state_dict(), FILE) or torch.save(model, FILE)"
    )


def apply_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str, hint: str) -> None:
    """Load ``state`` into ``model`` (strictly), or raise one line saying how they differ.

    A ``module.`` prefix on every key (as ``nn.DataParallel`` saves) is stripped. ``hint`` ends the
    message (what to pass instead).
    """
    if state and all(k.startswith("module.") for k in state) and not any(
        k.startswith("module.") for k in model.state_dict()
    ):
        state = {k[len("module."):]: v for k, v in state.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} is {tuple(state[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the model"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {_listed(unexpected)}")
    if shapes:
        problems.append("; ".join(shapes[:2]) + (f" (and {len(shapes) - 2} more)" if len(shapes) > 2 else ""))
    if problems:
        raise TorchfimError(
            f"--checkpoint {path} does not match the model: {'; '.join(problems)}; {hint}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # dtype trouble or a custom load hook
        raise TorchfimError(f"--checkpoint {path} does not match the model ({_one_line(exc)}); {hint}") from exc


def _listed(keys: list[str], most: int = 3) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")
