"""torchfim's collectives keep their tensors until the next one (``torchfim._processes.keep_until_next``).

On torch 2.2, gloo's worker thread could drop the last reference to a finished collective's tensor, which frees its
Python object under the GIL, while the main thread destroyed the process group (joining that thread, holding the
GIL): ``tests/test_monitor_processes.py`` hung at the end of a spawned process in two of three runs there, and in
none of five (and eighteen runs of its rank function alone) with the tensors held. The hang needs that race; these
tests check what prevents it: the tensors stay referenced after the call, until the next collective.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from processes import one_process_group
from torch import nn

import torchfim
from torchfim import _processes

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")


def _held() -> list[weakref.ref]:
    return [weakref.ref(t) for t in _processes._LAST_COLLECTIVE]


def test_a_gather_holds_its_tensors_until_the_next_collective() -> None:
    model = nn.Linear(2, 2)
    with one_process_group():
        assert _processes.gather_numbers([1.0, 2.0], model) == [[1.0, 2.0]]
        first = _held()
        assert [r().tolist() for r in first] == [[1.0, 2.0], [1.0, 2.0]]  # what it sent and what it received
        gc.collect()
        assert all(r() is not None for r in first)
        _processes.gather_numbers([3.0], model)
        gc.collect()
        assert all(r() is None for r in first)  # let go at the next


@pytest.mark.parametrize("structure", ["diag", "full"])
def test_a_fisher_across_processes_holds_one_number_of_its_sums(structure: str) -> None:
    """Its sums over the processes (``all_reduce``) are held too, the last until the next collective: the count of
    inputs, one number, not a copy of the result (a float64 copy of a full Fisher is twice its size in float32)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    x = torch.randn(5, 3)
    with one_process_group():
        _processes.gather_numbers([0.0], model)
        before = _held()
        shared, stderr = torchfim.fisher(model, x, structure=structure, estimator="score", n_samples=2,
                                         generator=torch.Generator().manual_seed(1), return_stderr=True,
                                         across_processes=True)
        gc.collect()
        held = _held()
        assert [r().numel() for r in held] == [1] and all(r() is None for r in before)
    alone, alone_stderr = torchfim.fisher(model, x, structure=structure, estimator="score", n_samples=2,
                                          generator=torch.Generator().manual_seed(1), return_stderr=True)
    assert shared.dtype == stderr.dtype == torch.float32
    assert torch.allclose(shared, alone, rtol=1e-6, atol=0) and torch.allclose(stderr, alone_stderr, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("structure", "dtype"), [("full", torch.float32), ("layers", torch.float64)])
def test_a_fisher_across_processes_is_combined_in_its_own_tensors(structure: str, dtype: torch.dtype,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The result is the tensor the processes summed into, scaled in place: float64 copies and their products held
    four copies of a full Fisher at once (a trial's over three processes: RSS grew 884 MiB for a 138 MiB result,
    against 220 MiB in one process; 201 MiB now). Its value is one process's, to rounding."""
    reduced = []
    all_reduce = torch.distributed.all_reduce
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda t, *args, **kwargs: (reduced.append(t.data_ptr()), all_reduce(t, *args, **kwargs))[1])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    x = torch.randn(5, 3, dtype=dtype)
    with one_process_group():
        shared = torchfim.fisher(model, x, structure=structure, across_processes=True)
    alone = torchfim.fisher(model, x, structure=structure)
    pairs = [(shared[k], alone[k]) for k in alone] if isinstance(alone, dict) else [(shared, alone)]
    assert all(s.data_ptr() in reduced and s.dtype == dtype for s, _ in pairs)
    assert all(torch.allclose(s, a, rtol=1e-6, atol=0) for s, a in pairs)
