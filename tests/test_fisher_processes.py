"""``torchfim.fisher(..., across_processes=True)`` (and ``fisher_variance``, ``samples_needed``, the variance bounds,
``compare_estimators``) in two processes (``torch.distributed``, gloo, CPU).

Oracles: the exact and empirical Fisher, ``fisher_variance``, the bounds and the comparison, of one process
computing on all the inputs (float64, to rounding); for the random estimators, the stratified combination
``Σ_r (n_r/N) F_r``, ``Σ_r (n_r/N)² V_r`` of each process's own computation on its rows with the same generator
(the same labels), done by hand. Both processes return the same result, also where one process's share is empty.
Refused: processes holding other inputs (other rows, other targets, a row's entries in another order), label
generators in the same state, ``combined``, a mask given as one tensor, other weights (one moved by 1e-3,
trainable or frozen; other BatchNorm statistics are warned of), calls that differ (return_stderr on one process alone, other
estimators, families, structures, variance modes or output functions, other parameters trained), a model that is no module (before, an ``AttributeError``), and no process group; a process
that fails alone (a NaN in one of its rows, weights on the meta device) makes the other stop with its name
instead of waiting for a collective.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from processes import over_loopback, run_processes
from torch import nn

import torchfim
from torchfim import TorchfimError

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="this torch has no torch.distributed")
WORLD = 2
X = torch.randn(33, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
Y = torch.randint(0, 3, (33,), generator=torch.Generator().manual_seed(8))
BATCHES = [X[:8], X[8:23], X[23:]]  # shares of 4 + 8 + 5 rows and 4 + 7 + 5 rows


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _seeded(rank: int) -> torch.Generator:
    return torch.Generator().manual_seed(50 + rank)


def _computations(model: nn.Module, across: bool, rank: int) -> dict:
    """The results of one process: across processes, or (``across=False``) of its own rows alone."""
    mine = BATCHES if across else [b[rank::WORLD] for b in BATCHES]
    targets = Y if across else torch.cat([Y[:8][rank::WORLD], Y[8:23][rank::WORLD], Y[23:][rank::WORLD]])
    loader = [(b, t) for b, t in zip(mine, torch.split(targets, [len(b) for b in mine]))]
    options = {"across_processes": True} if across else {}
    return {
        "exact-full": torchfim.fisher(model, mine, structure="full", **options),
        "exact-layers": torchfim.fisher(model, mine, structure="layers", **options),
        "empirical": torchfim.fisher(model, loader, estimator="empirical", structure="diag", **options),
        "score": torchfim.fisher(model, mine, estimator="score", structure="diag", n_samples=3,
                                 generator=_seeded(rank), return_stderr=True, **options),
        "hessian": torchfim.fisher(model, mine, estimator="hessian", structure="trace", n_samples=2,
                                   generator=_seeded(rank), return_stderr=True, **options),
        "variance": torchfim.fisher_variance(model, mine, estimator="hessian", structure="diag", **options),
        "labels needed": torchfim.samples_needed(model, mine, structure="diag", rel_error=0.05, **options),
        "bound": torchfim.variance_bound(model, mine, structure="diag", **options),
        "hessian bound": torchfim.hessian_variance_bound_spectral(model, mine, structure="trace", **options),
        "comparison": _table(torchfim.compare_estimators(model, mine, **options)),
        "n": sum(len(b) for b in mine),
    }


def _table(comparison: torchfim.EstimatorComparison) -> torch.Tensor:
    return torch.tensor([[r.fisher_diag_sum, r.score_variance, r.hessian_variance] for r in comparison.rows],
                        dtype=torch.float64)


def _nudged(rank: int, frozen: bool = False) -> nn.Module:
    """The model, one weight moved by 1e-3 in process 1 (a model not wrapped in DDP, trained apart); ``frozen``:
    in a frozen first layer (a base model loaded otherwise under the same head)."""
    model = _model()
    model[0].requires_grad_(not frozen)
    if rank:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] += 1e-3
    return model


def _refusals(model: nn.Module, rank: int) -> dict[str, str]:
    said = _one_failing(model)
    flipped = X.clone()
    if rank:
        flipped[3] = flipped[3].flip(0)
    cases = {
        "other inputs": lambda: torchfim.fisher(model, X[rank::2], structure="trace", across_processes=True),
        "other targets": lambda: torchfim.fisher(model, [(X, (Y + rank) % 3)], estimator="empirical",
                                                 structure="trace", across_processes=True),
        "a row in another order": lambda: torchfim.fisher(model, flipped, structure="trace", across_processes=True),
        "other weights": lambda: torchfim.fisher(_nudged(rank), X, structure="trace", across_processes=True),
        "other frozen weights": lambda: torchfim.fisher(_nudged(rank, frozen=True), X, structure="trace",
                                                        across_processes=True),
        "meta weights in one": lambda: torchfim.fisher(_model().to("meta") if rank else _model(), X,
                                                       structure="trace", across_processes=True),
        "not a module": lambda: torchfim.fisher_variance(torch.tanh, X, structure="trace", across_processes=True),
        "same generator": lambda: torchfim.fisher(model, X, estimator="score", structure="trace",
                                                  generator=torch.Generator().manual_seed(1), across_processes=True),
        "combined": lambda: torchfim.fisher(model, X, estimator="combined", structure="trace", across_processes=True),
        "tensor mask": lambda: torchfim.fisher(model, X, structure="trace", mask=torch.ones(33, dtype=torch.bool),
                                               across_processes=True),
        # Calls that differ between the processes: before, their sums paired up wrongly (a wrong Fisher on one
        # process, a wait on the other), mixed two estimators or families, or (another structure, other sizes)
        # aborted a process inside gloo.
        "stderr on one": lambda: torchfim.fisher(model, X, estimator="score", structure="trace", generator=_seeded(rank),
                                                 return_stderr=rank == 0, across_processes=True),
        "other estimators": lambda: torchfim.fisher(model, X, estimator=("exact", "score")[rank], structure="trace",
                                                    generator=_seeded(rank), across_processes=True),
        "other families": lambda: torchfim.fisher(model, X, family=("categorical", "gaussian")[rank],
                                                  structure="trace", across_processes=True),
        "other structures": lambda: torchfim.fisher(model, X, structure=("diag", "trace")[rank], across_processes=True),
        "other variance modes": lambda: torchfim.variance_bound(model, X, structure="diag", across_processes=True)
        if rank else torchfim.fisher_variance(model, X, structure="diag", across_processes=True),
        # Other parameters trained: a diagonal of another length aborted a process inside gloo; two frozen layers
        # swapped between the processes summed unlike traces without a word.
        "frozen on one": lambda: torchfim.fisher(_frozen(rank, [] if rank else [0]), X, structure="diag",
                                                 across_processes=True),
        "frozen swapped": lambda: torchfim.fisher(_frozen(rank, [2] if rank else [0]), X, structure="trace",
                                                  across_processes=True),
        # A trial's silent blends: BatchNorm statistics of each process's own (DDP with broadcast_buffers=False),
        # and output functions that compute differently (both lambdas).
        "other output functions": lambda: torchfim.fisher(model, X, structure="trace", across_processes=True,
                                                          output=(lambda o: o, lambda o: 2 * o)[rank]),
        "other variance outputs": lambda: torchfim.variance_bound(model, X, structure="diag", across_processes=True,
                                                                  output=(lambda o: o, lambda o: 2 * o)[rank]),
        # Arguments refused on one process alone, before the shared computation: the other process waited for it
        # until the group's timeout (a processes trial), now it stops naming it, in each public call.
        "bad argument on one": lambda: torchfim.fisher(model, X, structure=("trace", "diagnal")[rank],
                                                       across_processes=True),
        "bad option on one": lambda: torchfim.variance_bound(model, X, structure="trace", across_processes=True,
                                                             **({"n_sample": 2} if rank else {})),
        "bad target on one": lambda: torchfim.samples_needed(model, X, structure="trace", across_processes=True,
                                                             rel_error=(0.1, -1.0)[rank]),
        "typo on one": lambda: torchfim.fisher(model, X, structure="trace", across_processes=True,
                                               **({"n_sample": 2} if rank else {})),
        # Differences that change nothing are taken: an old structure name, labels per input where none are drawn.
        "layers and blocks": lambda: torchfim.fisher(model, X, structure=("layers", "blocks")[rank],
                                                     across_processes=True),
        "exact n_samples": lambda: torchfim.fisher(model, X, structure="trace", n_samples=1 + rank,
                                                   across_processes=True),
    }
    for name, call in cases.items():
        try:
            call()
            said[name] = "taken"
        except (TorchfimError, TypeError) as err:  # TypeError: a keyword the call does not take
            said[name] = str(err)
    return said


class _NoForwardRule(nn.Module):
    """Says what torch says of an operation without a forward-mode rule where torch.func's transforms run it (the
    Hessian estimator's second derivatives), and computes otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch._C._are_functorch_transforms_active():
            raise NotImplementedError("Trying to use forward AD with _grouped_mm that does not support it")
        return torch.tanh(self.lin(x))


