"""Loading what ``torchfim report`` analyses: model and data factories, and checkpoints.

Every mistake a user can make here (a factory that cannot be imported or called, a checkpoint that
does not fit the model) raises a :class:`~torchfim.TorchfimError` (a ``ValueError``) whose one-line
message names the fix, so that the command line prints it as one line with exit status 2 rather
than a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import TorchfimError

__all__ = [
    "ensure_cwd_on_path",
    "load_factory",
    "call_factory",
    "load_checkpoint",
    "apply_state_dict",
    "one_line",
]

#: Keys under which training scripts commonly nest a state dict inside a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
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
        raise TorchfimError(f"{option} {spec}: cannot import module {module_name!r} ({one_line(exc)}); {hint}") from exc
    except Exception as exc:  # SyntaxError, errors raised while the module runs, ...
        raise TorchfimError(
            f"{option} {spec}: importing module {module_name!r} failed ({one_line(exc)}); fix that module"
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
            f"{option} {spec}: calling {spec.rpartition(':')[2]}() failed ({one_line(exc)}); "
            "it must take no arguments and return the object"
        ) from exc

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
    except Exception:  # noqa: BLE001 - any refusal of the safe loader: retry with the full unpickler below
        try:
            obj = torch.load(p, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            raise TorchfimError(
                f"--checkpoint {path}: it holds a whole module whose class cannot be imported here "
                f"({one_line(exc)}); save model.state_dict() instead and pass the class's factory "
                "with --model MODULE:FACTORY"
            ) from exc
        except Exception as exc:
            raise TorchfimError(
                f"--checkpoint {path}: not a checkpoint torch.load can read ({one_line(exc)}); "
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
        raise TorchfimError(f"--checkpoint {path} does not match the model ({one_line(exc)}); {hint}") from exc


def _listed(keys: list[str], most: int = 3) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")
