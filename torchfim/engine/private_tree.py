"""The engine's private copy of a user's module tree: new module objects, shared tensors.

Each module is copied shallowly (its own ``__dict__``), with its own parameter, buffer, child and hook
registries; children and attributes that point at a module of the tree point at its copy. Everything
else (tensors, configuration objects, constants) is shared, so a change the user makes to it is seen,
and nothing is copied recursively (a deep copy of a large model costs milliseconds).

A forward set on an instance is rebound as well. Libraries patch forwards that way: ``accelerate``'s
hooks (which Hugging Face models loaded with a ``device_map`` carry) set
``module.forward = partial(new_forward, module)`` and keep the class forward, bound to the module, as
``module._old_forward``. Left bound to the user's modules, such a forward would run them instead of
their copies, and parameters swapped on the copy (``torch.func.functional_call``) would not reach it: the
functional backend's Fisher came out as that of fixed parameters, zero. Bound methods, partials and
closures whose arguments or cells hold a module of the tree (or such a callable) are rebuilt around the
copy, and so are plain lists, tuples and dicts, named tuples, dataclass instances and
``SimpleNamespace``s that hold one (a list of layers kept beside their ``ModuleList``, which the forward
iterates; a dataclass of parts); a container or closure cell that holds nothing of the tree is kept, so
shared state stays shared. A forward that still reaches a module of the user's tree (through any other
kind of object) is caught by :meth:`.view.ModelView.check_independent`'s forward.

A module wrapped by ``torch.compile``, ``DataParallel`` or ``DistributedDataParallel``, the model or one
inside it, is replaced by the module inside (:func:`unwrapped`), so parameter names drop the wrapper's
``_orig_mod.`` or ``module.``.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import threading
import types
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from torch.nn.modules.module import register_module_forward_pre_hook
from torch.nn.parallel import DataParallel, DistributedDataParallel

__all__ = ["SLOTS_LOCK", "forward_signature", "is_compile_wrapper", "private_tree", "unwrapped", "users_modules_called"]

#: Held while a block puts other tensors in the slots of the user's own modules (the penalty's shifted pass, the
#: buffer clones of its per-input passes), and while a copy is made: a copy that another thread made meanwhile would
#: keep those tensors, and its Fisher would be of the shifted parameters (3e-10 off in float64 on a small MLP).
SLOTS_LOCK = threading.RLock()


def private_tree(model: nn.Module) -> nn.Module:
    """A structural copy of ``model``'s module objects, sharing every tensor and attribute with it."""
    with SLOTS_LOCK:
        return _copied_tree(unwrapped(model))


def _copied_tree(model: nn.Module) -> nn.Module:
    """:func:`private_tree` of a module that is no wrapper, the user's slots held still."""
    copies: dict[int, object] = {}
    for m in model.modules():
        c = object.__new__(type(m))
        c.__dict__.update(m.__dict__)
        copies[id(m)] = c
    for m in model.modules():
        inner = unwrapped(m)
        if inner is not m:  # a wrapped submodule: its parent's copy calls the copy of the module inside
            copies[id(m)] = copies[id(inner)]
    rebind = _Rebinder(copies)
    for c in copies.values():
        own = c.__dict__
        for key, value in own.items():  # assigning to present keys: the iteration stays valid
            if key.startswith("_") and isinstance(value, (dict, set)):  # registries: the engine's hooks stay on the copy
                value = own[key] = value.copy()
                if value and isinstance(value, dict):
                    for k, v in value.items():
                        if isinstance(v, _REBOUND):
                            value[k] = rebind(v)
            elif _may_hold_a_module(value):
                own[key] = rebind(value)
    return copies[id(model)]  # type: ignore[return-value]


def forward_signature(model: nn.Module) -> tuple:
    """What a copy of ``model`` fixes when it is made besides its tensors: each module's forward hooks (their
    handles' ids, new for every registration) and forward set on the instance. Where it changed since, a copy
    or what was settled on one (the coverage of the module rules) is of another forward."""
    return tuple((tuple(m._forward_pre_hooks), tuple(m._forward_hooks), id(m.__dict__.get("forward")))
                 for m in model.modules())


def settled_key(model: nn.Module) -> tuple:
    """What a check settled on ``model`` holds for: its parameters (the tensors, and which are trainable) and its
    :func:`forward_signature`."""
    return tuple((id(p), p.requires_grad) for p in model.parameters()), forward_signature(model)


@contextmanager
def users_modules_called(user_model: nn.Module) -> Iterator[list[str]]:
    """Within the block, the paths of the modules of ``user_model``'s own tree that this thread calls:
    none, for a forward of its private copy, unless the forward reaches one through an object the copy
    does not rebuild (then that module runs with the user's parameters, not the engine's)."""
    paths = {id(m): path for path, m in user_model.named_modules()}
    thread, called = threading.get_ident(), []

    def hook(module: nn.Module, args: object) -> None:
        if id(module) in paths and threading.get_ident() == thread and paths[id(module)] not in called:
            called.append(paths[id(module)])

    handle = register_module_forward_pre_hook(hook)  # process-wide: for one small forward, then removed
    try:
        yield called
    finally:
        handle.remove()


def is_compile_wrapper(module: nn.Module) -> bool:
    """Whether ``module`` is ``torch.compile``'s wrapper (dynamo's ``OptimizedModule``, by name: dynamo is
    imported by the first compile, not here)."""
    return type(module).__name__ == "OptimizedModule"


