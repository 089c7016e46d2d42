"""What the installed torch can do, for the tests whose subject an older torch lacks (the package takes torch >= 2.2;
CI runs the newest), asked of torch itself."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import pytest
import torch


def _fused_adam_on_cpu() -> bool:
    try:
        torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
    except RuntimeError:  # torch < 2.4 fuses on accelerators only
        return False
    return True


#: Whether ``torch.optim.Adam(fused=True)`` takes CPU parameters.
FUSED_ADAM_ON_CPU = _fused_adam_on_cpu()

#: Whether autograd shows the shapes of a node's output (``_input_metadata``), by which a join along ``dim=1`` is known
#: to be along the last dim of the outputs.
NODE_SHAPES = hasattr(torch.cat([torch.ones(1, requires_grad=True)] * 2).grad_fn, "_input_metadata")

#: Whether the caller's saved-tensor hooks can be read back off autograd's stack (to set them aside and push them again).
SAVED_HOOKS_READABLE = hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks")

#: Whether torch has the user's switch for the attention fast path (``torch.backends.mha``, torch >= 2.3).
FAST_PATH_SWITCH = importlib.util.find_spec("torch.backends.mha") is not None

#: The installed torch's (major, minor), for what is known only by version.
TORCH_VERSION = tuple(int(v) for v in torch.__version__.split(".")[:2])


def skip_unless_the_model_runs(model: Callable[..., object], *inputs: object) -> None:
    """Skip the test where torch has no kernel for the model's own forward on these inputs (torch 2.2 runs neither
    ``LayerNorm`` nor average pooling in float16 on CPU): the model, not torchfim, cannot run there. Only on a torch
    older than 2.3: a newer one that lacks a kernel fails the test."""
    if TORCH_VERSION >= (2, 3):
        return
    try:
        with torch.no_grad():
            model(*inputs)
    except RuntimeError as err:
        if "not implemented for" not in str(err):
            raise
        pytest.skip(f"torch {torch.__version__} cannot run the model itself ({err})")


def optimiser_step_hooks_run() -> bool:
    """Whether an optimiser's ``step()`` runs its post-step hooks now: once torch 2.2's dynamo has compiled something,
    its patcher unwraps every optimiser's step from the wrapper that runs them (torchfim's parameter stamp then sees
    no optimiser step)."""
    p = torch.zeros(1, requires_grad=True)
    p.grad = torch.zeros(1)
    optimiser, ran = torch.optim.SGD([p], lr=0.1), []
    optimiser.register_step_post_hook(lambda *args: ran.append(True))
    optimiser.step()
    return bool(ran)
