"""Sensitivities handed to the rules during the backward (``engine/pullback.py``).

Where one vector's pull-back records at least ``per_module.STREAM_ELEMENTS`` numbers, the diagonal
and trace products take each single-use call's sensitivity from a hook on its tap as the backward
reaches it, instead of from the gradients autograd returns at the end. The shared case list is far
below that size, so the budget is forced to 0 here: every case must then give the brute-force
oracles' values, with the hooks actually doing the work (one vector at a time, as on large models:
the group budget ``per_module.GROUP_ELEMENTS`` is forced down too).
"""

from __future__ import annotations

import weakref

import pytest
import torch
from cases import CASES
from oracles import flat_function
from test_engine_oracles import IDS, PAIRS, _close, _kwargs, _oracle, _view
from torch.func import jacrev

import torchfim
from torchfim.engine import per_module, pullback
from torchfim.engine.batch import make_batch
from torchfim.engine.modules import Call
from torchfim.engine.session import engine_pass
from torchfim.errors import TorchfimError


@pytest.fixture
def consumed(monkeypatch) -> list[int]:
    """Stream every recording, one vector at a time; the list collects, per pull-back, how many calls
    were consumed."""
    counts: list[int] = []
    original = pullback._consumed

    def spy(output, calls, v, consumers, release):
        counts.append(len(consumers))
        return original(output, calls, v, consumers, release)

    monkeypatch.setattr(per_module, "STREAM_ELEMENTS", 0)
    monkeypatch.setattr(per_module, "GROUP_ELEMENTS", 1)
    monkeypatch.setattr(pullback, "_consumed", spy)
    return counts


@pytest.mark.filterwarnings("ignore:torchfim. torch.func cannot batch")
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_exact_diagonal_and_trace_from_consumed_sensitivities_equal_the_oracle(case, family, consumed) -> None:
    res = _oracle(case, family)
    for structure in ("diag", "trace"):
        consumed.clear()
        got = torchfim.fisher(res["model"], res["x"], family=family, structure=structure, backend="modules",
                              **_kwargs(case, res))
        _close(got, _view(res["exact"], structure, res["model"]), 1e-10)
        assert consumed and all(k > 0 for k in consumed), consumed