def unwrapped(module: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``'s, ``DataParallel``'s or ``DistributedDataParallel``'s wrapper
    (through several), else ``module`` itself. The engine computes on the inner module: dynamo cannot
    trace under torch.func's transforms and would recompile for every copy, torch's stateless calls
    refuse ``DataParallel``, and a data-parallel forward would prepare a gradient synchronisation."""
    while True:
        if isinstance(module, (DataParallel, DistributedDataParallel)):
            inner = module.__dict__["_modules"].get("module")
        elif is_compile_wrapper(module):
            inner = module.__dict__["_modules"].get("_orig_mod")
        else:
            return module
        if not isinstance(inner, nn.Module):
            return module
        module = inner


#: What may point at a module of the tree: the module itself, or a callable bound to or closing over it.
_REBOUND = (nn.Module, types.MethodType, functools.partial, types.FunctionType)
#: Plain containers that may hold such values (a list of layers kept beside the ModuleList, say).
_CONTAINERS = (list, tuple, dict)


def _may_hold_a_module(value: object) -> bool:
    """Whether the copy rebuilds ``value``: a module, a callable that may be bound to or close over one, or a
    container or record that may hold one."""
    return isinstance(value, _REBOUND) or type(value) in _CONTAINERS or _is_record(value)


def _is_record(value: object) -> bool:
    """A named tuple, a dataclass instance or a ``SimpleNamespace``: fields that may hold such values."""
    kind = type(value)
    known = _RECORD_TYPES.get(kind)
    if known is None:  # once per type: the copy asks for every attribute of every module
        known = _RECORD_TYPES[kind] = ((issubclass(kind, tuple) and hasattr(kind, "_fields"))
                                       or issubclass(kind, types.SimpleNamespace) or dataclasses.is_dataclass(kind))
    return known


#: Per type of attribute value: whether :func:`_is_record` holds.
_RECORD_TYPES: dict[type, bool] = {}


class _Rebinder:
    """Maps a value to the same value with every module of the tree replaced by its copy."""

    def __init__(self, copies: dict[int, object]) -> None:
        self.copies = copies
        self.memo: dict[int, object] = {}

    def __call__(self, value: object) -> object:
        if isinstance(value, nn.Module):
            return self.copies.get(id(value), value)
        if not _may_hold_a_module(value):
            return value
        key = id(value)
        if key not in self.memo:
            self.memo[key] = value  # a value that reaches itself (through a cell or an item) is kept as it is
            self.memo[key] = self._rebuilt(value)
        return self.memo[key]

    def _rebuilt(self, value: object) -> object:
        if type(value) is dict:
            items = {k: self(v) for k, v in value.items()}  # type: ignore[attr-defined]
            return value if _same(items.values(), value.values()) else items  # type: ignore[attr-defined]
        if type(value) in (list, tuple):
            elements = [self(v) for v in value]  # type: ignore[attr-defined]
            return value if _same(elements, value) else type(value)(elements)
        if _is_record(value):
            return self._record(value)
        if isinstance(value, types.MethodType):
            owner, func = self(value.__self__), self(value.__func__)
            if owner is value.__self__ and func is value.__func__:
                return value
            return types.MethodType(func, owner)
        if isinstance(value, functools.partial):
            func, args = self(value.func), tuple(self(a) for a in value.args)
            keywords = {k: self(v) for k, v in value.keywords.items()}
            if func is value.func and _same(args, value.args) and _same(keywords.values(), value.keywords.values()):
                return value
            new = functools.partial(func, *args, **keywords)
            new.__dict__.update({k: self(v) for k, v in value.__dict__.items()})  # update_wrapper's names
            return new
        return self._function(value)  # type: ignore[arg-type]

    def _record(self, value: object) -> object:
        """A named tuple, dataclass instance or namespace with its fields rebound (a shallow copy, frozen
        dataclasses included), or ``value`` itself when none changes."""
        if isinstance(value, tuple):
            elements = [self(v) for v in value]
            return value if _same(elements, value) else type(value)._make(elements)  # type: ignore[attr-defined]
        names = [f.name for f in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else list(vars(value))
        old = [getattr(value, n) for n in names]
        new = [self(v) for v in old]
        if _same(new, old):
            return value
        rebuilt = copy.copy(value)
        for name, field in zip(names, new):
            object.__setattr__(rebuilt, name, field)
        return rebuilt

    def _function(self, value: types.FunctionType) -> object:
        cells = value.__closure__ or ()
        contents = [_contents(cell) for cell in cells]
        rebound = [self(x) if x is not _EMPTY else x for x in contents]
        if _same(rebound, contents):
            return value
        closure = tuple(cell if new is old else types.CellType(new)
                        for cell, old, new in zip(cells, contents, rebound))
        new = types.FunctionType(value.__code__, value.__globals__, value.__name__, value.__defaults__, closure)
        new.__kwdefaults__ = value.__kwdefaults__
        new.__qualname__ = value.__qualname__
        new.__dict__.update(value.__dict__)
        return new


_EMPTY = object()


def _contents(cell: types.CellType) -> object:
    try:
        return cell.cell_contents
    except ValueError:  # a cell not yet assigned
        return _EMPTY


def _same(new: object, old: object) -> bool:
    return all(a is b for a, b in zip(new, old))  # type: ignore[call-overload]
