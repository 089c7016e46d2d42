"""What the installed torch can do, for the tests whose subject an older torch lacks (the package takes torch >= 2.3;
CI runs the newest), asked of torch itself."""

from __future__ import annotations

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
