"""RNN, GRU and LSTM on their own rule: per-sample products from the step-by-step recording.

Oracle: the dense float64 ``(1/n) Σᵢ Jᵢᵀ Λᵢ Jᵢ`` with each sample's Jacobian taken row by row by
autograd through the layers' own (fused) forward, and the empirical Fisher from per-sample scores.
Under torch.func the layers compute step by step (:func:`stepwise_recurrent`), which vmap batches and
forward-mode AD differentiates: the whole-model backend and the Hessian estimator work on them too.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from engine_checks import assert_equals_dense, assert_quietly_equals_dense_over, module_rules, torchfim_messages
from torch import nn

import torchfim
from torchfim.engine.modules.recurrent import RecurrentRule

KINDS = {"rnn_tanh": lambda **kw: nn.RNN(nonlinearity="tanh", **kw), "rnn_relu": lambda **kw: nn.RNN(nonlinearity="relu", **kw),
         "gru": nn.GRU, "lstm": nn.LSTM, "lstm_proj": lambda **kw: nn.LSTM(proj_size=3, **kw)}


class _Recurrent(nn.Module):
    """A recurrent layer whose output sequence (mean over steps) and final hidden state both reach the
    three logits; ``initial``: the initial states come from the input (per sample). ``lstm_proj``: an LSTM
    with ``proj_size``, whose hidden states are projected (a third map per layer and direction)."""

    def __init__(self, kind: str, batch_first: bool, bidirectional: bool, bias: bool, initial: bool) -> None:
        super().__init__()
        self.rnn = KINDS[kind](input_size=3, hidden_size=4, num_layers=2, batch_first=batch_first,
                               bidirectional=bidirectional, bias=bias)
        d, width = 2 if bidirectional else 1, getattr(self.rnn, "proj_size", 0) or 4
        self.start = nn.Linear(3, 2 * d * width) if initial else None
        self.cells = nn.Linear(3, 2 * d * 4) if initial and isinstance(self.rnn, nn.LSTM) else None
        self.head = nn.Linear(d * width + width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        seq = x if self.rnn.batch_first else x.transpose(0, 1)
        hx = None
        if self.start is not None:
            states = self.rnn.num_layers * (2 if self.rnn.bidirectional else 1)  # (layers·directions, B, ·)
            h0 = torch.tanh(self.start(x[:, 0])).reshape(x.shape[0], states, -1).transpose(0, 1).contiguous()
            hx = h0
            if self.cells is not None:  # an LSTM's cell states, (layers·directions, B, hidden)
                hx = (h0, self.cells(x[:, 0]).reshape(x.shape[0], states, 4).transpose(0, 1).contiguous())
        out, state = self.rnn(seq, hx)
        h_n = state[0] if isinstance(state, tuple) else state
        out = out if self.rnn.batch_first else out.transpose(0, 1)
        return self.head(torch.cat([out.mean(1), h_n[-1]], -1))


def _jacobians(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    jac, outs = [], []
    for i in range(len(x)):
        o = model(x[i : i + 1])[0]
        rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(o[c], params, retain_graph=True)]) for c in range(len(o))]
        jac.append(torch.stack(rows))
        outs.append(o.detach())
    return torch.stack(jac), torch.stack(outs)


def _oracle(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact Fisher and empirical Fisher (labels ``y``), dense."""
    jac, o = _jacobians(model, x)
    p = torch.softmax(o, -1)
    lam = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    exact = torch.einsum("ncp,ncd,ndq->pq", jac, lam, jac) / len(x)
    scores = torch.einsum("nc,ncp->np", nn.functional.one_hot(y, 3).double() - p, jac)
    return exact, scores.T @ scores / len(x)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize(("batch_first", "bidirectional", "bias", "initial"), [
    (True, False, True, False), (False, True, True, True), (True, True, False, True), (False, False, True, True)])
