"""``nn.RNN``, ``nn.GRU``, ``nn.LSTM`` and their cells: two linear maps per step around a sample-local recurrence.

In layer ``l`` and direction ``d`` the gates' pre-activations at step ``t`` are made of two linear
maps, ``a_t = W_ih x_t + b_ih`` of the layer's input and ``r_t = W_hh h_{t−1} + b_hh`` of the previous
hidden state: RNN ``h_t = act(a_t + r_t)``; LSTM gates ``i, f, g, o`` of ``a_t + r_t``; GRU ``r, z`` of
``a + r`` and ``n = tanh(a_n + r ⊙ r_n)``. With ``δ^a_t = ∂(vᵀo)/∂a_t`` and ``δ^r_t = ∂(vᵀo)/∂r_t`` the
per-sample gradients are those of a linear layer applied at ``T`` positions (docs/math.md §6.1):
``∂/∂W_ih = Σ_t δ^a_t x_tᵀ``, ``∂/∂b_ih = Σ_t δ^a_t``, ``∂/∂W_hh = Σ_t δ^r_t h_{t−1}ᵀ``,
``∂/∂b_hh = Σ_t δ^r_t``. The recurrence mixes time steps but never samples.

While the engine records, the module runs :meth:`RecurrentRule.recording_forward`: the same recurrence
step by step in torch operations, which keeps each layer's input and previous hidden states and makes
``a`` (one tensor per layer and direction) and every ``r_t`` taps of the call, so the engine's backward
of the output vectors delivers the ``δ`` with everything else.

An LSTM with ``proj_size`` projects each step's hidden state, ``h_t = W_hr m_t`` with ``m_t = o_t ⊙
tanh(c_t)``: a third map, ``∂/∂W_hr = Σ_t δ^h_t m_tᵀ`` with ``δ^h_t = ∂(vᵀo)/∂h_t``.

Covered: batched tensor inputs (either ``batch_first``), any number of layers, both directions, with or
without biases, initial states given or zero, dropout between layers inactive. Other calls (a ``PackedSequence``, an unbatched input) run the module's own forward and
go to the generic rule. The cells (``nn.RNNCell``, ``nn.GRUCell``, ``nn.LSTMCell``) are one step of the
same: each call has its ``a`` and ``r`` as taps (one position), and a cell called at every step of a
loop gets the sum of its calls, as any module called more than once. (Their own outputs would not do:
an LSTM cell returns ``h`` computed from ``c``, so the two outputs' sensitivities overlap.)
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import PARTS, Call, Grads, Rule, as_float, positions_grads, positions_squares, runs_torch_forward
from .generic import GenericRule

_LAYERS = (nn.RNN, nn.GRU, nn.LSTM)
_CELLS = (nn.RNNCell, nn.GRUCell, nn.LSTMCell)


def recurrent_supported(module: nn.Module) -> bool:
    """``nn.RNN``, ``nn.GRU`` and ``nn.LSTM``, and their cells."""
    return isinstance(module, _CELLS + _LAYERS)


def covers_call(module: nn.Module, input: object) -> bool:
    """Whether the step-by-step computation covers a call on ``input``: a batched tensor (sequences for a
    layer), no dropout active."""
    if isinstance(module, _CELLS):
        return isinstance(input, Tensor) and input.dim() == 2
    dropout = module.training and module.dropout > 0 and module.num_layers > 1
    return isinstance(input, Tensor) and input.dim() == 3 and not dropout


@dataclass
class _Map:
    """One linear map of a recurrent layer in a recorded call: its weight's and bias's local names, its
    inputs ``(B, T, in)`` and how many taps it has (one ``(B, T, out)`` for the input map, one ``(B, out)``
    per step for the others)."""

    weight: str
    bias: str
    inputs: Tensor
    taps: int


def _names(layer: int, direction: int) -> tuple[str, ...]:
    suffix = f"_l{layer}" + ("_reverse" if direction else "")
    return tuple(f"{kind}{suffix}" for kind in ("weight_ih", "bias_ih", "weight_hh", "bias_hh", "weight_hr"))


def _kept(names: tuple[str, ...], trained: set[str], groups: list[tuple[list[Tensor], Tensor]],
          taps: list[Tensor], kept: list[_Map]) -> None:
    """Add to ``taps`` and ``kept`` the maps (input map, hidden map, projection) with a trained parameter:
    ``groups`` gives each one's taps and inputs."""
    for (weight, bias), (mine, inputs) in zip(((names[0], names[1]), (names[2], names[3]), (names[4], "")), groups):
        if mine and {weight, bias} & trained:
            taps.extend(mine)
            kept.append(_Map(weight, bias, inputs, len(mine)))


