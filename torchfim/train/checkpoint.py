"""The parts of the training tools' ``state_dict()`` they share, and its checks on loading.

A run saved with the model, the optimiser and the tools' ``state_dict()`` and resumed from them goes on
as the uninterrupted run would: the same labels (the states of the tools' generators), the same subset
windows and control-variate chains of :class:`~torchfim.train.FisherTraceMonitor`, the cached gradient
of :class:`~torchfim.train.FisherPenalty`. A state holds only tensors, numbers, strings, lists and dicts,
so ``torch.load(path, weights_only=True)`` reads it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .._prefix import without_prefix
from .._settings_digest import feed_digest
from ..engine.batch import Batch
from ..errors import TorchfimError

VERSION = 1


def generator_state(generator: torch.Generator | None) -> dict[str, object] | None:
    """The generator's device and state (None for no generator)."""
    if generator is None:
        return None
    return {"device": str(generator.device), "state": generator.get_state()}


def restored_generator(generator: torch.Generator | None, saved: Mapping[str, object] | None,
                       owner: str) -> torch.Generator | None:
    """``generator`` set to the saved state (a new generator on the saved device when None)."""
    if saved is None:
        return generator
    try:
        generator = torch.Generator(device=saved["device"]) if generator is None else generator
        generator.set_state(saved["state"])
    except (RuntimeError, TypeError, ValueError):
        here = "this machine" if generator is None else f"this one on {generator.device}"
        raise TorchfimError(
            f"{owner}.load_state_dict: the saved generator state comes from a generator on {saved['device']}, which "
            f"does not fit {here}; resume where a generator on {saved['device']} can be made and pass one"
        ) from None
    return generator


def held_digest(held: list[Batch]) -> hashlib._Hash:
    """The SHA-1 digest of held mini-batches, in order, as :class:`torchfim.process_rows.RowShare` takes a Fisher's:
    every input, keyword input and target by its shape (so the mini-batches' sizes), dtype and bytes."""
    digest = hashlib.sha1()
    for batch in held:
        feed_digest(digest, (batch.args, batch.kwargs, batch.targets))
    return digest


def inputs_checksum(held: list[Batch]) -> str:
    """:func:`held_digest` in hex: what a saved state's held inputs are checked against."""
    return held_digest(held).hexdigest()


def parameter_shapes(model: nn.Module) -> str | None:
    """The number of ``model``'s parameters, of their entries and a digest of their shapes in order, what a monitor's
    saved state is checked against (a wrapper such as DDP leaves them as they are); None while a lazy parameter has
    no shape yet."""
    params = list(model.parameters())
    if any(nn.parameter.is_lazy(p) for p in params):
        return None
    shapes = hashlib.sha1(repr([tuple(p.shape) for p in params]).encode()).hexdigest()[:12]
    return f"{len(params)} tensors of {sum(p.numel() for p in params)} numbers (shapes {shapes})"


#: Settings a state saved by an earlier torchfim may lack (or hold None for: a lazy model), not compared there.
KEPT_LATER = ("parameters",)


