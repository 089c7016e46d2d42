"""Numbers that tell whether the processes of a ``torch.distributed`` run were called alike: digests of values
(tensors by their bytes), of the functions passed as ``output=`` or ``mask=`` (their code and the values they hold),
of families and of generator states, each gathered as one float (:func:`torchfim._processes.gather_numbers`)."""

from __future__ import annotations

import functools
import hashlib
import itertools
import re
import types
from collections.abc import Mapping

import torch
from torch import Tensor

__all__ = ["digest_number", "family_settings", "feed_digest", "function_settings", "generator_fingerprint",
           "settings_number"]


def digest_number(digest: hashlib._Hash) -> float:
    """48 bits of ``digest``, as a float (exact in float64: gathered as a number)."""
    return float(int(digest.hexdigest()[:12], 16))


def family_settings(family: object) -> tuple:
    """A family as the processes must share it: its class and the values it holds (tensors by their bytes)."""
    held = {key: value for key, value in getattr(family, "__dict__", {}).items() if not key.startswith("__")}
    return type(family).__qualname__, held


#: Numbers of a tensor copied to the CPU at a time by :func:`feed_digest` (bounds its memory: a held set of images).
DIGEST_CHUNK = 2**22


def feed_digest(digest: hashlib._Hash, value: object) -> None:
    """Feed ``value`` into ``digest``: numbers, strings and None by their ``repr``, tensors by their shape, dtype
    and bytes (row-major, in chunks of rows: the same digest as in one piece), containers item by item (a mapping's
    keys included)."""
    if isinstance(value, Tensor):
        digest.update(repr((tuple(value.shape), str(value.dtype))).encode())
        rows = value.detach().reshape(1, -1) if value.dim() == 0 else value.detach()
        step = max(1, DIGEST_CHUNK // max(1, rows[0].numel())) if len(rows) else 1
        for start in range(0, len(rows), step):
            digest.update(rows[start:start + step].contiguous().cpu().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, Mapping):
        for key, item in value.items():
            digest.update(repr(key).encode())
            feed_digest(digest, item)
    elif isinstance(value, (tuple, list)):
        for item in value:
            feed_digest(digest, item)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        digest.update(repr(value).encode())


def function_settings(f: object, depth: int = 0) -> object:
    """A function's part of the settings that processes must share (an ``output`` or a ``mask``): None or a string
    as it is; a ``functools.partial`` by its function, arguments and keywords; else its qualified name and, for a
    Python function, its code (bytecode, constants, names), so that two lambdas that compute differently differ (a
    trial's ``lambda o: o`` and ``lambda o: 2 * o`` on two processes were blended), and the values its closure and
    defaults hold (:func:`_held_value`: a trial's ``lambda o: o * scale`` with ``scale = 1 + rank`` was blended).
    Globals are not read (a device or rank named there is each process's own), nor closure variables named as a
    device or a rank (``device_id``, ``local_rank``, ``gpu``: ``.to(device_id)`` with ``device_id = rank`` is
    the same call on every process)."""
    if f is None or isinstance(f, str):
        return f
    if depth > _DEPTH:  # a function that holds itself (a recursive closure)
        return "..."
    if isinstance(f, functools.partial):
        return ("partial", function_settings(f.func, depth + 1), _held_value(f.args, depth),
                _held_value(f.keywords, depth))
    code = getattr(f, "__code__", None)
    name = getattr(f, "__qualname__", type(f).__qualname__)
    if not isinstance(code, types.CodeType):
        return name
    cells = tuple(None if _OWN_NAME.fullmatch(name) else _cell(c, depth)
                  for name, c in zip(code.co_freevars, getattr(f, "__closure__", None) or ()))
    defaults = (getattr(f, "__defaults__", None), getattr(f, "__kwdefaults__", None))
    return name, _code_settings(code), cells, _held_value(defaults, depth)


#: How deep :func:`function_settings` follows functions held by functions, and containers in containers.
_DEPTH = 4
#: The most items of a container held by a function that :func:`_held_value` compares one by one (larger: its type
#: and length, so a vocabulary of 200k entries costs nothing per call).
_ITEMS = 256
#: Names of held values (closure variables, dict keys) that are each process's own: a device index, a rank, a process
#: index (whole names: ``low_rank`` or ``temperature_device`` are compared).
_OWN_NAME = re.compile(r"(?:(?:local|global|node|my|this|cuda)_)?(?:rank|device|gpu|dev|process_index|local_process_index)"
                       r"(?:_?ids?|_?idx|_index|_num|_in_[a-z_]+|s)?", re.IGNORECASE)
#: The most entries of a tensor held by a function that :func:`_held_value` digests (larger: shape and dtype).
_SMALL = 1 << 16


def _cell(cell: types.CellType, depth: int) -> object:
    """A closure cell's value (:func:`_held_value`); an empty cell (a name not yet bound) as None."""
    try:
        contents = cell.cell_contents
    except ValueError:
        return None
    return _held_value(contents, depth)


def _held_value(value: object, depth: int) -> object:
    """A value a function holds, as processes must share it: numbers, strings, bools and None by ``repr`` (a device's
    name by its kind: each process's GPU is its own), containers item by item (a dict's items under a name such as
    ``local_rank`` or ``device_id`` left out, as closure variables so named are; a set in sorted order), those of more
    than :data:`_ITEMS` items by their length and :data:`_ITEMS` items spread over them (a list, a tuple) or their
    first ones (a dict), functions by their settings, small tensors and NumPy arrays by a digest of their shape, dtype
    and bytes (large ones by shape and dtype), other objects by their type's name."""
    if isinstance(value, torch.device):
        return "device", value.type
    if isinstance(value, str):
        return ("device", value.split(":")[0]) if _device_name(value) else value
    if isinstance(value, (int, float, bool, complex)) or value is None:
        return repr(value)
    if isinstance(value, (tuple, list, set, frozenset, Mapping)):
        return _held_container(value, depth)
    if type(value).__module__ == "numpy" and hasattr(value, "tobytes") and hasattr(value, "shape"):  # any strides
        small = value.size <= _SMALL
        return tuple(value.shape), str(value.dtype), hashlib.sha1(value.tobytes()).hexdigest() if small else None
    if isinstance(value, Tensor):
        return (tuple(value.shape), str(value.dtype),
                settings_number(value) if value.numel() <= _SMALL and value.device.type != "meta" else None)
    if callable(value) and not isinstance(value, torch.nn.Module):
        return function_settings(value, depth + 1)
    return type(value).__qualname__


def _held_container(value: tuple | list | set | frozenset | Mapping, depth: int) -> object:
    """A container :func:`_held_value` compares: item by item, a large one by a spread of its items (a list of class
    indices shifted by one differs in every item), one deeper than :data:`_DEPTH` (one that holds itself) by type and
    length."""
    kind, n = type(value).__qualname__, len(value)
    if depth > _DEPTH:
        return kind, n
    if isinstance(value, Mapping):
        items = value.items() if n <= _ITEMS else itertools.islice(value.items(), _ITEMS)
        return kind, n, tuple((repr(k), None if isinstance(k, str) and _OWN_NAME.fullmatch(k) else
                               _held_value(v, depth + 1)) for k, v in items)
    if isinstance(value, (set, frozenset)):
        return (kind, n) if n > _ITEMS else (kind, tuple(sorted(repr(_held_value(v, depth + 1)) for v in value)))
    spread = value if n <= _ITEMS else [value[i * n // _ITEMS] for i in range(_ITEMS)] + [value[-1]]
    return kind, n, tuple(_held_value(v, depth + 1) for v in spread)


def _device_name(name: str) -> bool:
    """Whether ``name`` names a device (``"cuda:1"``, ``"cpu"``)."""
    try:
        torch.device(name)
    except (RuntimeError, ValueError):
        return False
    return True


def _code_settings(code: types.CodeType) -> tuple:
    """Bytecode, constants and names of ``code``, the same in every process for the same source."""
    return code.co_code.hex(), tuple(_constant(c) for c in code.co_consts), code.co_names


def _constant(value: object) -> object:
    """A code constant as processes agree on it: nested code by its own settings (not its address), a frozenset
    (``x in {"a", "b"}``) sorted (its order follows each process's string hash seed, which torchrun does not fix:
    a reviewer's lambda gave three numbers under three seeds), tuples item by item, others by ``repr``."""
    if isinstance(value, types.CodeType):
        return _code_settings(value)
    if isinstance(value, frozenset):
        return ("frozenset", tuple(sorted(repr(_constant(v)) for v in value)))
    if isinstance(value, tuple):
        return tuple(_constant(v) for v in value)
    return repr(value)


def settings_number(value: object) -> float:
    """:func:`digest_number` of ``value`` fed to a fresh digest (:func:`feed_digest`): processes called alike
    gather the same number."""
    digest = hashlib.sha1()
    feed_digest(digest, value)
    return digest_number(digest)


def generator_fingerprint(generator: torch.Generator) -> float:
    """A number that tells generator states apart (:func:`digest_number` of a hash of the state)."""
    state: Tensor = generator.get_state()
    return digest_number(hashlib.sha1(state.cpu().numpy().tobytes()))
