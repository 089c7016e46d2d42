"""A ``parametrize.cached()`` block that another thread opens while torchfim computes.

torch's cache of parametrized tensors is the process's, keyed by the user's module (a private copy's forward reads the
same entries). torchfim turned it off when its computation started; a training step in another thread that opened
``cached()`` meanwhile turned it back on for torchfim's forwards too, which then read the training step's weight
instead of the parameters they substituted (``backend="functional"``): a wrong Fisher, or "Trying to backward through
the graph a second time". Here the other thread's block opens at a fixed point of torchfim's computation.
"""

from __future__ import annotations

import threading

import torch
from torch import nn
from torch.nn.utils import parametrize

import torchfim


class _Soft(nn.Module):
    """``w + ½ tanh(w)``; in the thread ``pause_in``, its first call signals ``reached`` and waits for ``resume``."""

    def __init__(self) -> None:
        super().__init__()
        self.pause_in: int | None = None
        self.reached, self.resume = threading.Event(), threading.Event()

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() == self.pause_in and not self.reached.is_set():
            self.reached.set()
            self.resume.wait(5.0)
        return w + 0.5 * w.tanh()


def test_a_cached_block_opened_meanwhile_leaves_the_fisher_as_computed_alone() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    soft = _Soft()
    parametrize.register_parametrization(model[0], "weight", soft)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alone = torchfim.fisher(model, x, structure="diag", backend="functional")
    got: list[object] = []

    def measure() -> None:
        soft.pause_in = threading.get_ident()
        try:
            got.append(torchfim.fisher(model, x, structure="diag", backend="functional"))
        except RuntimeError as err:  # before: "Trying to backward through the graph a second time"
            got.append(err)

    other = threading.Thread(target=measure, daemon=True)
    other.start()
    assert soft.reached.wait(30)
    with parametrize.cached():  # a training step's block, opened while the Fisher is computed
        model(x).sum().backward()
        soft.resume.set()
        other.join(60)
    assert not other.is_alive(), "the Fisher's thread hung"
    assert isinstance(got[0], torch.Tensor), got[0]
    assert float((got[0] - alone).abs().max()) == 0.0
    assert not parametrize._cache_enabled and not parametrize._cache


def test_a_cached_block_ending_meanwhile_keeps_torchfims_tensors_out_of_the_next_block() -> None:
    """The training step's block was open when torchfim started and ends during one of torchfim's forwards, between
    torch's reading of the cache and its writing: torch's fresh dict then received a weight of torchfim's pass, and
    the next block read it (before: the parametrized weight's ``original`` got no gradient in that step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    soft = _Soft()
    parametrize.register_parametrization(model[0], "weight", soft)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    original = model[0].parametrizations.weight.original
    model(x).sum().backward()
    alone = original.grad.clone()
    original.grad = None
    done: list[object] = []

    def measure() -> None:
        soft.pause_in = threading.get_ident()
        done.append(torchfim.fisher(model, x, structure="diag", backend="functional"))

    other = threading.Thread(target=measure, daemon=True)
    with parametrize.cached():  # the step's block, open when the Fisher starts
        other.start()
        assert soft.reached.wait(30)
    soft.resume.set()  # the block has ended between torch's read of the cache and its write
    other.join(60)
    assert not other.is_alive() and isinstance(done[0], torch.Tensor)
    with parametrize.cached():  # the next training step
        model(x).sum().backward()
    assert original.grad is not None, "the step read a weight of torchfim's pass from the cache"
    assert float((original.grad - alone).abs().max()) == 0.0
