"""``FisherPenalty`` and ``FisherTraceMonitor`` on outputs ``(B, C, *positions)`` with ``class_dim=1``.

A segmentation model returns its logits with the classes in dim 1, as ``F.cross_entropy`` takes them.
Before, neither the penalty nor the monitor took ``class_dim`` (``torchfim.fisher`` did): they read the
last dim as the classes, and on the model below measured Tr(F) ≈ 83 where it is 114, silently. The
oracle is the same model with its outputs moved to ``(B, *positions, C)`` (a wrapper), whose penalty and
monitor are tested against their definitions elsewhere: with the same generator, the values and
gradients agree to rounding. Left unsaid (None), the classes are read last, and outputs with two or more
position dims, where torch's convention puts them in dim 1, are named once by a warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchfim
from torchfim import TorchfimError
from torchfim.train import FisherPenalty, FisherTraceMonitor


class Segmenter(nn.Module):
    """Per-pixel logits ``(B, 4, H, W)``."""

    def __init__(self) -> None:
        super().__init__()
        self.features, self.classify = nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(torch.tanh(self.features(x)))


class ClassesLast(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x).movedim(1, -1)


def _setting() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Segmenter().double()
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64)
    y = torch.randint(0, 4, (5, 4, 6))
    mask = torch.rand(5, 4, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    return model, ClassesLast(model), x, y, mask


@pytest.mark.parametrize("shared", [False, True], ids=["call", "penalised_loss"])
@pytest.mark.parametrize("grad_method", ["exact", "finite_difference"])
@pytest.mark.parametrize("kind", ["batch_gradient", "trace"])
def test_penalty_with_classes_in_dim_1_is_the_classes_last_twins(kind: str, grad_method: str, shared: bool) -> None:
    model, twin, x, y, mask = _setting()
    terms = []
    for net, class_dim, task in ((model, 1, lambda out: F.cross_entropy(out, y)),
                                 (twin, -1, lambda out: F.cross_entropy(out.movedim(-1, 1), y))):
        pen = FisherPenalty(net, alpha=0.7, kind=kind, grad_method=grad_method, class_dim=class_dim,
                            generator=torch.Generator().manual_seed(2))
        term = pen.penalised_loss(x, task, step=0, mask=mask) if shared else pen(x, step=0, mask=mask)
        terms.append((term, torch.autograd.grad(term, list(model.parameters()))))
    (value, grads), (want_value, want_grads) = terms
    torch.testing.assert_close(value, want_value, rtol=1e-12, atol=0)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("subset", [None, 3])
def test_monitor_with_classes_in_dim_1_is_the_classes_last_twins(subset: int | None) -> None:
    model, twin, x, _, _ = _setting()
    records = []
    for net, class_dim in ((model, 1), (twin, -1)):
        mon = FisherTraceMonitor(net, x, n_samples=3, subset=subset, class_dim=class_dim,
                                 generator=torch.Generator().manual_seed(4))
        records.append([mon.measure(s) for s in range(2)])
    for got, want in zip(*records):
        assert got.trace == pytest.approx(want.trace, rel=1e-12) and got.stderr == pytest.approx(want.stderr, rel=1e-9)


def test_monitor_expectation_is_the_exact_trace_with_classes_in_dim_1() -> None:
    """Many labels: the monitor's estimate lies within 4 of its standard errors of the exact Tr(F)."""
    model, _, x, _, _ = _setting()
    exact = float(torchfim.fisher(model, x, structure="trace", class_dim=1))
    record = FisherTraceMonitor(model, x, n_samples=400, class_dim=1).measure(0)
    assert abs(record.trace - exact) < 4 * record.stderr


REFUSED = {
    "penalty": lambda m: FisherPenalty(m, class_dim=2),
    "monitor": lambda m: FisherTraceMonitor(m, torch.randn(2, 3, 4, 4), class_dim=0),
}


@pytest.mark.parametrize("make", list(REFUSED.values()), ids=list(REFUSED))
def test_other_class_dims_are_refused(make) -> None:
    with pytest.raises(TorchfimError, match="class_dim must be -1"):
        make(Segmenter())


CALLS = {
    "fisher": lambda model, x, **kw: torchfim.fisher(model, x, **kw),
    "fisher_variance": lambda model, x, **kw: torchfim.fisher_variance(model, x, **kw),
    "penalty": lambda model, x, **kw: FisherPenalty(model, **kw)(x, step=0),
    "monitor": lambda model, x, **kw: FisherTraceMonitor(model, x, **kw).measure(0),
}


