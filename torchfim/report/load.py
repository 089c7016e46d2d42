"""Loading what ``torchfim report`` analyses: model and data factories, and checkpoints.

Every mistake a user can make here (a factory that cannot be imported or called, a checkpoint that
does not fit the model) raises a :class:`~torchfim.TorchfimError` (a ``ValueError``) whose one-line
message names the fix, so that the command line prints it as one line with exit status 2 rather
than a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from .._prefix import without_prefix
from .._words import a_or_an
from ..errors import TorchfimError
from .wording import option, said

__all__ = [
    "ensure_cwd_on_path",
    "load_factory",
    "call_factory",
    "load_checkpoint",
    "apply_checkpoint",
    "apply_state_dict",
    "one_line",
]

#: Keys under which training scripts commonly nest a state dict inside a checkpoint dict.
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")


def one_line(exc: BaseException) -> str:
    """``Type: message`` of an exception, on one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _checkpoint(path: str | os.PathLike | None) -> str:
    """The checkpoint ``path`` as the caller gave it: ``--checkpoint PATH`` or ``checkpoint='PATH'``; a state dict
    passed in (``path`` None) is "the state dict"."""
    return "the state dict" if path is None else option("checkpoint", str(path))


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
            f"{option} {spec}: {attr!r} is {a_or_an(type(target).__name__)}, not a callable; "
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
    """Read a checkpoint: a file written by ``torch.save`` (a whole module or a state dict), a ``.safetensors``
    file, or a Hugging Face checkpoint folder (``save_pretrained``'s or a ``Trainer``'s ``checkpoint-N``).

    ``torch.save`` files are read with ``weights_only=True`` first (a state dict needs nothing more);
    whole modules are pickled Python objects, so they are then read with ``weights_only=False``, which runs
    the pickled code: only pass checkpoints you trust. A dict that nests the state dict under
    ``"state_dict"``, ``"model_state_dict"``, ``"model"``, ``"net"`` or ``"module"`` is unwrapped. A folder
    gives the state dict of its ``model.safetensors`` or ``pytorch_model.bin``, or of all the shards its
    ``*.index.json`` lists.
    """
    ensure_cwd_on_path()
    p = Path(path)
    if p.is_dir():
        return _folder_state(p)
    if not p.is_file():
        raise TorchfimError(f"{_checkpoint(path)}: no such file; give the file written by torch.save")
    obj = _read_safetensors(p) if p.suffix == ".safetensors" else _read_torch_file(p)
    if isinstance(obj, nn.Module) or _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for key in _NESTED_KEYS:
            inner = obj.get(key)
            if isinstance(inner, nn.Module) or _is_state_dict(inner):
                return inner
    raise TorchfimError(
        f"{_checkpoint(path)}: holds {a_or_an(type(obj).__name__)} that is neither a module nor a state dict; "
        "save it with torch.save(model.state_dict(), FILE) or torch.save(model, FILE)"
    )


def _read_torch_file(p: Path) -> object:
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any refusal of the safe loader: retry with the full unpickler below
        try:
            return torch.load(p, map_location="cpu", weights_only=False)
        except (AttributeError, ModuleNotFoundError, ImportError) as exc:
            raise TorchfimError(
                f"{_checkpoint(p)}: it holds a whole module whose class cannot be imported here "
                f"({one_line(exc)}); save model.state_dict() instead and pass "
                + said("the class's factory with --model MODULE:FACTORY", "a module of the class as model")
            ) from exc
        except Exception as exc:
            wrapped = "process group" in str(exc)  # a pickled DistributedDataParallel needs one to be rebuilt
            raise TorchfimError(
                f"{_checkpoint(p)}: not a checkpoint torch.load can read ({one_line(exc)}); "
                + ("it looks like a pickled DistributedDataParallel wrapper: save the model inside it, "
                   "torch.save(ddp.module.state_dict(), FILE) (or torch.save(ddp.module, FILE))" if wrapped else
                   "save it with torch.save(model.state_dict(), FILE) or torch.save(model, FILE)")
            ) from exc


