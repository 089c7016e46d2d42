"""``torchfim.train.penalty_schedule``: which call of FisherPenalty computes, reuses or adds 0, against brute force.

A kept gradient that the model outgrew (a layer replaced, a parameter frozen or unfrozen since the computed step) is
not reused: the penalty is computed afresh at that step, with a warning, and its gradient is the brute-force penalty
gradient of the model as it now is (before, the kept gradient went to the replaced layer's orphaned tensors, and an
unfrozen layer got none). Step numbers that keep missing the multiples of ``every`` are named once.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import mlp_inputs, tanh_mlp
from test_train_penalty import SEED, assert_close_list, brute_penalty, labels
from torch import nn

from torchfim.train import FisherPenalty


def _replace_head(model: nn.Module) -> None:
    torch.manual_seed(7)
    model[-1] = nn.Linear(model[-1].in_features, model[-1].out_features).double()


def _unfreeze_first(model: nn.Module) -> None:
    model[0].weight.requires_grad_(True)


@pytest.mark.parametrize("change", [_replace_head, _unfreeze_first], ids=["replaced", "unfrozen"])
def test_a_kept_gradient_the_model_outgrew_is_computed_afresh(change) -> None:
    """Computed at step 0 (the first layer's weight frozen there, for the unfrozen case), the model changed, then
    the call at step 1: value and gradient of the penalty of the changed model, with the labels step 1 draws."""
    model, x = tanh_mlp(3, seed=41), mlp_inputs(8, seed=42)
    if change is _unfreeze_first:
        model[0].weight.requires_grad_(False)
    pen = FisherPenalty(model, alpha=0.37, every=3, generator=torch.Generator().manual_seed(SEED))
    pen(x, step=0).backward()
    change(model)
    generator = torch.Generator().manual_seed(SEED)
    generator.set_state(pen.generator.get_state())  # the draw step 1 makes when it computes
    with pytest.warns(RuntimeWarning, match=r"kept gradient \(from step 0\) is of parameters the model no longer "
                                             r"trains as it did .* computed afresh at step 1"):
        term = pen(x, step=1)
    y = labels(model, x, "categorical", generator)
    value, grads = brute_penalty(model, x, y, "categorical", 0.37, "batch_gradient")
    torch.testing.assert_close(term.detach(), value, rtol=1e-10, atol=0)
    assert_close_list(list(torch.autograd.grad(term, [p for p in model.parameters() if p.requires_grad])), grads)


def test_a_kept_gradient_that_still_fits_is_reused_without_a_word() -> None:
    model, x = tanh_mlp(3, seed=41), mlp_inputs(8, seed=42)
    pen = FisherPenalty(model, alpha=0.37, every=3, generator=torch.Generator().manual_seed(SEED))
    kept = pen(x, step=0)
    params = [p for p in model.parameters() if p.requires_grad]
    want = torch.autograd.grad(kept, params)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = pen(x, step=1)
    assert_close_list(list(torch.autograd.grad(again, params)), list(want), rtol=0)


def test_step_numbers_that_miss_every_multiple_are_named_once() -> None:
    model, x = tanh_mlp(3, seed=41), mlp_inputs(8, seed=42)
    pen = FisherPenalty(model, alpha=0.37, every=2, generator=torch.Generator().manual_seed(SEED))
    with pytest.warns(RuntimeWarning, match=r"FisherPenalty\(every=2\) was called at 5 step numbers since the run "
                                             r"started, none a multiple of 2.*pass step= the optimiser's step counter"):
        for step in range(1, 11, 2):
            pen(x, step=step)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(11, 31, 2):
            pen(x, step=step)
    assert pen.last_value is None