def run_stepwise(module: nn.Module, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None,
                 trained: set[str] | None = None) -> tuple[object, list[Tensor], list[_Map]]:
    """The layer's forward on a covered call, step by step in torch operations: its outputs as the module
    returns them, and, with ``trained`` (the local names of its trainable parameters), the taps of the maps
    with a trained parameter and those maps (:class:`_Map`)."""
    x = input if module.batch_first else input.transpose(0, 1)  # (B, T, in)
    lstm, directions = isinstance(module, nn.LSTM), 2 if module.bidirectional else 1
    if hx is None:
        h0 = x.new_zeros(module.num_layers * directions, x.shape[0], getattr(module, "proj_size", 0) or module.hidden_size)
        hx = (h0, x.new_zeros(module.num_layers * directions, x.shape[0], module.hidden_size)) if lstm else h0
    h0, c0 = hx if lstm else (hx, None)
    taps: list[Tensor] = []
    kept: list[_Map] = []
    finals_h, finals_c = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            names = _names(layer, direction)
            hs, (h, c), groups = _direction(module, x, names, direction, h0[k], None if c0 is None else c0[k],
                                            trained is not None)
            outputs.append(hs)
            finals_h.append(h)
            finals_c.append(c)
            if trained is not None:
                _kept(names, trained, groups, taps, kept)
        x = torch.cat(outputs, -1) if len(outputs) > 1 else outputs[0]
    out = x if module.batch_first else x.transpose(0, 1)
    h_n = torch.stack(finals_h)
    return ((out, (h_n, torch.stack(finals_c))) if lstm else (out, h_n)), taps, kept


def run_cell(module: nn.Module, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None,
             trained: set[str] | None = None) -> tuple[object, list[Tensor], list[_Map]]:
    """One step of a cell on a covered call, as :func:`run_stepwise` returns a layer's (one position)."""
    lstm = isinstance(module, nn.LSTMCell)
    if hx is None:
        zeros = input.new_zeros(input.shape[0], module.hidden_size)
        hx = (zeros, zeros) if lstm else zeros
    h, c = hx if lstm else (hx, None)
    a = F.linear(input.unsqueeze(1), module.weight_ih, module.bias_ih)  # one position: the layers' layout
    r = F.linear(h, module.weight_hh, module.bias_hh)
    out, c = _cell(module, a[:, 0], r, h, c)
    taps: list[Tensor] = []
    kept: list[_Map] = []
    if trained is not None:
        names = ("weight_ih", "bias_ih", "weight_hh", "bias_hh", "")
        _kept(names, trained, [([a], input.unsqueeze(1).detach()), ([r], h.unsqueeze(1).detach())], taps, kept)
    return ((out, c) if lstm else out), taps, kept


def _direction(module: nn.Module, x: Tensor, names: tuple[str, ...], reverse: int, h: Tensor, c: Tensor | None,
               keep: bool) -> tuple[Tensor, tuple[Tensor, Tensor | None], list[tuple[list[Tensor], Tensor | None]]]:
    """One direction of one layer over ``x`` (B, T, in): its hidden states (B, T, H), final states, and per
    map (input, hidden, projection) its taps in step order and its inputs (B, T, ·) (``keep``, else None)."""
    w_ih, b_ih, w_hh, b_hh, w_hr = (getattr(module, n) if hasattr(module, n) else None for n in names)
    a = F.linear(x, w_ih, b_ih)
    # unbind, not a[:, t]: autograd adds the steps' gradients in one stack, where each select's backward
    # would fill a zero tensor the size of ``a`` (T of them: 89% of an LSTM's exact diagonal)
    a_steps = a.unbind(1)
    steps = range(x.shape[1] - 1, -1, -1) if reverse else range(x.shape[1])
    states: list[Tensor | None] = [None] * x.shape[1]
    previous, rs, unprojected, ps = [], [], [], []
    for t in steps:
        if keep:
            previous.append(h.detach())
        r = F.linear(h, w_hh, b_hh)
        rs.append(r)
        h, c = _cell(module, a_steps[t], r, h, c)
        if w_hr is not None:  # an LSTM with proj_size: h = W_hr (o ⊙ tanh c)
            if keep:
                unprojected.append(h.detach())
            h = F.linear(h, w_hr)
            ps.append(h)
        states[t] = h

    def stacked(ts: list[Tensor]) -> Tensor | None:
        return torch.stack(ts, 1) if keep and ts else None

    groups = [([a], x.detach()), (rs, stacked(previous)), (ps, stacked(unprojected))]
    return torch.stack(states, 1), (h, c), groups


