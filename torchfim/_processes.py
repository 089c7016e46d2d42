"""The place of this process in a ``torch.distributed`` run, as the tools with ``across_processes=True`` need it
(:func:`torchfim.fisher`, :class:`torchfim.train.FisherTraceMonitor`): its rank and the world's size, where
collectives' tensors live, and a number that tells label generators apart."""

from __future__ import annotations

import hashlib

import torch
from torch import Tensor

from .errors import TorchfimError

__all__ = ["collective_device", "generator_fingerprint", "process_group", "process_place"]


def process_group() -> tuple[int, int] | None:
    """``(rank, world size)`` of this process in the default ``torch.distributed`` group; None without one."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return None
    return distributed.get_rank(), distributed.get_world_size()


def process_place(across_processes: object) -> tuple[int, int] | None:
    """``(rank, world)`` for ``across_processes=True`` (refused without an initialised process group), else None."""
    if not isinstance(across_processes, bool):
        raise TorchfimError(f"across_processes must be True or False, got {across_processes!r}")
    if not across_processes:
        return None
    place = process_group()
    if place is None:
        raise TorchfimError(
            "across_processes=True shares the computation between the processes of a torch.distributed run, but "
            "no process group is initialised; call torch.distributed.init_process_group first (torchrun does not), "
            "or pass across_processes=False"
        )
    return place


def collective_device(model_device: torch.device) -> torch.device:
    """Where the collectives' tensors live: for NCCL alone, the process's GPU (the model's), else the CPU."""
    backend = str(torch.distributed.get_backend())
    if "nccl" in backend and "gloo" not in backend:
        return model_device if model_device.type == "cuda" else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def generator_fingerprint(generator: torch.Generator) -> float:
    """A number that tells generator states apart (48 bits of a hash: exact in float64)."""
    state: Tensor = generator.get_state()
    return float(int(hashlib.sha1(state.cpu().numpy().tobytes()).hexdigest()[:12], 16))
