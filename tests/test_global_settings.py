"""torchfim under global torch settings a user may have switched on around the calls.

Autocast around a float64 model: torch's autocast never casts a float64 tensor (only float32, float16 and
bfloat16 ones are eligible), so a float64 model computes in float64 inside ``torch.autocast("cpu",
dtype=torch.bfloat16)``. Before, the finite-difference penalty took its step ε for bfloat16 all the same and
warned that it "computes in bfloat16": its gradient was 2-8 % off the exact one (2e-8 outside autocast) on an
MLP, a CNN and a transformer encoder. Oracle: the penalty's definition differentiated twice in float64
(``test_train_penalty.brute_penalty``) on the labels the penalty drew.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import cnn_inputs, mlp_inputs, strided_cnn, tanh_mlp
from test_train_penalty import SEED, brute_penalty, labels, penalty_grad
from test_train_penalty_fd import fd_penalty, rel_error


@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
@pytest.mark.parametrize("build", [(tanh_mlp, mlp_inputs), (strided_cnn, cnn_inputs)], ids=["mlp", "cnn"])
def test_fd_penalty_of_a_float64_model_under_autocast_keeps_float64_accuracy(build, kind: str) -> None:
    model, x = build[0](3, seed=31), build[1](9, seed=32)
    with warnings.catch_warnings(record=True) as seen, torch.autocast("cpu", dtype=torch.bfloat16):
        warnings.simplefilter("always")
        term = fd_penalty(model, "categorical", kind)(x, step=0)
    y = labels(model, x, "categorical", torch.Generator().manual_seed(SEED))
    value, grads = brute_penalty(model, x, y, "categorical", 0.37, kind)
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    assert rel_error(penalty_grad(term, model), grads) < 1e-5  # measured 2e-8; 2-3e-2 with the bfloat16 step
    assert not [w for w in seen if "bfloat16" in str(w.message)]