def _cell(module: nn.Module, a: Tensor, r: Tensor, h: Tensor, c: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step from the pre-activations ``a`` and ``r`` (torch's gate orders)."""
    if isinstance(module, (nn.LSTM, nn.LSTMCell)):
        i, f, g, o = (a + r).chunk(4, -1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c
    if isinstance(module, (nn.GRU, nn.GRUCell)):
        a_r, a_z, a_n = a.chunk(3, -1)
        r_r, r_z, r_n = r.chunk(3, -1)
        reset, update = torch.sigmoid(a_r + r_r), torch.sigmoid(a_z + r_z)
        n = torch.tanh(a_n + reset * r_n)
        return (1 - update) * n + update * h, None
    act = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return act(a + r), None


@contextmanager
def stepwise_recurrent(modules: list[nn.Module]) -> Iterator[None]:
    """While the block runs, ``modules`` (recurrent layers that run their class's forward) compute their
    covered calls step by step: operations that torch.func batches and differentiates in forward mode,
    where the fused kernels are not (vmap has no rule for them; the CPU LSTM kernel has no forward-mode
    derivative)."""
    for module in modules:
        module.__dict__["forward"] = functools.partial(_stepwise_forward, module)
    try:
        yield
    finally:
        for module in modules:
            del module.__dict__["forward"]


def _stepwise_forward(module: nn.Module, input: object, hx: object = None) -> object:
    if not covers_call(module, input):
        return type(module).forward(module, input, hx)
    return (run_cell if isinstance(module, _CELLS) else run_stepwise)(module, input, hx)[0]


def stepwise_candidates(model: nn.Module) -> list[nn.Module]:
    """The recurrent layers of ``model`` that :func:`stepwise_recurrent` may take: covered kinds running
    their class's forward."""
    return [m for m in model.modules() if recurrent_supported(m) and "forward" not in m.__dict__ and runs_torch_forward(m)]


class RecurrentRule(Rule):
    """Per-sample gradients of a recurrent layer's weights (see the module docstring)."""

    def __init__(self, module: nn.Module, params: dict[str, int], path: str) -> None:
        super().__init__(module, params)
        self.generic = GenericRule(module, params, path)
        #: What :meth:`recording_forward` kept of the call in progress, for :meth:`take_recorded`.
        self._pending: tuple[list[Tensor], list[tuple]] | None = None

    def recording_forward(self, input: Tensor, hx: Tensor | tuple[Tensor, Tensor] | None = None) -> object:
        """The module's forward while the engine records, step by step (:func:`run_stepwise`); calls it does
        not cover run the module's own forward."""
        module = self.module
        if not covers_call(module, input):
            self._pending = None
            return type(module).forward(module, input, hx)
        run = run_cell if isinstance(module, _CELLS) else run_stepwise
        out, taps, kept = run(module, input, hx, set(self.params))
        self._pending = (taps, kept)
        return out

    def take_recorded(self, call: Call) -> list[Tensor]:
        """The ``a`` and ``r_t`` taps of the call just recorded (none when it ran the module's own forward)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return []
        call.cache[PARTS], call.cache["kept"] = pending
        return list(pending[0])

    # ------------------------------------------------------------------ products
    def grads(self, call: Call, sens: list[Tensor | None], rows: slice) -> Grads:
        if PARTS not in call.cache:
            return self.generic.grads(call, sens, rows)
        out: Grads = {}
        for linear, delta in self._prepared(call, sens):
            positions_grads(self, delta[:, rows], as_float(linear.inputs[rows]), linear.weight, linear.bias, out)
        return out

    def squares(self, call: Call, sens: list[Tensor | None]) -> Grads | None:
        """Each map's squares by :func:`.base.positions_squares` (None: the call goes generic)."""
        if PARTS not in call.cache:
            return None
        out: Grads = {}
        for linear, delta in self._prepared(call, sens):
            w, b = positions_squares(delta, linear.inputs, linear.weight in self.params)
            if linear.weight in self.params:
                out[self.params[linear.weight]] = w.T.reshape(-1)
            if linear.bias in self.params:
                out[self.params[linear.bias]] = b
        return out

    def _prepared(self, call: Call, sens: list[Tensor | None]) -> list[tuple[_Map, Tensor]]:
        """Per map: the map and its sensitivities ``δ`` (m, B, T, out), the steps' stacked; once per call
        and group of vectors."""
        cached = call.cache.get("prepared")
        if cached is not None and cached[0] is sens:
            return cached[1]
        taps = call.cache[PARTS]
        parts = sens[len(sens) - len(taps):]
        prepared, k = [], 0
        for linear in call.cache["kept"]:
            mine = [s if s is not None else t.new_zeros(_vectors(sens), *t.shape)
                    for s, t in zip(parts[k : k + linear.taps], taps[k : k + linear.taps])]
            k += linear.taps
            delta = mine[0] if taps[k - 1].dim() == 3 else torch.stack(mine, 2)  # the input map's one tap is (B, T, ·)
            prepared.append((linear, as_float(delta)))
        call.cache["prepared"] = (sens, prepared)
        return prepared


def _vectors(sens: list[Tensor | None]) -> int:
    """The number of vectors ``m`` of a call's sensitivities (its first that the vectors reach)."""
    return next(s.shape[0] for s in sens if s is not None)