def checked(state: object, owner: str, settings: Mapping[str, object], keys: tuple[str, ...]) -> Mapping[str, object]:
    """``state`` when it is a state this object can load: a mapping with ``keys``, of this version, saved with
    the same ``settings`` (those of :data:`KEPT_LATER` where both have them); one whose held inputs were checked by an
    earlier checksum (a number) is refused."""
    if not isinstance(state, Mapping) or state.get("version") != VERSION or any(k not in state for k in keys):
        raise TorchfimError(
            f"{owner}.load_state_dict takes what {owner}.state_dict() returned (version {VERSION}), got "
            f"{type(state).__name__}{'' if not isinstance(state, Mapping) else ' with keys ' + repr(sorted(state))}"
        )
    saved = state["settings"]
    if isinstance(saved.get("inputs_checksum"), float):  # Σ (row index + 1)·(row sum): not comparable to a digest
        raise TorchfimError(
            f"{owner}.load_state_dict: the state was saved by an earlier torchfim, which checked the held inputs "
            "by a weighted sum of their rows (blind to how they were cut into mini-batches and to entries reordered "
            "within a row), and this one cannot compare it with its digest of them; resume the run with the torchfim "
            f"that saved it, or start this {owner} afresh"
        )
    differ = [k for k, v in settings.items() if not _same(saved.get(k), v)
              and not (k in KEPT_LATER and None in (saved.get(k), v))]
    if "processes" in differ and saved.get("processes") and settings["processes"]:  # before the inputs: each its share
        _refuse_other_process(owner, saved["processes"], settings["processes"])
    if differ:
        said = ", ".join(f"{k}={saved.get(k)!r} (here {settings[k]!r})" for k in differ)
        held = "the same held inputs, in the same order and mini-batches, and " if "inputs_checksum" in settings else ""
        model = "on a model of the same parameters, " if "parameters" in differ else ""
        raise TorchfimError(
            f"{owner}.load_state_dict: the state was saved by a {owner} made with {said}; make this one as the "
            f"saved run made its own ({model}{held or 'the same '}options)"
        )
    return state


def _refuse_other_process(owner: str, saved: list[int], here: list[int]) -> None:
    """Refuse a state saved by another process of a shared run (``[rank, world]`` each), naming the fix."""
    (rank, world), (own, size) = saved, here
    fix = (f"resume with {world} processes, each loading the state it saved" if world != size else
           "each process saves and loads its own state_dict(), as it holds its own share of the inputs and its own "
           "labels' generator (e.g. torch.save(mon.state_dict(), f'monitor-{rank}.pt') on every process, not only "
           "on the first)")
    raise TorchfimError(f"{owner}.load_state_dict: the state was saved by process {rank} of {world} "
                        f"(across_processes=True), and this is process {own} of {size}; {fix}")


def _same(saved: object, now: object) -> bool:
    if isinstance(saved, float) and isinstance(now, float):
        return abs(saved - now) <= 1e-9 * max(abs(saved), abs(now), 1e-300)
    return saved == now


def named_gradients(model: nn.Module, params: list[Tensor], grads: list[Tensor | None]) -> dict[str, Tensor | None]:
    """``grads`` by the names of ``params`` in ``model`` (a cached gradient saved so that it can be put on
    the parameters of a model rebuilt to resume; None for a parameter the graph did not reach)."""
    names = {id(p): name for name, p in model.named_parameters()}
    missing = [i for i, p in enumerate(params) if id(p) not in names]
    if missing:
        raise TorchfimError(
            "FisherPenalty.state_dict: the cached penalty gradient belongs to parameters the model no longer holds "
            "(a layer was replaced after the last computed step); save the state right after a computed step"
        )
    return {names[id(p)]: g for p, g in zip(params, grads)}


def gradients_on(model: nn.Module, saved: Mapping[str, Tensor | None]) -> tuple[list[Tensor], list[Tensor | None]]:
    """The parameters of ``model`` that the saved gradients are named after, and the gradients (in the
    parameters' dtype and device); refused when a name is missing or a shape differs. Names saved on the model
    in a wrapper (DDP's ``module.``) are read on the bare model, and the other way round."""
    params = dict(model.named_parameters())
    saved, _ = without_prefix(dict(saved), params)  # saved on the wrapper, loaded on the bare model
    _, prefix = without_prefix(params, saved)  # saved on the bare model, loaded on the wrapper
    saved = {prefix + n: g for n, g in saved.items()}
    wrong = [n for n, g in saved.items() if n not in params or (g is not None and params[n].shape != g.shape)]
    if wrong:
        raise TorchfimError(
            f"FisherPenalty.load_state_dict: the saved penalty gradient has parameters {wrong[:3]} that this model "
            "does not hold with those shapes (a prefix that a wrapper puts on every name, such as DDP's module., "
            "is read away); load the state into the penalty of the model it was saved with"
        )
    return [params[n] for n in saved], [None if g is None else g.to(params[n].device, params[n].dtype)
                                        for n, g in saved.items()]
