"""What ``torchfim._settings_digest.function_settings`` compares of an ``output=``/``mask=`` function between processes
(each process computes it alone; a difference refuses the shared call): values chosen by rank that change what the
function computes differ; a device index or rank held under such a name, big containers and containers that hold
themselves are handled without a false refusal or a bare error."""

from __future__ import annotations

import time

import torch

from torchfim._settings_digest import function_settings


def _per_process(make):
    """The settings of the function ``make(rank)`` builds on process 0 and on process 1."""
    return function_settings(make(0)), function_settings(make(1))


def test_a_value_chosen_by_rank_that_changes_the_function_differs() -> None:
    def make(rank):
        pad = rank
        return lambda b: b != pad

    first, second = _per_process(make)
    assert first != second


def test_a_device_index_or_rank_held_under_its_name_is_each_processs_own() -> None:
    def by_index(rank):
        device_id = rank % 8
        return lambda b: (b != 0).to(device_id)

    def by_config(rank):
        cfg = {"pad_id": 0, "local_rank": rank}
        return lambda b: b != cfg["pad_id"]

    for make in (by_index, by_config):
        first, second = _per_process(make)
        assert first == second, make.__name__

    def other_pad(rank):
        cfg = {"pad_id": rank, "local_rank": rank}
        return lambda b: b != cfg["pad_id"]

    first, second = _per_process(other_pad)
    assert first != second


def test_big_and_self_holding_containers_cost_little_and_raise_nothing() -> None:
    vocab = {f"token{i}": i for i in range(200_000)}
    ids = list(range(1_000_000))
    cyclic: dict = {"pad_id": 0}
    cyclic["self"] = cyclic
    f = lambda b: (b != vocab["token0"]) & (b != ids[0]) & (b != cyclic["pad_id"])  # noqa: E731
    start = time.perf_counter()
    settings = function_settings(f)
    assert time.perf_counter() - start < 0.05  # a 1.09 s digest per call before, at every monitor measurement
    assert settings == function_settings(f)
    assert function_settings(lambda b: b != torch.tensor(0)) is not None


def test_whole_names_alone_are_each_processs_own_and_large_containers_are_sampled() -> None:
    """Names that merely contain 'rank' or 'device' (low_rank, temperature_device) are compared; a list of 300 class
    indices shifted by one, a set and a NumPy array chosen by rank differ (the review: all compared equal)."""
    import numpy as np

    def low_rank(rank):
        low_rank = 1.0 + rank
        return lambda o: o * low_rank

    def temperature_device(rank):
        temperature_device = 1.0 + rank
        return lambda o: o / temperature_device

    def shifted(rank):
        classes = list(range(rank, 300 + rank))
        return lambda b: b[..., classes]

    def as_set(rank):
        pads = {0, 1 + rank}
        return lambda b: b != min(pads)

    def as_array(rank):
        weights = np.arange(4.0) + rank
        return lambda o: o * float(weights[0])

    for make in (low_rank, temperature_device, shifted, as_set, as_array):
        first, second = _per_process(make)
        assert first != second, make.__name__
    def same_set(rank):
        pads = {"a", "b", "c"} if rank == 0 else {"c", "b", "a"}  # one set, whatever its order of iteration
        return lambda b: b in pads

    first, second = _per_process(same_set)
    assert first == second


def test_more_names_of_a_process_and_any_numpy_array() -> None:
    """device_idx, gpu_idx, cuda_device, my_rank, rank_in_group and accelerate's process_index are each process's own
    (fullmatch had lost them: a call alike everywhere was refused); a NumPy array torch cannot wrap (negative strides)
    is compared by its bytes, where it raised a bare ValueError (a default argument) or was skipped (a closure)."""
    import numpy as np

    for name in ("device_idx", "gpu_idx", "cuda_device", "my_rank", "rank_in_group", "process_index",
                 "local_process_index"):
        code = f"def make(rank):\n    {name} = rank\n    return lambda b: b.to({name})\n"
        namespace: dict = {}
        exec(code, namespace)
        first, second = _per_process(namespace["make"])
        assert first == second, name

    def flipped(rank):
        weights = (np.arange(4.0) + rank)[::-1]
        return lambda o, w=weights: o * float(w[0])

    first, second = _per_process(flipped)
    assert first != second
