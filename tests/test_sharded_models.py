"""Models whose parameters torch.distributed manages (FSDP2's ``fully_shard``, FSDP1's ``FullyShardedDataParallel``,
``replicate``; two processes, gloo, CPU): every entry point refuses them with one ``TorchfimError`` that names the fix,
and the fix works.

Before, ``fisher`` raised torch's "got mixed torch.Tensor and DTensor" from inside a forward, left the model
unsharded so that a second call ran on whatever that left, and the penalty failed in FSDP's own backward hook.
Oracle for the fix: the full state dict gathered from the shards, loaded into a model built without sharding, gives
the exact Fisher of the model before it was sharded, to the last bit.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from processes import over_loopback, run_processes
from torch import nn

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
WORLD = 2


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _refusal(call) -> str:
    try:
        call()
    except torchfim.TorchfimError as err:
        return str(err)
    return "no error"


def _rank(rank: int, root: str) -> None:
    over_loopback()
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    model, shard = _net(), _fully_shard()
    if shard is None:  # torch 2.2: FSDP1 alone
        model, refusals = FullyShardedDataParallel(model, device_id=torch.device("cpu")), {}
    else:
        refusals = _fsdp2(model, x, shard)
    refusals.update(_flat_parameters(x))
    refusals.update(_original_parameters(x))
    refusals.update(_replicated(x))
    whole = _net()  # the fix the message names: the full state dict, in a model built without sharding
    whole.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
    torch.save({"refusals": refusals, "fixed": torchfim.fisher(whole, x, structure="diag")}, f"{root}/out.{rank}")
    torch.distributed.destroy_process_group()


def _fully_shard() -> Callable[[nn.Module], object] | None:
    """FSDP2's ``fully_shard``: in ``torch.distributed.fsdp`` from torch 2.6, before in ``_composable.fsdp``; None in
    torch 2.2, which has no FSDP2."""
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        try:
            from torch.distributed._composable.fsdp import fully_shard
        except ImportError:
            return None
    return fully_shard


def _fsdp2(model: nn.Module, x: torch.Tensor, fully_shard: Callable[[nn.Module], object]) -> dict[str, str]:
    """FSDP2: the model sharded layer by layer, then whole; penalties built before the sharding too."""
    built_before, other = FisherPenalty(model), FisherPenalty(_net())
    fully_shard(model[0])
    fully_shard(model)
    return {
        "fisher": _refusal(lambda: torchfim.fisher(model, x, structure="diag")),
        "again": _refusal(lambda: torchfim.fisher(model, x, structure="trace")),
        "variance": _refusal(lambda: torchfim.fisher_variance(model, x, structure="trace")),
        "monitor": _refusal(lambda: FisherTraceMonitor(model, x, every=1).step(0)),
        "penalty": _refusal(lambda: FisherPenalty(model)),
        "model=": _refusal(lambda: other.penalised_loss(x, lambda out: out.sum(), step=0, model=model)),
        "built before, called": _refusal(lambda: built_before(x, step=0)),
        "built before, penalised_loss": _refusal(lambda: built_before.penalised_loss(x, lambda out: out.sum(), step=0)),
    }


def _flat_parameters(x: torch.Tensor) -> dict[str, str]:
    """FSDP1: layers wrapped one by one, then the whole; the inner model holds flat parameters (and before, fisher on it
    crashed the process)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    inner = _net()
    built_before = FisherPenalty(inner)
    for i in (0, 2):
        inner[i] = FullyShardedDataParallel(inner[i], device_id=torch.device("cpu"))
    root = FullyShardedDataParallel(inner, device_id=torch.device("cpu"))
    return {"FSDP1 fisher(inner)": _refusal(lambda: torchfim.fisher(inner, x, structure="trace")),
            "FSDP1 fisher(root)": _refusal(lambda: torchfim.fisher(root, x, structure="trace")),
            "FSDP1 penalty(inner)": _refusal(lambda: FisherPenalty(inner)),
            "FSDP1 built before, called": _refusal(lambda: built_before(x, step=0))}


def _original_parameters(x: torch.Tensor) -> dict[str, str]:
    """FSDP1 with ``use_orig_params=True`` (accelerate's default): plain parameters that view the flat shards (before,
    the penalty built before the wrapping returned 0 without an error, and fisher raised inside torch)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    inner = _net()
    built_before = FisherPenalty(inner)
    FullyShardedDataParallel(inner, device_id=torch.device("cpu"), use_orig_params=True)
    return {"FSDP1 original fisher(inner)": _refusal(lambda: torchfim.fisher(inner, x, structure="trace")),
            "FSDP1 original built before, called": _refusal(lambda: built_before(x, step=0))}


def _replicated(x: torch.Tensor) -> dict[str, str]:
    """``replicate``: every process holds the parameters whole, as DTensors (the message must not say sharded only).
    A torch without it (< 2.6) has nothing to check here."""
    try:
        from torch.distributed._composable.replicate_with_fsdp import replicate
    except ImportError:
        return {}

    model = _net()
    replicate(model)
    return {"replicate fisher": _refusal(lambda: torchfim.fisher(model, x, structure="trace"))}


def test_sharded_parameters_are_refused_with_a_fix_that_works(tmp_path: Path) -> None:
    run_processes(_rank, (str(tmp_path),), WORLD)
    x = torch.randn(8, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    want = torchfim.fisher(_net(), x, structure="diag")
    for rank in range(WORLD):
        out = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        for where, message in out["refusals"].items():
            said = "FullyShardedDataParallel" if where.startswith("FSDP1") else "fully_shard or replicate"
            assert message.startswith(f"the model's parameters are managed by torch.distributed's {said}"), where
            assert "sharded over processes (whole in none of them) or distributed tensors" in message, where
            assert "get_model_state_dict" in message and "DistributedDataParallel" in message, where
        if _fully_shard() is not None:
            assert "the Fisher penalty differentiates" in out["refusals"]["penalty"]
        assert torch.equal(out["fixed"], want)
