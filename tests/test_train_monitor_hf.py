"""FisherTraceMonitor on a Hugging Face language model: dict held inputs, ``output=`` and a padding ``mask``.

The oracle is the definition from ``torch.func`` Jacobians of the flattened logits
(:func:`clients.jacobians`): ``Tr(F) = (1/n) Σ_b Σ_{t unmasked} tr(J_btᵀ Λ(p_bt) J_bt)``. A record must
fall within 4 of its own standard errors of it, and be the score estimator of :func:`torchfim.fisher`
on the same labels (same seed, one draw per held mini-batch).
"""

from __future__ import annotations

import clients  # first: hides a torchvision build that cannot load
import pytest
import torch
from test_clients_transformers import VOCAB, concat, padded_batch, tiny_gpt2

import torchfim
from torchfim import TorchfimError
from torchfim.engine import Batch
from torchfim.train import FisherTraceMonitor
from torchfim.train.held import hold, pooled

clients.need("transformers")


def _logits(out: object) -> torch.Tensor:
    return out.logits


def _held() -> list[dict[str, torch.Tensor]]:
    return [padded_batch([5, 3, 4, 2], seed=1), padded_batch([1, 5, 4, 3], seed=2)]


def test_a_record_is_the_score_trace_and_agrees_with_the_jacobian_oracle() -> None:
    model, held = tiny_gpt2(), _held()
    jac, logits = clients.jacobians(model, kwargs=concat(held), output="logits")
    exact = float(clients.categorical_diag(jac, logits, VOCAB, concat(held)["attention_mask"]).sum())
    mon = FisherTraceMonitor(model, held, n_samples=32, output=_logits, mask="attention_mask",
                             generator=torch.Generator().manual_seed(3))
    rec = mon.measure(0)
    same = torchfim.fisher(model, held, estimator="score", structure="trace", n_samples=32, output=_logits,
                           mask="attention_mask", generator=torch.Generator().manual_seed(3))
    assert rec.n_inputs == 8 and abs(rec.trace - float(same)) <= 1e-10 * float(same)
    assert abs(rec.trace - exact) < 4 * rec.stderr and rec.stderr < 0.25 * exact, (rec, exact)
    everywhere = FisherTraceMonitor(model, held, n_samples=32, output=_logits,
                                    generator=torch.Generator().manual_seed(3)).measure(0)
    assert everywhere.trace > 1.2 * rec.trace  # the padded positions count without the mask


def test_subset_windows_of_dict_inputs_measure_the_rows_they_draw() -> None:
    """A window of a pooled dict batch is measured as :func:`torchfim.fisher` measures those rows."""
    model, held = tiny_gpt2(), _held()
    mon = FisherTraceMonitor(model, held, subset=3, output=_logits, mask="attention_mask",
                             generator=torch.Generator().manual_seed(4))
    rec = mon.measure(0)
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(4))[:3]  # the first window's rows
    window = {k: v[rows] for k, v in concat(held).items()}
    gen = torch.Generator().manual_seed(4)
    torch.randperm(8, generator=gen)  # the monitor's generator drew the permutation first
    want = torchfim.fisher(model, window, estimator="score", structure="trace", output=_logits,
                           mask="attention_mask", generator=gen)
    assert rec.n_inputs == 3 and abs(rec.trace - float(want)) <= 1e-10 * float(want)


def test_pooled_dict_batches_concatenate_per_sample_tensors_and_keep_shared_values() -> None:
    shared = torch.arange(5).unsqueeze(0)  # (1, T): one row for every sample, as position ids often are
    a = {"input_ids": torch.zeros(2, 5, dtype=torch.long), "position_ids": shared, "use_cache": False}
    b = {"input_ids": torch.ones(3, 5, dtype=torch.long), "position_ids": shared.clone(), "use_cache": False}
    pool = pooled(hold([a, b]))
    assert isinstance(pool, Batch) and pool.size == 5 and pool.kwargs["use_cache"] is False
    assert torch.equal(pool.kwargs["input_ids"][:, 0], torch.tensor([0, 0, 1, 1, 1]))
    assert torch.equal(pool.kwargs["position_ids"], shared)
    window = pool.rows(torch.tensor([4, 0]))
    assert torch.equal(window.kwargs["input_ids"][:, 0], torch.tensor([1, 0])) and window.size == 2
    with pytest.raises(TorchfimError, match="subset= needs held mini-batches of one input shape and the same keys"):
        pooled(hold([a, {**b, "position_ids": shared + 1}]))


def test_bad_output_and_mask_arguments_are_refused() -> None:
    model, held = tiny_gpt2(), _held()
    with pytest.raises(TorchfimError, match="output must be a function"):
        FisherTraceMonitor(model, held, output="logits")
    with pytest.raises(TorchfimError, match="a tensor would not follow the subset windows"):
        FisherTraceMonitor(model, held, output=_logits, mask=concat(held)["attention_mask"])
    with pytest.raises(TorchfimError, match="must be a torch.Tensor or a dict of tensors, got str"):
        FisherTraceMonitor(model, ["not a batch"], output=_logits)