def test_recurrent_rule_equals_the_dense_oracle(kind: str, batch_first: bool, bidirectional: bool, bias: bool,
                                                 initial: bool) -> None:
    """Exact diagonal (squares), exact blocks and the empirical diagonal (per-sample gradients) to 1e-10,
    on the rule itself: no warning, nothing moved."""
    torch.manual_seed(0)
    model = _Recurrent(kind, batch_first, bidirectional, bias, initial).double().eval()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.tensor([0, 2, 1, 1, 0])
    exact, empirical = _oracle(model, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag = torchfim.fisher(model, x, structure="diag")
        blocks = torchfim.fisher(model, x, structure="blocks")
        emp = torchfim.fisher(model, x, estimator="empirical", targets=y, structure="diag")
    assert torchfim_messages(caught) == []
    assert torch.allclose(diag, torch.diagonal(exact), rtol=1e-10, atol=1e-14)
    assert torch.allclose(emp, torch.diagonal(empirical), rtol=1e-10, atol=1e-14)
    assert_equals_dense(blocks, exact, model, "blocks")
    backend, rules = module_rules(model, x)
    assert not backend.moved and isinstance(rules["rnn"], RecurrentRule)


@pytest.mark.parametrize("frozen", ["weight_hh_l0", "weight_ih_l1", "bias_hh_l1"])
def test_frozen_recurrent_weights_are_left_out_and_the_rest_exact(frozen: str) -> None:
    torch.manual_seed(1)
    model = _Recurrent("lstm", True, False, True, False).double().eval()
    getattr(model.rnn, frozen).requires_grad_(False)
    x = torch.randn(4, 3, 3, dtype=torch.float64)
    exact, _ = _oracle(model, x, torch.zeros(4, dtype=torch.long))
    assert torch.allclose(torchfim.fisher(model, x, structure="diag"), torch.diagonal(exact), rtol=1e-10, atol=1e-14)


def test_a_packed_sequence_goes_to_the_generic_rule_and_stays_exact() -> None:
    """The step-by-step recording covers tensors only: a PackedSequence runs the layer's own forward."""

    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn, self.head = nn.GRU(3, 4, batch_first=True), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = nn.utils.rnn.pack_padded_sequence(x, torch.full((x.shape[0],), x.shape[1]), batch_first=True)
            return self.head(self.rnn(packed)[1][-1])

    torch.manual_seed(2)
    model, x = Packed().double().eval(), torch.randn(4, 3, 3, dtype=torch.float64)
    exact, _ = _oracle(model, x, torch.zeros(4, dtype=torch.long))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diag = torchfim.fisher(model, x, structure="diag")
        # the Hessian estimator's second derivatives go through torch.func's forward mode, which a PackedSequence
        # stops: a clear refusal naming the module and the estimator that works (it was a bare RuntimeError of
        # torch's), which compare_estimators and the report take in their stride
        for call in (lambda: torchfim.fisher(model, x, estimator="hessian", structure="diag"),
                     lambda: torchfim.fisher_variance(model, x, estimator="hessian", structure="diag")):
            with pytest.raises(torchfim.TorchfimError, match="torch.func cannot run through its module GRU .*use "
                                                             "estimator='score'"):
                call()
        assert {r.better for r in torchfim.compare_estimators(model, x).rows} == {"score"}
    assert torch.allclose(diag, torch.diagonal(exact), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_the_functional_backend_and_the_hessian_estimator_run_the_layers_step_by_step(kind: str) -> None:
    """Before, the functional backend refused a GRU or LSTM called without initial states (vmap has no
    rule for the in-place fill of the zero states) and the Hessian estimator a float32 LSTM (its CPU
    kernel has no forward-mode derivative). Now the functional backend equals the oracle to 1e-10, and
    in float32 Î2 with 300 labels per input lies within 4 of its own closed-form standard errors of the
    exact trace (the variance from both backends, equal to 1e-5)."""
    torch.manual_seed(3)
    model = _Recurrent(kind, True, True, True, False).double().eval()
    x = torch.randn(6, 4, 3, dtype=torch.float64)
    exact, _ = _oracle(model, x, torch.zeros(6, dtype=torch.long))
    functional = torchfim.fisher(model, x, structure="diag", backend="functional")
    assert torch.allclose(functional, torch.diagonal(exact), rtol=1e-10, atol=1e-14)
    model, x = model.float(), x.float()
    variance = torchfim.fisher_variance(model, x, estimator="hessian", structure="trace", n_samples=300)
    variance_f = torchfim.fisher_variance(model, x, estimator="hessian", structure="trace", n_samples=300,
                                          backend="functional")
    assert torch.allclose(variance, variance_f, rtol=1e-5)
    estimate = torchfim.fisher(model, x, estimator="hessian", structure="trace", n_samples=300,
                               generator=torch.Generator().manual_seed(0))
    assert abs(float(estimate) - float(torch.trace(exact))) < 4 * float(variance) ** 0.5
    assert float(variance) > 0


CELLS = {"rnn_cell": nn.RNNCell, "gru_cell": nn.GRUCell, "lstm_cell": nn.LSTMCell}


class _CellLoop(nn.Module):
    """A cell called at every step of a loop; ``initial``: the first state comes from the input."""

    def __init__(self, kind: str, initial: bool) -> None:
        super().__init__()
        self.cell, self.head = CELLS[kind](3, 4), nn.Linear(4, 3)
        self.start = nn.Linear(3, 4) if initial else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = None if self.start is None else torch.tanh(self.start(x[:, 0]))
        if state is not None and isinstance(self.cell, nn.LSTMCell):
            state = (state, -state)
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


@pytest.mark.parametrize("kind", list(CELLS))
@pytest.mark.parametrize("initial", [False, True])
def test_cells_called_in_a_loop_equal_the_dense_oracle_on_their_rule(kind: str, initial: bool) -> None:
    """Every call of the cell on its own taps, summed over the calls; both backends, exact diagonal and
    blocks and the empirical diagonal to 1e-10. Before, an LSTM cell's parameters moved to the whole
    model (its h is computed from its c) and a cell given its state as a tuple failed inside torch."""
    torch.manual_seed(4)
    model = _CellLoop(kind, initial).double().eval()
    x, y = torch.randn(5, 4, 3, dtype=torch.float64), torch.tensor([2, 0, 1, 1, 2])
    exact, empirical = _oracle(model, x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for backend in ("modules", "functional"):
            diag = torchfim.fisher(model, x, structure="diag", backend=backend)
            assert torch.allclose(diag, torch.diagonal(exact), rtol=1e-10, atol=1e-14), backend
        blocks = torchfim.fisher(model, x, structure="blocks")
        emp = torchfim.fisher(model, x, estimator="empirical", targets=y, structure="diag")
    assert torchfim_messages(caught) == []
    assert torch.allclose(emp, torch.diagonal(empirical), rtol=1e-10, atol=1e-14)
    assert_equals_dense(blocks, exact, model, "blocks")
    backend, rules = module_rules(model, x)
    assert not backend.moved and isinstance(rules["cell"], RecurrentRule)


class _PairState(nn.Module):
    """A module of its own (the generic rule's) that takes its state as a tuple argument."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.linspace(-0.5, 0.5, 12).reshape(3, 4))

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.tanh(x @ self.weight + state[0] * state[1])


class _UsesPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right, self.pair, self.head = nn.Linear(3, 4), nn.Linear(3, 4), _PairState(), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pair(x, (torch.tanh(self.left(x)), self.right(x))))


def test_the_generic_rule_cuts_tuple_arguments_per_sample() -> None:
    """Before, a tuple argument went whole to every sample: torch.func failed, the one-sample loop raised
    inside torch."""
    torch.manual_seed(5)
    model, x = _UsesPair().double().eval(), torch.randn(6, 3, dtype=torch.float64)
    exact, _ = _oracle(model, x, torch.zeros(6, dtype=torch.long))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        diag = torchfim.fisher(model, x, structure="diag")
    assert torchfim_messages(caught) == []
    assert torch.allclose(diag, torch.diagonal(exact), rtol=1e-10, atol=1e-14)
    backend, rules = module_rules(model, x)
    assert not backend.moved and type(rules["pair"]).__name__ == "GenericRule"


class _OwnForward(nn.Module):
    """A batch-first LSTM or GRU of a class of its own (the generic rule's) with two layers, given initial states
    ``(layers, B, hidden)`` from the input, by position or by keyword."""

    def __init__(self, kind: str, keyword: bool) -> None:
        super().__init__()

        class Own(KINDS[kind]):
            def forward(self, x: torch.Tensor, hx: object = None) -> tuple:
                out, state = super().forward(x, hx)
                return out * 1.0, state

        self.rnn, self.head, self.keyword = Own(input_size=3, hidden_size=4, num_layers=2, batch_first=True), nn.Linear(4, 3), keyword

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h0 = torch.tanh(x[:, 0, :1]).reshape(1, -1, 1).expand(2, -1, 4).contiguous()
        hx = (h0, 0.5 * h0) if isinstance(self.rnn, nn.LSTM) else h0
        out = self.rnn(x, hx=hx)[0] if self.keyword else self.rnn(x, hx)[0]
        return self.head(out).mean(1)


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("keyword", [False, True])
def test_initial_states_of_a_batch_first_recurrent_layer_of_its_own_hold_the_batch_second(kind: str,
                                                                                          keyword: bool) -> None:
    """Batches of 2 (as many as layers) and 3: read by ``batch_first=True``, the states ``(layers, B, hidden)`` went
    whole to every sample, or cut by layer, and the generic rule raised inside torch (a review)."""
    torch.manual_seed(3)
    model = _OwnForward(kind, keyword).double().eval()
    xs = [torch.randn(n, 4, 3, dtype=torch.float64) for n in (2, 3)]
    assert_quietly_equals_dense_over(model, xs)