def _read_safetensors(p: Path) -> dict[str, Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:
        raise TorchfimError(f"{_checkpoint(p)}: reading .safetensors files needs the safetensors package; "
                            "pip install safetensors") from exc
    try:
        return load_file(str(p), device="cpu")
    except Exception as exc:
        raise TorchfimError(f"{_checkpoint(p)}: not a safetensors file that can be read ({one_line(exc)})") from exc


#: The weights of a Hugging Face checkpoint folder, in the order they are looked for.
_FOLDER_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")


def apply_checkpoint(model: nn.Module, loaded: nn.Module | Mapping[str, Tensor], path: str | os.PathLike,
                     hint: str) -> None:
    """Load what :func:`load_checkpoint` read into ``model``: its state as saved (:func:`apply_state_dict`), or, where
    the keys differ and ``model`` is a transformers model whose checkpoint folder holds its ``config.json``, as the
    model's class loads the folder (``from_pretrained``, with the key conversions transformers applies to the layouts
    it saves, such as a mixture of experts' stacked weights)."""
    state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
    try:
        apply_state_dict(model, state, str(path), hint)
    except TorchfimError as mismatch:
        converted = _pretrained_state(model, Path(path), mismatch)
        if converted is None:
            raise
        apply_state_dict(model, converted, str(path), hint)


def _pretrained_state(model: nn.Module, folder: Path, mismatch: TorchfimError) -> dict[str, Tensor] | None:
    """The state ``type(model).from_pretrained`` loads from ``folder`` with the model's config and dtype (None where
    that does not apply); refused, with ``mismatch`` beside the reason, where it fails or would leave weights at
    random (missing or unexpected keys)."""
    pretrained = getattr(sys.modules.get("transformers"), "PreTrainedModel", None)
    if not (isinstance(pretrained, type) and isinstance(model, pretrained) and (folder / "config.json").is_file()):
        return None
    first = next(iter(model.parameters()), None)
    options = {"config": model.config, **({} if first is None else {"dtype": first.dtype})}
    try:
        loaded, info = type(model).from_pretrained(folder, output_loading_info=True, **options)
    except Exception as exc:  # transformers' own refusal, on one line
        raise TorchfimError(f"{mismatch}; {type(model).__name__}.from_pretrained cannot load it either "
                            f"({one_line(exc)})") from exc
    problems = [f"{what.split('_')[0]} {_listed(sorted(str(k) for k in info.get(what) or ()))}"
                for what in ("missing_keys", "unexpected_keys") if info.get(what)]
    if problems:  # from_pretrained would initialise what is missing at random: strict, as for any checkpoint
        raise TorchfimError(f"{mismatch}; {type(model).__name__}.from_pretrained leaves {'; '.join(problems)}")
    return loaded.state_dict()


def _folder_state(folder: Path) -> dict[str, Tensor]:
    """The state dict of a Hugging Face checkpoint folder (all its shards, where an index lists them)."""
    name = next((n for n in _FOLDER_WEIGHTS if (folder / n).is_file()), None)
    if name is None and (folder / "adapter_config.json").is_file():
        raise TorchfimError(f"{_checkpoint(folder)}: a PEFT adapter folder (adapter weights only, no base model); "
                            f"load it in {said('your --model factory', 'the model you pass')}, "
                            f"peft.PeftModel.from_pretrained(base_model, FOLDER), and drop {option('checkpoint')}")
    if name is None:
        raise TorchfimError(f"{_checkpoint(folder)}: a folder without {' or '.join(_FOLDER_WEIGHTS[1::2])} (what a "
                            "Hugging Face checkpoint folder holds); give one of those or a file written by torch.save")
    if not name.endswith(".index.json"):
        return load_checkpoint(folder / name)
    try:
        shards = sorted(set(json.loads((folder / name).read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TorchfimError(f"{_checkpoint(folder)}: {name} is not an index with a weight_map "
                            f"({one_line(exc)}); give the folder as save_pretrained wrote it") from exc
    state: dict[str, Tensor] = {}
    for shard in shards:
        state.update(load_checkpoint(folder / shard))
    return state


def apply_state_dict(model: nn.Module, state: Mapping[str, Tensor], path: str | None, hint: str) -> None:
    """Load ``state`` into ``model`` (strictly), or raise one line saying how they differ.

    A prefix on every key that the model's names lack is stripped: ``module.`` (``nn.DataParallel`` and
    ``DistributedDataParallel`` save it), ``_orig_mod.`` (``torch.compile``), or the attribute that holds the
    network in a Lightning checkpoint (``model.``). A weight tied to another (one tensor under two names, such
    as a language model's output layer and its token embedding) may be missing: ``save_pretrained`` writes it
    once, and it is loaded through the other name. ``hint`` ends the message (what to pass instead).
    """
    own = model.state_dict(keep_vars=True)
    state, prefix = without_prefix(dict(state), own)
    names_of = {}  # a tensor's names in the model: tied weights have several
    for k, v in own.items():
        names_of.setdefault(id(v), []).append(k)
    tied = {k: next(a for a in names_of[id(v)] if a in state) for k, v in own.items()
            if k not in state and any(a in state for a in names_of[id(v)])}
    state.update({k: state[alias] for k, alias in tied.items()})
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} is {tuple(state[k].shape)} in the {'state dict' if path is None else 'checkpoint'} but "
        f"{tuple(own[k].shape)} in the model"
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
            f"{_checkpoint(path)} does not match the model{_read_as(prefix)}: {'; '.join(problems)}; {hint}"
        )
    try:
        model.load_state_dict(state, strict=True)
    except Exception as exc:  # dtype trouble or a custom load hook
        raise TorchfimError(f"{_checkpoint(path)} does not match the model ({one_line(exc)}); {hint}") from exc


def _read_as(prefix: str) -> str:
    return f" (its keys read without their common prefix {prefix!r})" if prefix else ""


def _listed(keys: list[str], most: int = 3) -> str:
    shown = ", ".join(keys[:most])
    return shown + (f" and {len(keys) - most} more" if len(keys) > most else "")
