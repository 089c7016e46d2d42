"""A causal LM's own shift done in ``output=`` (``out.logits[:, :-1]``, T − 1 positions) beside the batch's ``labels``
(T, -100 at the padding) that its loss reads.

The labels then fit no position of the outputs, so their -100s cannot be placed: ``torchfim.fisher`` and the monitor
say so, and count every position, but ``FisherPenalty`` counted every position, padding included, without a word. It
now warns as they do (once per penalty). The oracle: the penalty's value is the definition over every one of the
T − 1 positions (padding included), labels drawn as the penalty draws them, differentiated by autograd.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from hf_models import VOCAB, labelled_batch, tiny_gpt2
from oracles import penalty_definition

from torchfim.families import Categorical
from torchfim.train import FisherPenalty

transformers = clients.need("transformers")
ALPHA = 0.3


def _shifted(out: object) -> torch.Tensor:
    return out.logits[:, :-1]


def _definition(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """``α‖∇_θ (1/B) Σᵢ Σₜ −log p(ŷᵢₜ|xᵢ)‖²`` over all T − 1 positions: the value."""
    params = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        logits = _shifted(model(**batch))
    n, t = logits.shape[:2]
    y = Categorical().sample(logits.reshape(-1, VOCAB), 1, torch.Generator().manual_seed(5)).reshape(n, t)

    def log_p(rows: slice) -> torch.Tensor:
        lp = torch.log_softmax(_shifted(model(**{k: v[rows] for k, v in batch.items()})), -1)
        return lp.gather(-1, y[rows, :, None]).sum()

    return penalty_definition(log_p, params, n, "batch_gradient", ALPHA)[0]


@pytest.mark.parametrize("how", ["call", "penalised_loss"])
def test_labels_that_do_not_fit_the_outputs_are_named_not_silently_dropped(how: str) -> None:
    model, batch = tiny_gpt2(), labelled_batch([5, 3, 4], seed=1)
    pen = FisherPenalty(model, alpha=ALPHA, output=_shifted, generator=torch.Generator().manual_seed(5))
    with pytest.warns(RuntimeWarning, match=r"targets of shape \(3, 5\) do not fit outputs \(3, 4, 50\).*-100s are "
                                            r"not read and every position counts"):
        if how == "call":
            pen(batch, step=0)
        else:
            pen.penalised_loss(batch, lambda out: out.loss, step=0)
    assert torch.allclose(pen.last_value, _definition(model, batch), rtol=1e-10, atol=0)
