"""Class labels beside the inputs are read by every estimator (their -100 leaves a position out), so labels of a
shape that does not fit the outputs are named: refused where they fit the outputs read with the classes in dim 1
(the outputs are likely misread), else warned of as not read.

A user trial ported a curvlinops tagger, ``(N, C, T)`` logits with ``(N, T)`` labels holding -100 padding, and left
out ``class_dim=1``: the exact Fisher read the outputs as C positions of T classes and dropped the labels, and the
padding with them, without a word (0.41 off curvlinops' GGN). The oracle is a float64 brute force
``(1/n) Σᵢ Σₜ Jᵢₜᵀ Λᵢₜ Jᵢₜ`` over the observed positions.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import torchfim
from torchfim import TorchfimError


class Tagger(nn.Module):
    """Token logits in ``F.cross_entropy``'s layout, ``(N, C, T)``."""

    def __init__(self, features: int = 3, classes: int = 4) -> None:
        super().__init__()
        self.linear = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).transpose(1, 2)


def _brute_force(model: nn.Module, x: torch.Tensor, observed: torch.Tensor) -> torch.Tensor:
    """``(1/n) Σᵢ Σₜ Jᵢₜᵀ (diag p − p pᵀ) Jᵢₜ`` over observed positions, dense."""
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    fisher = torch.zeros(total, total, dtype=torch.float64)
    for i in range(len(x)):
        def logits(flat: torch.Tensor, i: int = i) -> torch.Tensor:
            parts, start = {}, 0
            for name, p in params.items():
                parts[name] = flat[start:start + p.numel()].reshape(p.shape)
                start += p.numel()
            return torch.func.functional_call(model, parts, (x[i:i + 1],))[0].T  # (T, C)

        theta = torch.cat([p.detach().reshape(-1) for p in params.values()])
        jac = torch.autograd.functional.jacobian(logits, theta)  # (T, C, P)
        probs = logits(theta).softmax(-1)
        for t in range(x.shape[1]):
            if observed[i, t]:
                lam = torch.diag(probs[t]) - torch.outer(probs[t], probs[t])
                fisher += jac[t].T @ lam @ jac[t]
    return fisher / len(x)


def _data() -> tuple[Tagger, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = Tagger().double()
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (5, 6))
    y[:, 4:] = -100
    y[0, 2] = -100
    return model, x, y


@pytest.mark.parametrize("estimator", ["exact", "score", "hessian"])
def test_labels_of_classes_first_logits_without_class_dim_are_refused_with_the_fix(estimator: str) -> None:
    model, x, y = _data()
    with pytest.raises(TorchfimError, match=r"targets of shape \(5, 6\) do not fit outputs \(5, 4, 6\).*class_dim=1"):
        torchfim.fisher(model, [(x, y)], estimator=estimator, structure="diag")


def test_with_class_dim_the_labels_leave_their_padding_out() -> None:
    model, x, y = _data()
    expected = _brute_force(model, x, y != -100)
    got = torchfim.fisher(model, [(x, y)], structure="full", class_dim=1)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    unmasked = _brute_force(model, x, torch.ones_like(y, dtype=torch.bool))
    assert not torch.allclose(got, unmasked, rtol=1e-3)  # the padding counts: the labels were read