def _without_a_forward_rule() -> tuple[torch.Tensor, bool]:
    """``compare_estimators`` across processes on one input, of a model without a forward-mode rule: process 1 has
    no row, so it met no error (a processes trial: it raised "1 other process(es) failed" while process 0 returned
    the comparison with Î1 alone); now both return that comparison."""
    torch.manual_seed(0)
    cmp = torchfim.compare_estimators(_NoForwardRule().double(), X[:1], across_processes=True)
    return _table(cmp), cmp.hessian_unavailable is not None


def _other_buffers(rank: int) -> str:
    """The warning where the processes' BatchNorm statistics differ (each process's own, as plain DDP training
    leaves them between its broadcasts, or DDP(broadcast_buffers=False) for good): a processes trial's blend of two
    models was computed without a word; not refused, as training leaves them apart after every step."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchfim.fisher(_normalised(rank), X, structure="trace", across_processes=True)
    return " ".join(str(w.message) for w in caught)


def _normalised(rank: int) -> nn.Module:
    """A model with BatchNorm in eval mode whose running mean differs on process 1 alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double().eval()
    with torch.no_grad():
        model[1].running_mean += 0.1 * rank
    return model


def _frozen(rank: int, layers: list[int]) -> nn.Module:
    model = _model()
    for k in layers:
        model[k].requires_grad_(False)
    return model


