"""Whether torch's batched backward of several output vectors gives the numbers of one backward per vector.

The engine pulls the ``m`` output vectors of a mini-batch back through one recorded forward in one batched backward
(``torch.autograd.grad(..., is_grads_batched=True)``, :mod:`.pullback`), which runs each operation's batching rule.
A rule that gives wrong numbers (``torch.cdist``'s backward in torch 2.13: 146% off against a loop, in a review)
made every Fisher of such a model wrong, silently: the coverage check pulled back one vector alone, which no batching
rule touches. :func:`pulls_back_alike` compares the two on the check's few inputs, for two random vectors; where they
differ, the model's vectors go back one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .modules import Call
from .pullback import pull_back

#: The warning where the batched backward is wrong: vectors one at a time from then on.
ONE_BY_ONE = ("torchfim: torch's batched backward of several output vectors gives other numbers than one backward per "
              "vector through this model (an operation's batching rule of this torch build, as torch.cdist's in torch "
              "2.13); the vectors are pulled back one at a time, which is correct but slower")


def pulls_back_alike(output: Tensor, calls: Sequence[Call], v: Tensor) -> bool:
    """Whether ``v`` (B, m ≥ 2, outputs) pulled back to the calls' taps in one batched backward equals one backward per
    vector, to 1e-4 relative (the two sum in other orders) and the dtype's rounding; True where nothing is reached."""
    batched = pull_back(output, calls, v)
    alone = pull_back(output, calls, v, one_by_one=True)
    return all(batched_agrees(got, want) for gs, ws in zip(batched, alone) for got, want in zip(gs, ws)
               if got is not None and want is not None)


def batched_agrees(got: Tensor, want: Tensor, computed_in: torch.dtype | None = None) -> bool:
    """Whether a batched computation's ``got`` is the one-at-a-time ``want``: to 1e-4 relative (the two sum in other
    orders) or the rounding of ``want``'s dtype, or of ``computed_in`` where coarser (the least precise dtype the
    computation ran in: a bfloat16 layer before a float32 one rounds the latter's gradients to bfloat16's precision),
    against the largest entry of ``want``."""
    eps = max(torch.finfo(d).eps for d in (want.dtype, computed_in or want.dtype)) if want.is_floating_point() else 0.0
    rtol = max(1e-4, 64 * eps) if want.is_floating_point() else 0.0
    return got.shape == want.shape and torch.allclose(got, want, rtol=rtol,
                                                      atol=rtol * (1e-30 + float(want.abs().max())))
