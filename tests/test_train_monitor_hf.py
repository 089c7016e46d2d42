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
from hf_models import VOCAB, concat, padded_batch, tiny_gpt2, tiny_t5

import torchfim
from torchfim import TorchfimError
from torchfim.engine import Batch
from torchfim.train import FisherTraceMonitor
from torchfim.train.held import hold, pooled, pooled_groups, window_batches

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
    with pytest.warns(RuntimeWarning, match=r"attention_mask marks 6 padding positions, counted as observed since"):
        everywhere = FisherTraceMonitor(model, held, n_samples=32, output=_logits,
                                        generator=torch.Generator().manual_seed(3)).measure(0)
    assert everywhere.trace > 1.2 * rec.trace  # the padded positions count without the mask


@pytest.mark.filterwarnings("ignore:torchfim. torch.func cannot batch module:RuntimeWarning")  # T5's attention loops
def test_t5_is_called_as_fisher_calls_it() -> None:
    """T5 with labels (its decoder inputs made from them), called as :func:`torchfim.fisher` calls it: with
    ``use_cache=False``. Before, the monitor left the model's default cache on, and the generic rule's rerun of the
    decoder's self-attention one sample at a time met the cache of the whole batch ("Sizes of tensors must match")."""
    model, g = tiny_t5(), torch.Generator().manual_seed(5)
    ids = torch.randint(2, VOCAB, (4, 5), generator=g)
    held = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(2, VOCAB, (4, 3), generator=g)}
    rec = FisherTraceMonitor(model, held, n_samples=64, generator=torch.Generator().manual_seed(3)).measure(0)
    same = float(torchfim.fisher(model, held, estimator="score", structure="trace", n_samples=64,
                                 generator=torch.Generator().manual_seed(3)))
    exact = float(torchfim.fisher(model, held, structure="trace"))
    assert rec.n_inputs == 4 and abs(rec.trace - same) <= 1e-10 * same
    assert abs(rec.trace - exact) < 4 * rec.stderr and rec.stderr < 0.5 * exact, (rec, exact)


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


def _trimmed(batch: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """The mini-batch padded to ``length`` positions only, as a collator pads each mini-batch to its longest."""
    return {k: v[:, :length] for k, v in batch.items()}


def test_subset_windows_of_mini_batches_padded_to_other_lengths_measure_the_rows_they_draw() -> None:
    """Held mini-batches of 5, 3 and 5 positions (before: refused, "one input shape"): the pool joins those of one
    length, in the order the lengths first come (rows 0-3 and 4-7: the two of 5 positions; 8-11: the one of 3), and
    a window is measured as one sub-batch per length, in that order, as :func:`torchfim.fisher` measures them."""
    model = tiny_gpt2()
    held = [_trimmed(padded_batch([5, 3, 4, 2], seed=1), 5), _trimmed(padded_batch([2, 3, 1, 3], seed=2), 3),
            _trimmed(padded_batch([4, 5, 1, 2], seed=3), 5)]
    pool = [concat([held[0], held[2]]), held[1]]
    for seed in (4, 5):
        rec = FisherTraceMonitor(model, held, subset=5, output=_logits, mask="attention_mask",
                                 generator=torch.Generator().manual_seed(seed)).measure(0)
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randperm(12, generator=gen)[:5]  # the monitor's generator drew the permutation first
        total = 0.0
        for (start, stop), group in zip(((0, 8), (8, 12)), pool):
            mine = rows[(rows >= start) & (rows < stop)] - start
            if len(mine):
                window = {k: v[mine] for k, v in group.items()}
                total += len(mine) * float(torchfim.fisher(model, window, estimator="score", structure="trace",
                                                           output=_logits, mask="attention_mask", generator=gen))
        assert rec.n_inputs == 5 and abs(rec.trace - total / 5) <= 1e-10 * rec.trace


def test_a_windows_sub_batches_come_back_in_the_windows_order() -> None:
    """Rows numbered through the pool, split by signature, and the order that puts them back."""
    sizes, lengths = (3, 4, 2, 5), (2, 3, 2, 4)
    held, start = [], 0
    for size, length in zip(sizes, lengths):
        held.append({"input_ids": torch.arange(start, start + size).unsqueeze(1).repeat(1, length)})
        start += size
    pool = pooled_groups(hold(held))
    assert [b.size for b in pool] == [5, 4, 5]  # lengths 2 (3 + 2 rows), 3, 4
    numbered = torch.cat([b.kwargs["input_ids"][:, 0] for b in pool])  # the pool's row r holds its global id
    for rows in (torch.tensor([13, 0, 6, 4, 9, 2]), torch.tensor([7]), torch.randperm(14)):
        parts, order = window_batches(pool, rows)
        got = torch.cat([b.kwargs["input_ids"][:, 0] for b in parts])
        assert torch.equal(got if order is None else got[order], numbered[rows])


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
    with pytest.raises(TorchfimError, match="subset= could not join the held mini-batches into one pool"):
        pooled(hold([a, {**b, "position_ids": shared + 1}]))


def test_bad_output_and_mask_arguments_are_refused() -> None:
    model, held = tiny_gpt2(), _held()
    with pytest.raises(TorchfimError, match="output must be a function"):
        FisherTraceMonitor(model, held, output="logits")
    with pytest.raises(TorchfimError, match="a tensor would not follow the subset windows"):
        FisherTraceMonitor(model, held, output=_logits, mask=concat(held)["attention_mask"])
    with pytest.raises(TorchfimError, match="must be a torch.Tensor or a dict of tensors, got str"):
        FisherTraceMonitor(model, ["not a batch"], output=_logits)