def _one_failing(model: nn.Module) -> dict[str, object]:
    """The errors where process 1 alone meets a NaN, and whether the failed computation let go of its inputs once
    the error was dropped (the cyclic collector off: before, a cycle through the re-raised error's traceback kept
    it, engine state and suspended generators included, until a later collection)."""
    bad = X.clone()
    bad[1, 0] = float("nan")  # a row of process 1
    held = weakref.ref(bad)
    gc.disable()
    try:
        try:
            torchfim.fisher(model, bad, structure="trace", across_processes=True)
        except TorchfimError as err:
            said = {"one fails": str(err)}
        del bad
        said["let go"] = held() is None
    finally:
        gc.enable()
    return said


def _rank(rank: int, root: str) -> None:
    over_loopback()
    torch.distributed.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=WORLD)
    model = _model()
    torch.manual_seed(123)  # the same global generator on both: the private label generators differ by rank
    unseeded = torchfim.fisher(model, X, estimator="score", structure="trace", across_processes=True,
                               return_stderr=True)
    one_input = torchfim.fisher(model, X[:1], estimator="score", structure="diag", generator=_seeded(rank),
                                return_stderr=True, across_processes=True)  # process 1 has no row
    torch.save({"across": _computations(model, True, rank), "own": _computations(model, False, rank),
                "unseeded": unseeded, "one input": one_input, "refusals": _refusals(model, rank),
                "no forward rule": _without_a_forward_rule(), "buffers": _other_buffers(rank)},
               f"{root}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("fisher_processes")
    run_processes(_rank, (str(root),), WORLD)
    return [torch.load(root / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def test_the_exact_fisher_empirical_fisher_and_variance_are_one_processs(ranks) -> None:
    """The closed-form variance given the inputs, ``(1/N²) Σᵢ vᵢ``, is the processes' ``Σ_r (n_r/N)² V_r``."""
    model = _model()
    want = {"exact-full": torchfim.fisher(model, X, structure="full"),
            "exact-layers": torchfim.fisher(model, X, structure="layers"),
            "empirical": torchfim.fisher(model, X, targets=Y, estimator="empirical", structure="diag"),
            "variance": torchfim.fisher_variance(model, X, estimator="hessian", structure="diag"),
            "labels needed": torch.tensor(torchfim.samples_needed(model, X, structure="diag", rel_error=0.05)),
            "bound": torchfim.variance_bound(model, X, structure="diag"),
            "hessian bound": torchfim.hessian_variance_bound_spectral(model, X, structure="trace"),
            "comparison": _table(torchfim.compare_estimators(model, X))}
    for rank in ranks:
        for name, value in want.items():
            got = torch.tensor(rank["across"][name]) if name == "labels needed" else rank["across"][name]
            pairs = [(got[k], value[k]) for k in value] if isinstance(value, dict) else [(got, value)]
            assert all(torch.allclose(g, w, rtol=1e-10, atol=1e-14) for g, w in pairs), name


def test_the_random_estimators_and_variances_are_the_stratified_combination(ranks) -> None:
    n = [rank["own"]["n"] for rank in ranks]
    weights = [k / sum(n) for k in n]
    assert n == [17, 16]
    variance = sum(w**2 * rank["own"]["variance"] for w, rank in zip(weights, ranks))
    assert all(torch.allclose(rank["across"]["variance"], variance, rtol=1e-12, atol=0) for rank in ranks)
    for name in ("score", "hessian"):
        estimate = sum(w * rank["own"][name][0] for w, rank in zip(weights, ranks))
        variance = sum(w**2 * rank["own"][name][1] ** 2 for w, rank in zip(weights, ranks))
        for rank in ranks:
            got, stderr = rank["across"][name]
            assert torch.allclose(got, estimate, rtol=1e-12, atol=0)
            assert torch.allclose(stderr, variance.sqrt(), rtol=1e-12, atol=0)


def test_without_a_generator_each_process_draws_its_own_labels(ranks) -> None:
    first, second = (rank["unseeded"] for rank in ranks)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert first[1] > 0


def test_a_process_without_rows_adds_nothing(ranks) -> None:
    want = torchfim.fisher(_model(), X[:1], estimator="score", structure="diag", generator=_seeded(0),
                           return_stderr=True)
    for rank in ranks:
        assert all(torch.allclose(g, w, rtol=1e-12, atol=0) for g, w in zip(rank["one input"], want))


def test_refusals_name_the_fix(ranks) -> None:
    assert all(rank["refusals"]["let go"] for rank in ranks)
    assert "inputs contain NaN" in ranks[1]["refusals"]["one fails"]
    assert "1 other process failed" in ranks[0]["refusals"]["one fails"]
    assert "meta" in ranks[1]["refusals"]["meta weights in one"]  # the engine's refusal, not the fingerprint's error
    assert "1 other process failed" in ranks[0]["refusals"]["meta weights in one"]
    for rank in ranks:
        said = rank["refusals"]
        for case in ("other inputs", "other targets", "a row in another order"):
            assert "needs the same inputs in the same order on every process" in said[case], case
        assert "label generators are in the same state" in said["same generator"]
        for case in ("other weights", "other frozen weights"):
            assert "the processes' weights differ; wrap the model in DistributedDataParallel" in said[case], case
        assert "model must be a torch.nn.Module, got builtin_function_or_method" in said["not a module"]
        assert "not available for estimator='combined'" in said["combined"]
        assert "not one tensor for the whole data set" in said["tensor mask"]
        for case in ("stderr on one", "other estimators", "other families", "other structures", "other variance modes",
                     "frozen on one", "frozen swapped"):
            assert "needs the same call on every process" in said[case], case
        assert said["layers and blocks"] == said["exact n_samples"] == "taken"
        assert "fisher(across_processes=True) needs the same call on every process" in said["other output functions"]
        assert "variance_bound(across_processes=True) needs the same call" in said["other variance outputs"]
    first, other = ranks[0]["buffers"], ranks[1]["buffers"]  # the gathered buffers, the same everywhere: said once
    assert "floating-point buffers different" in first and "SyncBatchNorm" in first
    assert "floating-point buffers different" not in other
    for case, own, call in (("bad argument on one", "unknown structure 'diagnal'", "fisher"),
                            ("bad option on one", "takes no keyword argument 'n_sample'", "variance_bound"),
                            ("bad target on one", "rel_error", "samples_needed"),
                            ("typo on one", "takes no keyword argument 'n_sample'", "fisher")):
        assert own in ranks[1]["refusals"][case], case
        assert f"{call}(across_processes=True): 1 other process failed (the error is raised there)" in \
            ranks[0]["refusals"][case], case
    with pytest.raises(TorchfimError, match="no process group is initialised"):
        torchfim.fisher(_model(), X, structure="trace", across_processes=True)


def test_a_comparison_without_the_hessian_estimator_is_every_processs(ranks) -> None:
    (first, unavailable), (second, also) = (rank["no forward rule"] for rank in ranks)
    assert unavailable and also
    assert torch.equal(first.isnan(), second.isnan()) and bool(first[:, 2].isnan().all())
    assert torch.equal(first[:, :2], second[:, :2]) and bool((first[:, :2] > 0).all())


def test_an_output_functions_settings_do_not_depend_on_the_hash_seed() -> None:
    """A set constant's order follows each process's string hash seed, which torchrun does not fix: a reviewer's
    lambda (``x in {"a", "b", "c"}``) gave three numbers under three seeds, so identical calls were refused."""
    import subprocess
    import sys

    code = ("from torchfim._settings_digest import function_settings, settings_number\n"
            "f = lambda o: o if 'mean' in {'mean', 'logits', 'scores', 'hidden'} else 2 * o\n"
            "print(settings_number(function_settings(f)))")
    seen = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={**__import__("os").environ, "PYTHONHASHSEED": str(seed)}).stdout for seed in (1, 2, 3)}
    assert len(seen) == 1, seen
