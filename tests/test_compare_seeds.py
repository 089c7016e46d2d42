"""torchfim.compare's seeds (derive_seeds, seeds, torch_generator): the documented SeedSequence derivation, pinned
values, distinct and independent streams, and their errors; and the examples of every public docstring of
torchfim.compare.
"""

from __future__ import annotations

import doctest
import math

import numpy as np
import pytest
import torch

import torchfim.compare as compare
import torchfim.seed_plans as seed_plans
from torchfim.compare import SOURCES, SeedPlan, derive_seeds, seeds, torch_generator

# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------


def test_same_master_gives_same_seeds():
    assert derive_seeds(123) == derive_seeds(123)
    assert derive_seeds(123) == SeedPlan.from_master(123)
    assert seeds(8, 5) == seeds(8, 5)


def test_derivation_is_the_documented_seedsequence_spawn():
    for master in (0, 1, 2**40 + 7):
        children = np.random.SeedSequence(master).spawn(len(SOURCES))
        expected = {
            s: int(c.generate_state(1, dtype=np.uint32)[0]) for s, c in zip(SOURCES, children)
        }
        assert derive_seeds(master).as_dict() == expected
        assert derive_seeds(master).master_seed == master


def test_seed_values_are_pinned():
    # Recorded experiments depend on these: a change here silently changes every result.
    assert derive_seeds(0).as_dict() == {
        "init": 3757552657,
        "data_order": 673228719,
        "data_split": 3241444873,
        "label_noise": 3685993406,
        "sampling": 1216546553,
    }
    assert seeds(3, 0) == [1997553463, 2226472780, 1935872065]


def test_different_sources_get_different_seeds():
    for master in range(200):
        values = list(derive_seeds(master).as_dict().values())
        assert len(set(values)) == len(SOURCES)


def test_different_masters_get_different_seeds():
    plans = [derive_seeds(m) for m in range(200)]
    for source in SOURCES:
        assert len({p.seed(source) for p in plans}) == 200
    everything = [v for p in plans for v in p.as_dict().values()]
    assert len(set(everything)) == len(everything)


def test_seeds_lists_distinct_reproducible_master_seeds():
    s = seeds(50, master_seed=7)
    assert len(s) == 50 and len(set(s)) == 50
    assert all(isinstance(x, int) and 0 <= x < 2**32 for x in s)
    assert seeds(20, master_seed=7) == s[:20]  # a longer study extends a shorter one
    assert set(seeds(50, master_seed=8)).isdisjoint(s)
    assert seeds(0, 7) == []
    # Kept apart from the per-source seeds derived from the same number.
    assert set(seeds(5, 7)).isdisjoint(derive_seeds(7).as_dict().values())


def test_source_streams_look_independent():
    plan = derive_seeds(11)
    draws = {
        s: torch.randn(20000, generator=plan.generator(s), dtype=torch.float64) for s in SOURCES
    }
    for i, s in enumerate(SOURCES):
        for t in SOURCES[i + 1 :]:
            corr = torch.corrcoef(torch.stack([draws[s], draws[t]]))[0, 1].item()
            assert abs(corr) < 4 / math.sqrt(20000), (s, t, corr)


def test_seeds_fit_common_consumers():
    plan = derive_seeds(99)
    for value in plan.as_dict().values():
        assert 0 <= value < 2**32
        np.random.RandomState(value)  # the legacy numpy API wants < 2**32
        torch.Generator().manual_seed(value)


def test_torch_generator():
    g = torch_generator(5)
    assert isinstance(g, torch.Generator) and g.initial_seed() == 5
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=torch_generator(5)))
    five = torch.randn(4, generator=torch_generator(5))
    assert not torch.equal(five, torch.randn(4, generator=torch_generator(6)))
    plan = derive_seeds(1)
    assert plan.generator("label_noise").initial_seed() == plan.label_noise


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3", None])
def test_seed_errors(bad):
    with pytest.raises(ValueError, match="master_seed must be a non-negative integer"):
        derive_seeds(bad)
    with pytest.raises(ValueError, match="master_seed must be a non-negative integer"):
        seeds(3, bad)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        torch_generator(bad)


def test_seeds_count_and_source_errors():
    with pytest.raises(ValueError, match="n must be a non-negative integer"):
        seeds(-1)
    with pytest.raises(ValueError, match="unknown source of variation 'dropout'"):
        derive_seeds(0).seed("dropout")
    with pytest.raises(ValueError, match="unknown source of variation"):
        derive_seeds(0).generator("master_seed")


# ---------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------


def test_docstring_examples_run():
    attempted = 0
    for module in (compare, seed_plans):  # the seeds' functions live in their own module, re-exported by compare
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0
        attempted += result.attempted
    assert attempted >= 30


def test_every_public_object_has_an_example():
    for name in compare.__all__:
        obj = getattr(compare, name)
        if isinstance(obj, tuple):  # SOURCES, a constant
            continue
        assert obj.__doc__ and ">>>" in obj.__doc__, name


def test_seeds_given_as_zero_dim_integer_tensors_are_taken_as_their_value():
    # From a review: derive_seeds(torch.tensor(7)) was refused with "master_seed must be a non-negative integer".
    assert derive_seeds(torch.tensor(7)) == derive_seeds(7)
    assert seeds(torch.tensor(3), np.int64(1)) == seeds(3, 1)
    assert torch_generator(torch.tensor(5)).initial_seed() == 5
    for bad in (torch.tensor(5.0), torch.tensor(-1), torch.tensor([5]), torch.tensor(True)):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            torch_generator(bad)


def test_a_seed_torch_cannot_take_is_refused_naming_derive_seeds():
    # From a review: torch_generator(2**64) raised torch's bare "Overflow when unpacking long long"; a 128-bit
    # SeedSequence entropy is a master seed numpy recommends, which derive_seeds takes.
    assert torch_generator(2**64 - 1).initial_seed() == 2**64 - 1
    with pytest.raises(compare.TorchfimError, match=r"seed must be below 2\*\*64 .*derive_seeds"):
        torch_generator(2**64)
    entropy = 0x8C3C010CB4754C905776BDAC5EE7501  # a SeedSequence().entropy
    assert derive_seeds(entropy).generator("init").initial_seed() == derive_seeds(entropy).init


def test_a_count_of_seeds_beyond_memory_is_refused_naming_the_most_that_fit(monkeypatch):
    """``seeds(2**64)`` raised a bare OverflowError from SeedSequence.spawn and ``seeds(2**31)`` ran until memory was
    out; a count whose seeds do not fit (512 bytes each) is refused, naming the largest that does. Master seeds of any
    size stay valid (SeedSequence takes any non-negative entropy)."""
    for n in (2**63, 2**64, 10**30, 2**31):  # 2**31 last: before, it ran until memory was out
        with pytest.raises(compare.TorchfimError, match=r"n=\d+ seeds need about .* is available; pass n ≤ [\d,]+"):
            seeds(n)
    monkeypatch.setattr(seed_plans, "available_bytes", lambda device: 2**29)  # 512 MiB: 2**20 seeds
    with pytest.raises(compare.TorchfimError, match=r"n=1048577 seeds need about 512 MiB .* pass n ≤ 1,048,576"):
        seeds(2**20 + 1)
    assert seeds(3, 2**64) == [int(c.generate_state(1, dtype=np.uint32)[0])
                               for c in np.random.SeedSequence(2**64, spawn_key=(0x52554E53,)).spawn(3)]