def _said(call, model, x, **kw) -> list[str]:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call(model, x, **kw)
    return [str(w.message) for w in record if "read with the classes last" in str(w.message)]


@pytest.mark.parametrize("name", list(CALLS))
def test_outputs_with_two_position_dims_and_no_class_dim_are_named_once(name: str) -> None:
    """``(B, 4, 4, 6)`` without ``class_dim``: read as 6 classes at 4×4 positions, with one warning naming
    ``class_dim=1`` and ``class_dim=-1``; either said, no warning."""
    model, twin, x, _, _ = _setting()
    said = _said(CALLS[name], model, x)
    assert len(said) == 1
    assert "(batch, 4, 4, 6)" in said[0] and "6 classes at 4×4 positions" in said[0]
    assert "class_dim=1" in said[0] and "class_dim=-1" in said[0]
    for class_dim in (-1, 1):
        assert _said(CALLS[name], model, x, class_dim=class_dim) == []
    assert len(_said(CALLS[name], twin, x)) == 1  # classes last too: not said, so named


def test_a_language_model_is_not_named() -> None:
    """``(batch, tokens, vocabulary)``: one position dim, read with the classes last without a word."""
    from cases import BY_NAME

    case = BY_NAME["tokens"]
    model, x = case.build(3), case.inputs(4)
    for call in CALLS.values():
        assert _said(call, model, x) == []


@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("family", ["gaussian", "poisson"])
def test_families_without_classes_are_not_told_of_a_class_dim(name: str, family: str) -> None:
    """Outputs (B, 4, 4, 6) of a Gaussian or Poisson model have no classes to misplace. Before: the warning
    named "6 classes at 4×4 positions … a segmentation model's logits" for them too."""
    model, _, x, _, _ = _setting()
    assert _said(CALLS[name], model, x, family=family) == []
    assert len(_said(CALLS[name], model, x, family="categorical")) == 1


class ConvTagger(nn.Module):
    """A Conv1d tagger: logits ``(B, 3, T)`` with the classes in dim 1, as ``F.cross_entropy`` takes them."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Conv1d(2, 5, 3, padding=1), nn.Conv1d(5, 3, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(x)))


@pytest.mark.parametrize("name", list(CALLS))
def test_a_convolutions_outputs_with_one_position_dim_are_named_once(name: str) -> None:
    """A Conv1d tagger's ``(B, 3, 6)`` without ``class_dim`` is read as 6 classes at 3 positions: its Tr(F) was
    13.96 where the tagger's is 23.57 (a downstream-uses trial), without a word. One warning now names
    ``class_dim=1``; said either way, or for a family without classes, none."""
    torch.manual_seed(0)
    model, x = ConvTagger(), torch.randn(4, 2, 6)
    said = _said(CALLS[name], model, x)
    assert len(said) == 1 and "A convolution's outputs (batch, C, T)" in said[0]
    assert "6 classes at 3 positions" in said[0] and "class_dim=1" in said[0]
    for class_dim in (-1, 1):
        assert _said(CALLS[name], model, x, class_dim=class_dim) == []
    assert _said(CALLS[name], model, x, family="gaussian") == []
    one_channel = nn.Conv1d(2, 1, 3, padding=1)  # (B, 1, T): one class is no class dim
    assert _said(CALLS[name], one_channel, x) == []


def test_a_convolutions_outputs_with_class_dim_1_are_its_transposed_outputs_fisher() -> None:
    """The reading the warning names is the right one: with ``class_dim=1`` the tagger's Fisher is that of the
    same network returning ``(B, T, 3)``, read with the classes last."""
    torch.manual_seed(0)
    model, x = ConvTagger().double(), torch.randn(4, 2, 6, dtype=torch.float64)

    class Transposed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            return self.inner(inputs).transpose(1, 2)

    got = torchfim.fisher(model, x, structure="full", class_dim=1)
    want = torchfim.fisher(Transposed(), x, structure="full")
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-14)
    with pytest.warns(RuntimeWarning, match="A convolution's outputs"):
        misread = torchfim.fisher(model, x, structure="trace")
    assert abs(float(misread) - float(got.trace())) > 0.1 * float(got.trace())