@pytest.mark.filterwarnings("ignore:torchfim. torch.func cannot batch")
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_per_sample_squared_norms_from_consumed_sensitivities_equal_brute_force(case, consumed) -> None:
    """``‖Jᵢᵀ v_ij‖²`` (the monitor's products) against float64 Jacobians from ``torch.func.jacrev``."""
    model = case.build(3)
    x = case.inputs(5)
    f, theta = flat_function(model)
    jac = jacrev(lambda th: f(th, x))(theta)  # (n, outputs, P)
    v = torch.randn(5, 2, jac.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with engine_pass(model, "modules") as p:
        rec = p.backend.record(make_batch(x, None, p.view.device, p.view.dtype))
        got = p.backend.sample_squares(rec, v)
    want = torch.einsum("nop,nmo->nmp", jac, v).square().sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert len(consumed) == 2 and all(k > 0 for k in consumed), consumed


@pytest.mark.filterwarnings("ignore:torchfim. torch.func cannot batch")
@pytest.mark.parametrize("case,family", PAIRS, ids=IDS)
def test_score_estimates_are_the_same_streamed_or_not(case, family, monkeypatch) -> None:
    """One label per input drawn from the same generator: the same numbers either way (the score
    estimator's products go through the same one-vector pull-back)."""
    res = _oracle(case, family)

    def score(structure: str) -> torch.Tensor:
        return torchfim.fisher(res["model"], res["x"], family=family, estimator="score", structure=structure,
                               backend="modules", generator=torch.Generator().manual_seed(5), **_kwargs(case, res))

    kept = {s: score(s) for s in ("diag", "trace")}
    monkeypatch.setattr(per_module, "STREAM_ELEMENTS", 0)
    for structure, want in kept.items():
        torch.testing.assert_close(score(structure), want, rtol=1e-12, atol=1e-14)


class _TwoBranches(torch.nn.Module):
    """``x → a → tanh → b`` plus ``x → c``: the taps of ``a`` and ``c`` have no tap below them."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2), torch.nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x))) + self.c(x)


def test_the_taps_asked_for_are_those_with_no_tap_below_them() -> None:
    model = _TwoBranches().double()
    taps = {}
    handles = [m.register_forward_hook(lambda m, i, o, name=name: taps.__setitem__(name, o))
               for name, m in model.named_children()]
    out = model(torch.randn(5, 3, dtype=torch.float64))
    for h in handles:
        h.remove()
    nodes = {t.grad_fn for t in taps.values()}
    roots = pullback._without_tap_below([taps["a"], taps["b"], taps["c"]], nodes)
    assert [id(t) for t in roots] == [id(taps["a"]), id(taps["c"])]
    # Each call's consumer gets exactly autograd's gradient of its tap.
    calls = [Call(model, (), {}, [taps[n]], 5) for n in ("a", "b", "c")]
    v = torch.randn(5, 1, 2, dtype=torch.float64)
    got: dict[int, torch.Tensor] = {}
    result = pullback.pull_back(out, calls, v, {0: lambda g: got.__setitem__(0, g), 2: lambda g: got.__setitem__(2, g)})
    want = torch.autograd.grad(out, [taps["a"], taps["b"], taps["c"]], v[:, 0], retain_graph=True)
    assert result[0] == [None] and result[2] == [None]
    torch.testing.assert_close(result[1][0][0], want[1], rtol=0, atol=0)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
    torch.testing.assert_close(got[2], want[2], rtol=0, atol=0)


def _mlp() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 6), torch.nn.Tanh(),
                               torch.nn.Linear(6, 3)).double()


def test_the_score_estimator_frees_its_recording_in_its_pull_back(monkeypatch) -> None:
    """Î1 with one label per input pulls each recording back once: that pull-back is told to release it,
    the exact Fisher's (many vectors over one recording) is not."""
    released: list[bool] = []
    original = pullback.pull_back

    def spy(output, calls, v, consumers=None, release=False, one_by_one=False):
        released.append(release)
        return original(output, calls, v, consumers, release, one_by_one)

    monkeypatch.setattr(per_module, "STREAM_ELEMENTS", 0)
    monkeypatch.setattr(per_module, "pull_back", spy)
    model, x = _mlp(), torch.randn(7, 4, dtype=torch.float64)
    for k in (1, 3):  # three vectors go back in one group: its pull-back is the last too
        released.clear()
        torchfim.fisher(model, x, estimator="score", structure="diag", n_samples=k,
                        generator=torch.Generator().manual_seed(0))
        assert released[-1] and released.count(True) == 1, released  # before it: the rules' coverage check
    released.clear()
    torchfim.fisher(model, x, structure="diag")
    assert released and not any(released), released
    released.clear()  # the monitor measures Tr(F) on each held batch with one pull-back
    monitor = torchfim.train.FisherTraceMonitor(model, x, every=1, generator=torch.Generator().manual_seed(0))
    for step in range(2):
        monitor.measure(step)
    assert released.count(True) == 2 and released[-1], released


def test_a_released_pull_back_frees_each_layer_as_the_backward_passes_it(monkeypatch) -> None:
    """While the backward runs, the inputs of the layers it has passed are gone (as in an ordinary
    backward), the products equal those of a recording kept to the end, and the spent recording
    refuses to be used again."""
    monkeypatch.setattr(per_module, "STREAM_ELEMENTS", 0)
    model, x = _mlp(), torch.randn(7, 4, dtype=torch.float64)
    v = torch.randn(7, 1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with engine_pass(model, "modules") as p:
        batch = make_batch(x, None, p.view.device, p.view.dtype)
        kept = p.backend.squares(p.backend.record(batch), v)
        rec = p.backend.record(batch)
        inputs = [weakref.ref(call.args[0]) for _, call in rec.calls]  # of the layers 0, 2 and 4
        alive_at_first_layer: list[list[bool]] = []
        rule, first = rec.calls[0]
        squares = rule.squares

        def spying(call, sens):  # the first layer is the last the backward reaches
            if call is first:
                alive_at_first_layer.append([ref() is not None for ref in inputs])
            return squares(call, sens)

        monkeypatch.setattr(rule, "squares", spying)
        released = p.backend.squares(rec, v, last=True)
        assert alive_at_first_layer == [[True, False, False]]  # the input x stays: the batch holds it
        for i, sq in kept.items():
            torch.testing.assert_close(released[i], sq, rtol=1e-13, atol=0)
        assert rec.released and all(not call.args and not call.taps for _, call in rec.calls)
        with pytest.raises(TorchfimError, match="used after its last pull-back"):
            p.backend.squares(rec, v)