@pytest.mark.parametrize("shape", [(10, 2), (10, 3, 2)])
def test_labels_that_fit_no_reading_are_said_to_be_unread(shape: tuple[int, ...]) -> None:
    """A CTC transcript, labels at another resolution than the logits, outputs mapped to fewer positions: the
    exact Fisher does not need the labels, so it goes on without their -100s, and says so once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 4, shape)
    y.view(-1)[0] = -100
    with pytest.warns(RuntimeWarning, match=r"targets of shape .* do not fit outputs \(10, 4\) read as 4 classes "
                                            r"\(one label per input, \(10,\)\), so their -100s are not read"):
        got = torchfim.fisher(model, [(x, y)], structure="diag")
    assert torch.equal(got, torchfim.fisher(model, x, structure="diag"))


def test_a_ctc_shaped_dict_batch_goes_on_without_its_labels() -> None:
    """Frame logits (B, T, V) with transcript labels (B, L), -100-padded by the collator (a reviewer's case)."""

    class Frames(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(3, 5)

        def forward(self, input_values: torch.Tensor) -> torch.Tensor:
            return self.linear(input_values)

    torch.manual_seed(0)
    model = Frames().double()
    frames = torch.randn(2, 7, 3, dtype=torch.float64)
    labels = torch.tensor([[1, 2, 3, -100], [4, 1, -100, -100]])
    with pytest.warns(RuntimeWarning, match="a CTC transcript"):
        got = torchfim.fisher(model, {"input_values": frames, "labels": labels}, structure="trace")
    assert torch.equal(got, torchfim.fisher(model, {"input_values": frames}, structure="trace"))


def test_labels_of_one_column_are_read_as_one_per_input() -> None:
    """``(B, 1)`` labels, a tabular layout: their -100 leaves its input out, as ``(B,)`` labels' does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (10,))
    y[0] = -100
    assert torch.equal(torchfim.fisher(model, [(x, y.unsqueeze(1))], structure="diag"),
                       torchfim.fisher(model, [(x, y)], structure="diag"))
    assert not torch.equal(torchfim.fisher(model, [(x, y)], structure="diag"),
                           torchfim.fisher(model, x, structure="diag"))


def test_labels_of_any_position_shape_with_one_per_position_are_read() -> None:
    """``(N, T)`` and ``(N, T, 1)`` labels both mark the same positions (as the empirical estimator takes them)."""
    model, x, y = _data()
    flat = torchfim.fisher(model, [(x, y)], structure="diag", class_dim=1)
    trailing = torchfim.fisher(model, [(x, y.unsqueeze(-1))], structure="diag", class_dim=1)
    assert torch.equal(flat, trailing)


def test_float_labels_are_left_to_the_estimators_that_read_them() -> None:
    """One-hot float labels say nothing about positions: the exact Fisher does not read them (the empirical
    estimator refuses them, naming argmax)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    onehot = nn.functional.one_hot(torch.randint(0, 4, (10,)), 4).double()
    assert torch.equal(torchfim.fisher(model, [(x, onehot)], structure="diag"),
                       torchfim.fisher(model, x, structure="diag"))
    with pytest.raises(TorchfimError, match="argmax"):
        torchfim.fisher(model, [(x, onehot)], estimator="empirical", structure="diag")


def test_integer_one_hot_labels_are_not_said_to_be_unread() -> None:
    """Integer one-hot labels (``F.one_hot(y, C)``, a newcomer's trial) were warned of as "a CTC transcript, labels
    at another resolution" before the empirical estimator's clear refusal: now that refusal alone, and the exact
    Fisher as without them, as for float one-hot labels."""
    import warnings

    torch.manual_seed(0)
    model, x = nn.Linear(3, 4).double(), torch.randn(10, 3, dtype=torch.float64)
    onehot = nn.functional.one_hot(torch.randint(0, 4, (10,)), 4)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*every position counts")
        assert torch.equal(torchfim.fisher(model, [(x, onehot)], structure="diag"),
                           torchfim.fisher(model, x, structure="diag"))
        with pytest.raises(TorchfimError, match="argmax"):
            torchfim.fisher(model, [(x, onehot)], estimator="empirical", structure="diag")


@pytest.mark.parametrize("estimator", ["exact", "score", "hessian", "empirical"])
def test_labels_of_another_batch_size_are_refused_without_a_contradicting_warning(estimator: str) -> None:
    """Labels with 10 rows for 16 inputs fit no reading of the outputs: they are another batch's. Before, the
    estimators that read only their -100s warned that "every position counts" and went on (and the empirical one
    warned so beside its refusal, a downstream-uses trial saw)."""
    import warnings

    torch.manual_seed(0)
    model, x, y = nn.Linear(3, 4).double(), torch.randn(16, 3, dtype=torch.float64), torch.randint(0, 4, (10,))
    with warnings.catch_warnings(record=True) as record, pytest.raises(TorchfimError) as caught:
        warnings.simplefilter("always")
        torchfim.fisher(model, x, estimator=estimator, targets=y)
    assert "(10,)" in str(caught.value) and "16" in str(caught.value)
    assert not [w for w in record if "every position counts" in str(w.message)]


def test_labels_flattened_over_the_positions_are_told_how_to_go_back() -> None:
    """``labels.view(-1)`` of ``(N, T)`` labels, a porting slip: the refusal names the reshape."""
    model, x, y = _data()
    with pytest.raises(TorchfimError, match=r"labels flattened over the positions go back with labels.reshape\(5, 6\)"):
        torchfim.fisher(model, [(x, y.reshape(-1))], class_dim=1)
