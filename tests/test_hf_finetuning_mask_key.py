"""``mask="attention_mask"`` on a Hugging Face model's inputs where the key is not there.

transformers' causal LMs get ``use_cache=False`` from torchfim as a default keyword input, and the refusal listed it as
one of the mini-batch's keys: a batch of token ids as one tensor was "a dict mini-batch whose keys are
['use_cache']", and a dict's keys gained one the caller never gave. The keys named are now the batch's tensors, and
one tensor is said to be one tensor, for the penalty, the monitor and ``fisher`` alike.
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
from hf_models import labelled_batch, tiny_gpt2

import torchfim
from torchfim.train import FisherPenalty, FisherTraceMonitor

transformers = clients.need("transformers")

CALLS = {
    "fisher": lambda model, inputs, mask: torchfim.fisher(model, inputs, structure="trace", mask=mask),
    "monitor": lambda model, inputs, mask: FisherTraceMonitor(model, inputs, every=1, mask=mask).step(0),
    "penalty": lambda model, inputs, mask: FisherPenalty(model)(inputs, step=0, mask=mask),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_token_ids_as_one_tensor_are_not_called_a_dict_of_use_cache(call: str) -> None:
    model, batch = tiny_gpt2(), labelled_batch([5, 3], seed=0)
    with pytest.raises(torchfim.TorchfimError, match=r"names a key of the dict mini-batch, but there is none: the "
                                                     r"inputs are one tensor; pass the mask itself") as caught:
        CALLS[call](model, batch["input_ids"], "attention_mask")
    assert "use_cache" not in str(caught.value)


@pytest.mark.parametrize("call", list(CALLS))
def test_a_dicts_keys_are_its_own(call: str) -> None:
    model, batch = tiny_gpt2(), labelled_batch([5, 3], seed=0)
    # fisher and the monitor take the labels out of the forward's inputs, the penalty passes them on
    with pytest.raises(torchfim.TorchfimError, match=r"whose keys are \['attention_mask', 'input_ids', ('labels', )?"
                                                     r"'position_ids'\]; pass the right key"):
        CALLS[call](model, [batch] if call != "penalty" else batch, "attn_mask")
