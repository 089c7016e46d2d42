#!/usr/bin/env python
"""Benchmarks of torchfim against its peers (BackPACK, nngeometry, curvlinops).

Usage (from the repository root)::

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    .venv/bin/python benchmarks/run.py --json bench.json --markdown docs/performance.md
    .venv/bin/python benchmarks/run.py --quick --json /tmp/quick.json       # seconds, tiny sizes
    .venv/bin/python benchmarks/run.py --workloads diag-exact-mlp,floor      # a subset
    .venv/bin/python benchmarks/run.py --render bench.json --markdown docs/performance.md

What a run does, per workload (scikit-learn digits, all 1797 inputs, mini-batches of 256,
``torch.set_num_threads(2)``, float32):

1. builds every contender that can compute the workload (torchfim, the ``floor`` and each
   installed peer; peers that cannot compute it exactly are listed with the reason);
2. runs each contender once — the warm-up — and checks that all results agree: the relative
   error ``‖a − b‖ / max(‖a‖, ‖b‖)`` must be below ``--tol`` (1e-4). The largest group of
   mutually agreeing results wins (ties go to torchfim); a contender outside it is *flagged*,
   reported with its error in the details file and in the markdown, and not timed;
3. times the agreeing contenders over ``--reps`` (≥ 5) rounds, interleaved (round r runs the
   contenders in an order rotated by r, so that load changes on the machine hit all of them
   alike; a contender whose warm-up took under 0.3 s is timed up to 10 times per round), and
   keeps the median. Before each timed call it waits for other jobs to leave the cores free and
   retakes calls that ran under contention (:func:`contention_probe`, ``--quiet-wait``).

Outputs (each written atomically, temporary file + rename, after every workload):

* ``--json FILE``: exactly ``{workload: {contender: median seconds}}``;
* ``FILE`` with ``.details.json`` in place of ``.json`` (the sibling structure): ratios to the
  floor (``ratios``), the reference each ratio uses, agreement errors, flagged contenders,
  errors, notes, the raw samples, peer versions, the environment, the targets with met/missed,
  and the scaling sweep;
* ``--markdown FILE`` (with ``--plots DIR``, default ``<markdown dir>/performance``): the report
  that docs/performance.md is.

The scaling sweep (``--sweep``; implied by ``--markdown`` unless ``--no-sweep``) times
``torchfim.fisher(estimator="exact", structure="diag")`` against the width (P from ~1e3 to
~1e6), the batch size, the number of classes and the data-set size, each point in a fresh
subprocess that measures its peak resident memory (see :func:`sweep_point`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import torchfim  # noqa: E402
import torchfim.families  # noqa: E402

import peers as peer_lib  # noqa: E402

# BackPACK's module hooks fire on the first layer, whose input needs no gradient; torch warns about
# that on every backward. It is harmless (BackPACK's own test suite sees it too) and floods the log.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")

WORKLOADS = (
    "floor",
    "diag-score-mlp",
    "diag-score-cnn",
    "diag-exact-mlp",
    "diag-exact-cnn",
    "full-exact-mlps",
    "trace-exact-mlp",
    "variance-score-diag-mlp",
    "variance-hessian-diag-mlp",
    "penalty-step-mlp",
)
CONTENDERS = ("floor", "torchfim", "backpack", "nngeometry", "curvlinops", "plain", "torchfim-every10")
SWEEP_AXES = ("width", "batch", "classes", "n")


# =============================================================================== configuration
@dataclass(frozen=True)
class Config:
    n_inputs: int | None = None  # None: all 1797 digits
    batch_size: int = 256
    threads: int = 2
    reps: int = 5
    tol: float = 1e-4
    seed: int = 0
    mlp_a: tuple[int, ...] = (64, 256, 256, 10)
    mlp_s: tuple[int, ...] = (64, 32, 32, 10)
    cnn_channels: tuple[int, int] = (16, 32)
    hessian_budget_s: float = 60.0
    penalty_steps: int = 10
    lr: float = 0.01
    alpha: float = 0.1
    quick: bool = False
    # waiting for a quiet machine before each timed call (see contention_probe)
    quiet_threshold: float = 2.0
    quiet_wait_s: float = 60.0
    quiet_budget_s: float = 1800.0
    retries: int = 3
    max_inner: int = 10  # timed calls per round for a contender whose warm-up took under 0.3 s


QUICK = Config(
    n_inputs=64, batch_size=24, reps=2, mlp_a=(64, 24, 24, 10), mlp_s=(64, 8, 8, 10),
    cnn_channels=(4, 8), hessian_budget_s=20.0, quick=True, threads=1, quiet_wait_s=0.0, max_inner=1,
)


def arch(sizes: tuple[int, ...]) -> str:
    return "-".join(str(s) for s in sizes) + " tanh"


def make_mlp(sizes: tuple[int, ...], seed: int = 0) -> nn.Module:
    """Tanh MLP ``sizes[0] → … → sizes[-1]``, seeded."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def make_cnn(channels: tuple[int, int], seed: int = 0, classes: int = 10) -> nn.Module:
    """1×8×8 input → conv3×3 (c1, padding 1) → ReLU → conv3×3 (c2, padding 1) → ReLU → linear."""
    torch.manual_seed(seed)
    c1, c2 = channels
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * 64, classes),
    )


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@dataclass
class Data:
    batches: list[Tensor]
    targets: list[Tensor]

    @property
    def n(self) -> int:
        return sum(x.shape[0] for x in self.batches)


def load_data(cfg: Config, image: bool = False) -> Data:
    """The digits (first ``cfg.n_inputs``), as mini-batches; ``image``: shaped (1, 8, 8)."""
    from torchfim.datasets import load_digits

    X, y = load_digits(torch.float32)
    if cfg.n_inputs is not None:
        X, y = X[: cfg.n_inputs], y[: cfg.n_inputs]
    if image:
        X = X.reshape(-1, 1, 8, 8)
    return Data(list(X.split(cfg.batch_size)), list(y.split(cfg.batch_size)))


# =============================================================================== workloads
Runner = Callable[[], object]


@dataclass
class Contender:
    name: str
    make: Callable[[], Runner]  # setup (untimed) → runner (timed)
    compare: bool = True  # its result enters the agreement check
    per_call: int = 1  # one timed call covers this many units (training steps)


@dataclass
class Workload:
    name: str
    model: str  # architecture, for the report
    num_params: int
    contenders: list[Contender]
    ratio_to: str = "floor"
    notes: list[str] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)
    # for torchfim-only workloads: an independent check of torchfim's result → (rel. error, what)
    check: Callable[[object], tuple[float, str]] | None = None
    # replaces torchfim's own result in the agreement check (score labels that could not be aligned)
    reference_value: Tensor | None = None


def floor_contender(model: nn.Module, data: Data) -> Contender:
    """One forward + backward of the summed NLL (true labels) over all mini-batches."""

    def make() -> Runner:
        params = [p for p in model.parameters() if p.requires_grad]

        def run() -> None:
            for p in params:
                p.grad = None
            for x, y in zip(data.batches, data.targets):
                F.cross_entropy(model(x), y, reduction="sum").backward()
            for p in params:
                p.grad = None

        return run

    return Contender("floor", make, compare=False)


def peer_contenders(kind: str, model: nn.Module, data: Data, labels: list[Tensor], status: dict) -> tuple[list[Contender], dict[str, str]]:
    contenders, left_out = [], {}
    for name in ("backpack", "nngeometry", "curvlinops"):
        maker = peer_lib.MAKERS.get(kind, {}).get(name)
        if maker is None:
            left_out[name] = peer_lib.LEFT_OUT.get(kind, {}).get(name, f"{name} has no exact {kind} computation")
            continue
        if not status[name]["available"]:
            left_out[name] = f"{name} unavailable: {status[name]['error']}"
            continue
        contenders.append(Contender(name, lambda maker=maker: maker(model, data.batches, labels)))
    return contenders, left_out


def rel_error(a: object, b: object) -> float:
    """``‖a − b‖ / max(‖a‖, ‖b‖)`` over all entries (float64); NaN/Inf or a shape mismatch → inf."""
    a = torch.as_tensor(a).detach().to(torch.float64).reshape(-1).cpu()
    b = torch.as_tensor(b).detach().to(torch.float64).reshape(-1).cpu()
    if a.shape != b.shape or not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return math.inf
    diff = float((a - b).norm())
    scale = max(float(a.norm()), float(b.norm()))
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / scale


def torchfim_labels(model: nn.Module, data: Data, seed: int, tol: float) -> tuple[list[Tensor], str, Tensor | None]:
    """The labels torchfim's ``score`` estimator draws with ``Generator().manual_seed(seed)``.

    Tried in turn, each verified by recomputing torchfim's ``empirical`` estimator (the same
    outer product with the labels fixed) and comparing it with the ``score`` result:

    1. recorded: the labels returned by ``Family.sample`` during a run with a recording
       subclass of the categorical family (valid when that run gives the score result);
    2. replicated: ``Categorical().sample(o, 1, generator)`` per mini-batch in order, on outputs
       from a plain forward.

    Returns the labels, a note, and (when neither matches) torchfim's ``empirical`` result on
    the replicated labels to compare peers against instead of the ``score`` result.
    """

    def generator() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    score = torchfim.fisher(model, data.batches, estimator="score", structure="diag", n_samples=1,
                            generator=generator())
    sizes = [x.shape[0] for x in data.batches]
    candidates: list[tuple[str, list[Tensor]]] = []

    recorded: list[Tensor] = []

    class Recording(torchfim.families.Categorical):
        def sample(self, o, k, generator=None):  # noqa: D102
            y = super().sample(o, k, generator)
            recorded.append(y.detach().reshape(-1).clone())
            return y

    try:
        again = torchfim.fisher(model, data.batches, family=Recording(), estimator="score", structure="diag",
                                n_samples=1, generator=generator())
        if recorded and sum(r.numel() for r in recorded) == data.n and rel_error(again, score) < tol:
            candidates.append(("recorded", list(torch.cat(recorded).split(sizes))))
    except Exception:  # noqa: BLE001 - a family subclass may be refused by a fast path; try the next
        pass

    replicated, g = [], generator()
    with torch.no_grad():
        for x in data.batches:
            replicated.append(torchfim.families.Categorical().sample(model(x), 1, g).reshape(-1))
    candidates.append(("replicated", replicated))

    last = None
    for how, labels in candidates:
        empirical = torchfim.fisher(model, data.batches, estimator="empirical", structure="diag", targets=labels)
        err = rel_error(empirical, score)
        last = empirical
        if err < tol:
            return labels, (
                f"labels aligned ({how}): the peers get the labels torchfim draws with seed {seed}, one "
                f"per input; torchfim's estimator='empirical' on them reproduces its 'score' result "
                f"(rel. error {err:.1e})"
            ), None
    return replicated, (
        "labels NOT aligned: torchfim's score path draws labels in a way the harness could not "
        "reproduce, so the peers were compared with torchfim's estimator='empirical' on the "
        "replicated labels (the same formula with the labels fixed); the timed 'score' result "
        "itself was not compared"
    ), last


# ---------------------------------------------------------------------- workload builders
def build_floor(cfg: Config, status: dict) -> Workload:
    model, data = make_mlp(cfg.mlp_a, cfg.seed), load_data(cfg)
    return Workload("floor", f"MLP {arch(cfg.mlp_a)}", num_params(model), [floor_contender(model, data)],
                    notes=["one forward + backward of the summed NLL (true labels) over all mini-batches "
                           "of MLP-A; every other workload carries the floor of its own model"])


def _model(cfg: Config, which: str) -> tuple[nn.Module, Data, str]:
    if which == "cnn":
        c1, c2 = cfg.cnn_channels
        return make_cnn(cfg.cnn_channels, cfg.seed), load_data(cfg, image=True), f"CNN 1x8x8-conv{c1}-conv{c2}-10 relu"
    sizes = cfg.mlp_a if which == "mlp" else cfg.mlp_s
    return make_mlp(sizes, cfg.seed), load_data(cfg), f"MLP {arch(sizes)}"


def build_diag_score(cfg: Config, status: dict, which: str) -> Workload:
    model, data, desc = _model(cfg, which)
    seed = cfg.seed + 1
    labels, note, reference = torchfim_labels(model, data, seed, cfg.tol)

    def make_torchfim() -> Runner:
        return lambda: torchfim.fisher(model, data.batches, estimator="score", structure="diag", n_samples=1,
                                       generator=torch.Generator().manual_seed(seed))

    others, left_out = peer_contenders("diag-score", model, data, labels, status)
    notes = [note,
             "BackPACK: SumGradSquared of CrossEntropyLoss(reduction='sum') at those labels, divided by n; "
             "nngeometry: PMatDiag of the one-output function log p(ŷ|x) at those labels (what its "
             "FIM_MonteCarlo(trials=1) builds, which draws its own labels)"]
    return Workload(f"diag-score-{which}", desc, num_params(model),
                    [floor_contender(model, data), Contender("torchfim", make_torchfim), *others],
                    notes=notes, left_out=left_out, reference_value=reference)


def _torchfim_contender(model: nn.Module, data: Data, **kw) -> Contender:
    return Contender("torchfim", lambda: (lambda: torchfim.fisher(model, data.batches, **kw)))


def build_exact(cfg: Config, status: dict, kind: str, which: str) -> Workload:
    model, data, desc = _model(cfg, which)
    structure = kind.split("-")[0]
    others, left_out = peer_contenders(kind, model, data, data.targets, status)
    notes = []
    if kind == "full-exact":
        notes.append("curvlinops: GGNLinearOperator(check_deterministic=False, num_data=n) @ eye(P), the "
                     "operator built inside the timed call; BackPACK: SqrtGGNExact factors S, Σ SᵀS / n; "
                     "nngeometry: FIM(variant='classif_logits') in PMatDense")
    elif kind == "diag-exact":
        notes.append("BackPACK: DiagGGNExact; nngeometry: FIM(variant='classif_logits') in PMatDiag")
    else:
        notes.append("BackPACK: sum of DiagGGNExact; nngeometry: FIM(variant='classif_logits') in "
                     "PMatDiag, .trace()")
    suffix = {"mlp": "mlp", "cnn": "cnn", "mlps": "mlps"}[which]
    return Workload(f"{kind}-{suffix}", desc, num_params(model),
                    [floor_contender(model, data),
                     _torchfim_contender(model, data, estimator="exact", structure=structure),
                     *others],
                    notes=notes, left_out=left_out)


def score_variance_reference(model: nn.Module, data: Data) -> Tensor:
    """``Var(Î1)`` diagonal by enumerating the C labels, per-input gradients by ``torch.func`` (float64).

    ``Var = (1/n²) Σᵢ (Σ_c pᵢc gᵢc⁴ − (Σ_c pᵢc gᵢc²)²)`` with ``gᵢc = ∇θ log p(c|xᵢ)``: independent
    of torchfim's code (no output-score moments, no fourth-moment tensor).
    """
    from torch.func import functional_call, grad, vmap

    net = copy.deepcopy(model).double()
    params = {k: v.detach() for k, v in net.named_parameters()}

    def log_prob(p, x, c):
        return torch.log_softmax(functional_call(net, p, (x.unsqueeze(0),)).squeeze(0), -1)[c]

    per_input = vmap(grad(log_prob), in_dims=(None, 0, None))
    total, n = None, 0
    for x in data.batches:
        x = x.double()
        with torch.no_grad():
            probs = torch.softmax(net(x), -1)
        m2 = m4 = 0.0
        for c in range(probs.shape[1]):
            g = torch.cat([t.reshape(x.shape[0], -1) for t in per_input(params, x, c).values()], 1)
            w = probs[:, c : c + 1]
            g2 = g * g
            m2 = m2 + w * g2
            m4 = m4 + w * g2 * g2
        part = (m4 - m2 * m2).sum(0)
        total = part if total is None else total + part
        n += x.shape[0]
    return total / n**2


def hessian_variance_reference(model: nn.Module, data: Data, index: Tensor) -> Tensor:
    """``Var(Î2)_pp`` at the flat indices ``index``, by second directional derivatives (float64).

    ``Var(Î2)_pp = (1/n²) Σᵢ hᵢᵀ Λᵢ hᵢ`` with ``hᵢ = ∂²o(xᵢ)/∂θ_p²`` from nested ``torch.func.jvp``
    along ``e_p`` of the batched forward, one coordinate at a time.
    """
    from torch.func import functional_call, jvp

    net = copy.deepcopy(model).double()
    names = [k for k, _ in net.named_parameters()]
    base = [v.detach() for _, v in net.named_parameters()]
    sizes = [v.numel() for v in base]
    X = torch.cat(data.batches).double()
    with torch.no_grad():
        probs = torch.softmax(net(X), -1)
    lam = torch.diag_embed(probs) - probs.unsqueeze(2) * probs.unsqueeze(1)
    out = []
    for p in index.tolist():
        which, offset = 0, p
        while offset >= sizes[which]:
            offset -= sizes[which]
            which += 1
        direction = torch.zeros(sizes[which], dtype=torch.float64)
        direction[offset] = 1.0
        direction = direction.view_as(base[which])

        def outputs(t, which=which, direction=direction):
            params = dict(zip(names, base))
            params[names[which]] = base[which] + t * direction
            return functional_call(net, params, (X,))

        zero, one = torch.zeros((), dtype=torch.float64), torch.ones((), dtype=torch.float64)
        h = jvp(lambda t: jvp(outputs, (t,), (one,))[1], (zero,), (one,))[1]  # (n, C)
        out.append(torch.einsum("na,nab,nb->", h, lam, h) / X.shape[0] ** 2)
    return torch.stack(out)


def build_variance_score(cfg: Config, status: dict) -> Workload:
    model, data, desc = _model(cfg, "mlp")

    def make() -> Runner:
        return lambda: torchfim.fisher_variance(model, data.batches, estimator="score", structure="diag", n_samples=1)

    def check(result) -> tuple[float, str]:
        ref = score_variance_reference(model, data)
        return rel_error(result, ref), "enumeration over the 10 labels with per-input gradients (torch.func, float64)"

    return Workload("variance-score-diag-mlp", desc, num_params(model),
                    [floor_contender(model, data), Contender("torchfim", make)], check=check,
                    notes=["torchfim.fisher_variance(estimator='score', structure='diag', n_samples=1); no peer "
                           "computes it, so torchfim's result is checked against an independent enumeration"])


def build_variance_hessian(cfg: Config, status: dict) -> Workload:
    model, data, desc = _model(cfg, "mlp")
    notes = []

    def timed(net: nn.Module, inputs) -> float:
        t0 = time.perf_counter()
        torchfim.fisher_variance(net, inputs, estimator="hessian", structure="diag")
        return time.perf_counter() - t0

    # Probe on a slice of the data first: a repetition on MLP-A may take far more than a minute.
    X = torch.cat(data.batches)
    timed(model, X[:2])  # warm-up
    projected = 0.0
    for m in (min(64, data.n), min(cfg.batch_size, data.n)):
        projected = timed(model, X[:m]) * data.n / m
        if projected > cfg.hessian_budget_s:
            break
    if projected > cfg.hessian_budget_s:
        model, data, desc = _model(cfg, "mlps")
        notes.append(f"MLP-A ({arch(cfg.mlp_a)}) projected to {projected:.0f} s per repetition (> "
                     f"{cfg.hessian_budget_s:.0f} s, probed on a slice of the data), so this workload uses "
                     f"MLP-S ({arch(cfg.mlp_s)}) and its floor")
    else:
        notes.append(f"MLP-A projected to {projected:.1f} s per repetition (probe), within the "
                     f"{cfg.hessian_budget_s:.0f} s budget")

    def make() -> Runner:
        return lambda: torchfim.fisher_variance(model, data.batches, estimator="hessian", structure="diag", n_samples=1)

    gen = torch.Generator().manual_seed(cfg.seed)
    offsets, start = [], 0
    for p in model.parameters():
        k = min(8, p.numel())
        offsets.append(start + torch.randperm(p.numel(), generator=gen)[:k])
        start += p.numel()
    index = torch.cat(offsets).sort().values

    def check(result) -> tuple[float, str]:
        ref = hessian_variance_reference(model, data, index)
        return rel_error(result[index], ref), (
            f"{len(index)} coordinates (8 per parameter tensor) by nested torch.func.jvp of the batched "
            "forward, float64")

    notes.append("torchfim.fisher_variance(estimator='hessian', structure='diag', n_samples=1); no peer computes it")
    return Workload("variance-hessian-diag-mlp", desc, num_params(model),
                    [floor_contender(model, data), Contender("torchfim", make)], check=check, notes=notes)


def build_penalty(cfg: Config, status: dict) -> Workload:
    import torchfim.train  # raises ImportError when the training side is not there yet

    base, data, desc = _model(cfg, "mlp")
    steps = cfg.penalty_steps

    def contender(name: str, every: int | None) -> Contender:
        def make() -> Runner:
            model = copy.deepcopy(base)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
            pen = None if every is None else torchfim.train.FisherPenalty(
                model, family="categorical", alpha=cfg.alpha, every=every,
                generator=torch.Generator().manual_seed(cfg.seed))
            state = {"step": 0}

            def run() -> None:
                for _ in range(steps):
                    step = state["step"]
                    x = data.batches[step % len(data.batches)]
                    y = data.targets[step % len(data.targets)]
                    opt.zero_grad(set_to_none=True)
                    loss = F.cross_entropy(model(x), y)
                    if pen is not None:
                        loss = loss + pen(x, step=step)
                    loss.backward()
                    opt.step()
                    state["step"] = step + 1

            return run

        return Contender(name, make, compare=False, per_call=steps)

    def check(_result) -> tuple[float, str]:
        model = copy.deepcopy(base)
        x = data.batches[0]
        pen = torchfim.train.FisherPenalty(model, family="categorical", alpha=cfg.alpha, every=1,
                                           generator=torch.Generator().manual_seed(cfg.seed))
        value = pen(x, step=0)
        params = [p for p in model.parameters() if p.requires_grad]
        o = model(x)
        labels = torchfim.families.Categorical().sample(o, 1, torch.Generator().manual_seed(cfg.seed)).reshape(-1)
        grads = torch.autograd.grad(F.cross_entropy(o, labels), params)
        ref = cfg.alpha * sum((g * g).sum() for g in grads)
        return rel_error(value, ref), ("value at step 0 against α‖∇θ mean NLL(ŷ)‖² by autograd, with the "
                                       "labels drawn from the same seeded generator")

    return Workload("penalty-step-mlp", desc, num_params(base),
                    [contender("plain", None), contender("torchfim", 1), contender("torchfim-every10", 10)],
                    ratio_to="plain", check=check,
                    notes=[f"one SGD step (lr {cfg.lr}) on a mini-batch of {cfg.batch_size}, seconds per step as the "
                           f"mean over {steps} consecutive steps (cycling through the mini-batches); torchfim: "
                           f"FisherPenalty(alpha={cfg.alpha}, every=1), torchfim-every10: every=10 (one computed "
                           "step and nine reusing its gradient per 10 steps); ratios are to 'plain'"])


BUILDERS: dict[str, Callable[[Config, dict], Workload]] = {
    "floor": build_floor,
    "diag-score-mlp": lambda c, s: build_diag_score(c, s, "mlp"),
    "diag-score-cnn": lambda c, s: build_diag_score(c, s, "cnn"),
    "diag-exact-mlp": lambda c, s: build_exact(c, s, "diag-exact", "mlp"),
    "diag-exact-cnn": lambda c, s: build_exact(c, s, "diag-exact", "cnn"),
    "full-exact-mlps": lambda c, s: build_exact(c, s, "full-exact", "mlps"),
    "trace-exact-mlp": lambda c, s: build_exact(c, s, "trace-exact", "mlp"),
    "variance-score-diag-mlp": build_variance_score,
    "variance-hessian-diag-mlp": build_variance_hessian,
    "penalty-step-mlp": build_penalty,
}


# =============================================================================== agreement
def agreement(results: dict[str, object], tol: float, prefer: str = "torchfim") -> tuple[str | None, dict[str, float], dict[str, float]]:
    """Pivot, each result's rel. error to the pivot, and the flagged ones (outside the agreeing group).

    The pivot is the result that agrees with the most others (ties: ``prefer``); a result
    agreeing with the pivot passes. With two results that disagree the pivot is ``prefer`` and
    the other is flagged — the report says so, since two results cannot tell which is wrong.
    """
    names = list(results)
    if not names:
        return None, {}, {}
    err = {(a, b): rel_error(results[a], results[b]) for a in names for b in names if a < b}

    def e(a: str, b: str) -> float:
        return 0.0 if a == b else err[(a, b) if a < b else (b, a)]

    pivot = max(names, key=lambda c: (sum(e(c, d) < tol for d in names if d != c), c == prefer))
    errors = {c: e(c, pivot) for c in names if c != pivot}
    flagged = {c: v for c, v in errors.items() if not v < tol}
    return pivot, errors, flagged


# =============================================================================== timing
def contention_probe(threads: int) -> float:
    """How much slower a small parallel op runs on ``threads`` threads than on one, right now.

    ``torch.tanh`` of a 256×256 tensor, best of 3 bursts of 20. On an idle machine the ratio is
    about 1 or below; when other processes occupy the cores, each parallel region waits for a
    descheduled thread and the ratio climbs far above 1 (tens, on a busy 2-core machine), and
    every timing with ``threads > 1`` is inflated accordingly — the more small ops a contender
    issues, the more. Recorded before every timing round so the report can say how much to trust
    the numbers.
    """
    if threads <= 1:
        return 1.0
    a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0))

    def best(k: int) -> float:
        torch.set_num_threads(k)
        fastest = math.inf
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(20):
                torch.tanh(a)
            fastest = min(fastest, time.perf_counter() - t0)
        return fastest

    try:
        single = best(1)
        return best(threads) / max(single, 1e-9)
    finally:
        torch.set_num_threads(threads)


@dataclass
class Outcome:
    seconds: dict[str, float] = field(default_factory=dict)
    samples: dict[str, list[float]] = field(default_factory=dict)
    warmup: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)
    pivot: str | None = None
    flagged: dict[str, dict] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    check: dict | None = None
    contention: list[float] = field(default_factory=list)
    retried: int = 0
    clean: dict[str, list[bool]] = field(default_factory=dict)  # per sample: no contention around it
    contended_medians: list[str] = field(default_factory=list)  # medians that had to use contended calls


def _short_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) < 500 else text[:497] + "..."


def run_workload(wl: Workload, cfg: Config, bar, quiet: "Quiet") -> Outcome:
    out = Outcome()
    runners: dict[str, Runner] = {}
    results: dict[str, object] = {}
    by_name = {c.name: c for c in wl.contenders}
    for c in wl.contenders:
        bar.set_postfix_str(f"{wl.name}: {c.name} (warm-up)")
        try:
            runner = c.make()
            gc.collect()
            t0 = time.perf_counter()
            result = runner()
            out.warmup[c.name] = (time.perf_counter() - t0) / c.per_call
            runners[c.name] = runner
            if c.compare and result is not None:
                results[c.name] = result
        except Exception as exc:  # noqa: BLE001 - one contender's failure must not end the run
            out.errors[c.name] = _short_error(exc)
            traceback.print_exc(file=sys.stderr)
        bar.update(1)

    compared = dict(results)
    if wl.reference_value is not None and "torchfim" in compared:
        compared["torchfim"] = wl.reference_value
    if len(compared) >= 2:
        out.pivot, out.agreement, flagged = agreement(compared, cfg.tol)
        for name, err in flagged.items():
            out.flagged[name] = {"rel_error": err, "against": out.pivot,
                                 "reason": f"result differs from {out.pivot}'s by rel. error {err:.2e} "
                                           f"(≥ {cfg.tol:g}); time dropped"}
    if wl.check is not None and "torchfim" in runners:
        try:
            err, what = wl.check(results.get("torchfim"))
            out.check = {"rel_error": err, "against": what, "passed": err < cfg.tol}
            if not err < cfg.tol:
                out.flagged["torchfim"] = {"rel_error": err, "against": what,
                                           "reason": f"differs from the independent check by rel. error "
                                                     f"{err:.2e} (≥ {cfg.tol:g}); time dropped"}
        except Exception as exc:  # noqa: BLE001
            out.check = {"rel_error": None, "against": "check failed: " + _short_error(exc), "passed": None}
            traceback.print_exc(file=sys.stderr)

    timed = [c for c in runners if c not in out.flagged]
    bar.update(cfg.reps * (len(wl.contenders) - len(timed)))
    out.samples = {c: [] for c in timed}
    # Short calls are noisy: a contender whose warm-up took under 0.3 s is timed several times per
    # round (up to 10), each call one sample, so its median rests on more samples.
    inner = {c: max(1, min(cfg.max_inner, int(0.3 / max(out.warmup[c] * by_name[c].per_call, 1e-4))))
             for c in timed}
    for r in range(cfg.reps):
        order = timed[r % len(timed):] + timed[: r % len(timed)] if timed else []
        for name, k in ((n, k) for n in order for k in range(inner[n])):
            bar.set_postfix_str(f"{wl.name}: {name} ({r + 1}/{cfg.reps})")
            for attempt in range(1 + (cfg.retries if cfg.quiet_wait_s > 0 else 0)):
                before = quiet.wait(lambda: bar.set_postfix_str(f"{wl.name}: waiting for a quiet machine"))
                gc.collect()
                gc.disable()  # no collection pauses inside a timed call (garbage of another contender)
                try:
                    t0 = time.perf_counter()
                    runners[name]()
                    seconds = (time.perf_counter() - t0) / by_name[name].per_call
                finally:
                    gc.enable()
                after = contention_probe(cfg.threads)
                if max(before, after) <= cfg.quiet_threshold:
                    break
                out.retried += 1  # contention around this call: take it again
            clean = max(before, after) <= cfg.quiet_threshold
            out.samples[name].append(seconds)
            out.clean.setdefault(name, []).append(clean)
            out.contention.append(max(before, after))
            if k == inner[name] - 1:
                bar.update(1)
    # The median over the calls that ran on a quiet machine, when there are at least five of them
    # (or all of the calls were clean); otherwise over all calls, and the report says so.
    for c in timed:
        kept = [t for t, ok in zip(out.samples[c], out.clean[c]) if ok]
        if len(kept) < min(5, len(out.samples[c])):
            kept = out.samples[c]
            out.contended_medians.append(c)
        out.seconds[c] = statistics.median(kept)
    return out


class Quiet:
    """Waits, before a timed call, until the contention probe is at most ``cfg.quiet_threshold``.

    At most ``cfg.quiet_wait_s`` per call and ``cfg.quiet_budget_s`` over the whole run; then
    it times anyway (and the probe value goes to the report).
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.budget = cfg.quiet_budget_s
        self.waited = 0.0

    def wait(self, notify: Callable[[], None] | None = None) -> float:
        probe = contention_probe(self.cfg.threads)
        spent = 0.0
        while probe > self.cfg.quiet_threshold and spent < self.cfg.quiet_wait_s and self.budget > 0:
            if notify is not None and spent == 0.0:
                notify()
            time.sleep(2.0)
            spent += 2.0
            self.budget -= 2.0
            self.waited += 2.0
            probe = contention_probe(self.cfg.threads)
        return probe



# =============================================================================== sweep
def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sweep_point(spec: dict) -> dict:
    """Time and peak memory of one ``torchfim.fisher(exact, diag)`` call; run in a fresh process.

    Peak memory: tracemalloc sees only Python allocations, not torch's (C++) buffers, so the
    process's resident set is measured instead. After imports, data, model and a tiny warm-up
    call (which loads code and allocator pools, not the call's working memory), the kernel's
    peak-RSS mark is reset (``/proc/self/clear_refs``) and the current RSS taken as the baseline;
    the reported peak is ``VmHWM`` after the first full call minus that baseline. Where the reset
    is unsupported, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after is used
    (which can only under-report, if an earlier step had a higher peak).
    """
    import resource

    torch.set_num_threads(int(spec.get("threads", 2)))
    width, classes, batch, n = int(spec["width"]), int(spec["classes"]), int(spec["batch"]), int(spec["n"])
    if spec.get("data") == "digits":
        from torchfim.datasets import load_digits

        X = load_digits(torch.float32)[0][:n]
    else:
        X = torch.randn(n, 64, generator=torch.Generator().manual_seed(0))
    model = make_mlp((64, width, width, classes), seed=0)
    batches = list(X.split(batch))
    torchfim.fisher(make_mlp((64, 2, 2, classes), seed=0), X[:2], estimator="exact", structure="diag")
    gc.collect()
    reset = _reset_peak()
    base_kib = _rss_kib("VmRSS") if reset else None
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    torchfim.fisher(model, batches, estimator="exact", structure="diag")
    cold = time.perf_counter() - t0
    if reset and base_kib is not None and _rss_kib("VmHWM") is not None:
        peak_kib, method = _rss_kib("VmHWM") - base_kib, "VmHWM after reset"
    else:
        peak_kib, method = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before, "ru_maxrss"
    if spec.get("memory_only"):
        return {**spec, "P": num_params(model), "cold_seconds": cold, "peak_mib": peak_kib / 1024,
                "memory_method": method}
    reps = 1 if cold > 5 else int(spec.get("reps", 3))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        torchfim.fisher(model, batches, estimator="exact", structure="diag")
        times.append(time.perf_counter() - t0)
    return {**spec, "P": num_params(model), "seconds": statistics.median(times), "cold_seconds": cold,
            "peak_mib": peak_kib / 1024, "memory_method": method}


def sweep_specs(quick: bool) -> list[dict]:
    if quick:
        return [
            {"axis": "width", "width": 8, "classes": 10, "batch": 32, "n": 64, "data": "digits"},
            {"axis": "width", "width": 32, "classes": 10, "batch": 32, "n": 64, "data": "digits"},
            {"axis": "n", "width": 16, "classes": 10, "batch": 32, "n": 64, "data": "random"},
            {"axis": "n", "width": 16, "classes": 10, "batch": 32, "n": 128, "data": "random"},
        ]
    specs = []
    for w in (8, 16, 32, 64, 128, 256, 512, 1024):
        specs.append({"axis": "width", "width": w, "classes": 10, "batch": 256, "n": 1797, "data": "digits"})
    for b in (16, 32, 64, 128, 256, 512, 1024, 1797):
        specs.append({"axis": "batch", "width": 256, "classes": 10, "batch": b, "n": 1797, "data": "digits"})
    for c in (2, 5, 10, 20, 50, 100, 200):
        specs.append({"axis": "classes", "width": 256, "classes": c, "batch": 256, "n": 1797, "data": "digits"})
    for n in (256, 512, 1024, 2048, 4096, 8192, 16384):
        specs.append({"axis": "n", "width": 256, "classes": 10, "batch": 256, "n": n, "data": "random"})
    return specs


#: glibc malloc settings for the "live memory" measurement: blocks ≥ 64 KiB come from mmap and go
#: back to the OS when freed, and the heap is trimmed on every free, so the peak resident set
#: follows the memory actually in use instead of heap fragmentation (which, with glibc's defaults,
#: lets the resident set creep up by some MiB over many mini-batches even when nothing is kept).
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def _sweep_subprocess(spec: dict, env: dict | None, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--sweep-point", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT),
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout:.0f} s"}
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("SWEEP-POINT ")]
    if proc.returncode != 0 or not line:
        return {**spec, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(line[-1][len("SWEEP-POINT "):])


def run_sweep(cfg: Config, quiet: Quiet, timeout: float = 600.0, progress: bool = True) -> list[dict]:
    """Each point twice, each time in a fresh process: timing and peak RSS with glibc's default
    malloc (``peak_mib``), then peak RSS only with :data:`LIVE_MALLOC_ENV` (``peak_live_mib``)."""
    points = []
    for spec in tqdm(sweep_specs(cfg.quick), desc="sweep", unit="point", disable=not progress):
        spec = {**spec, "threads": cfg.threads}
        for _ in range(1 + (cfg.retries if cfg.quiet_wait_s > 0 else 0)):
            before = quiet.wait() if cfg.quiet_wait_s > 0 else contention_probe(cfg.threads)
            point = _sweep_subprocess(spec, None, timeout)
            point["contention"] = max(before, contention_probe(cfg.threads))
            if point["contention"] <= cfg.quiet_threshold or "error" in point:
                break
        if "error" not in point:
            live = _sweep_subprocess({**spec, "memory_only": True}, LIVE_MALLOC_ENV, timeout)
            point["peak_live_mib"] = live.get("peak_mib")
            if "error" in live:
                point["live_error"] = live["error"]
        points.append(point)
    return points


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    sxx = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / sxx if sxx else None


def plot_sweep(points: list[dict], plot_dir: Path) -> dict[str, str]:
    """One PNG per axis (time and peak memory panels); returns axis → file path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plot_dir.mkdir(parents=True, exist_ok=True)
    labels = {
        "width": ("number of parameters P (MLP 64-w-w-10, w = 8…1024)", "P"),
        "batch": ("mini-batch size (MLP-A, 1797 inputs)", "batch"),
        "classes": ("number of classes C (MLP 64-256-256-C, 1797 inputs)", "classes"),
        "n": ("data-set size n (MLP-A, random inputs, mini-batches of 256)", "n"),
    }
    files = {}
    for axis in SWEEP_AXES:
        pts = sorted((p for p in points if p.get("axis") == axis and "error" not in p),
                     key=lambda p: p[labels[axis][1]])
        if not pts:
            continue
        xs = [p[labels[axis][1]] for p in pts]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
        ax_t.plot(xs, [p["seconds"] for p in pts], "o-", label="torchfim diag/exact")
        live = [(x, _live(p)) for x, p in zip(xs, pts) if _live(p) is not None]
        if live:
            ax_m.plot([x for x, _ in live], [m for _, m in live], "o-", color="C1",
                      label="peak above baseline, live memory (malloc: mmap ≥ 64 KiB, trim)")
        ax_m.plot(xs, [p["peak_mib"] for p in pts], "s--", color="C2", alpha=0.7, markersize=4,
                  label="peak above baseline, glibc malloc defaults")
        if axis == "width":
            top = live[-1][1] if live else pts[-1]["peak_mib"]
            ref = top / xs[-1]
            ax_m.plot(xs, [ref * x for x in xs], "--", color="gray", label="∝ P (through the largest)")
            ax_m.plot(xs, [4 * x / 2**20 for x in xs], ":", color="gray", label="one float32 P-vector")
        for ax in (ax_t, ax_m):
            ax.set_xscale("log")
            ax.set_xlabel(labels[axis][0], fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        if axis in ("width", "n", "classes"):
            ax_t.set_yscale("log")
        if axis == "width":
            ax_m.set_yscale("log")
        else:
            ax_m.set_ylim(bottom=0)
        ax_t.set_ylabel("seconds (median)")
        ax_m.set_ylabel("MiB")
        ax_m.legend(fontsize=7)
        fig.suptitle(f"torchfim.fisher(estimator='exact', structure='diag') vs {axis}", fontsize=10)
        fig.tight_layout()
        path = plot_dir / f"sweep-{axis}.png"
        fd, tmp = tempfile.mkstemp(dir=plot_dir, prefix=f".sweep-{axis}.", suffix=".png")
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=110)
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)
        files[axis] = str(path)
    return files


# =============================================================================== targets
def _ratio(main: dict, w1: str, c1: str, w2: str, c2: str) -> float | None:
    a, b = main.get(w1, {}).get(c1), main.get(w2, {}).get(c2)
    return a / b if a is not None and b else None


def evaluate_targets(main: dict, sweep: list[dict]) -> list[dict]:
    targets = []

    def add(text: str, value: float | None, limit: float, strict: bool = False, unit: str = "×", why: str = "") -> None:
        if value is None:
            status = "n/a"
        else:
            status = "met" if (value < limit if strict else value <= limit) else "missed"
        targets.append({"target": text, "value": value, "limit": limit, "strict": strict, "unit": unit,
                        "status": status, "note": why})

    for which, label in (("mlp", "MLP-A"), ("cnn", "CNN")):
        w = f"diag-score-{which}"
        add(f"diag/score (1 label), {label}: torchfim ≤ 1.5× floor", _ratio(main, w, "torchfim", w, "floor"), 1.5)
        add(f"diag/score (1 label), {label}: torchfim faster than nngeometry",
            _ratio(main, w, "torchfim", w, "nngeometry"), 1.0, strict=True)
        add(f"diag/score (1 label), {label}: torchfim faster than BackPACK",
            _ratio(main, w, "torchfim", w, "backpack"), 1.0, strict=True)
    for which, label in (("mlp", "MLP-A"), ("cnn", "CNN")):
        w = f"diag-exact-{which}"
        add(f"diag/exact, {label}: torchfim ≤ 4× floor", _ratio(main, w, "torchfim", w, "floor"), 4.0)
        add(f"diag/exact, {label}: torchfim ≤ 0.6× BackPACK DiagGGNExact",
            _ratio(main, w, "torchfim", w, "backpack"), 0.6)
    add("full/exact, MLP-S: torchfim ≤ 0.5× curvlinops dense GGN",
        _ratio(main, "full-exact-mlps", "torchfim", "full-exact-mlps", "curvlinops"), 0.5)
    # Two workloads, timed minutes apart: each time is divided by the floor of its own workload (the
    # same MLP-A), so that a change in the machine's speed between them cancels out.
    var_floor = _ratio(main, "variance-score-diag-mlp", "torchfim", "variance-score-diag-mlp", "floor")
    exact_floor = _ratio(main, "diag-exact-mlp", "torchfim", "diag-exact-mlp", "floor")
    add("fisher_variance diag/score ≤ 2× torchfim's own diag/exact (MLP-A)",
        var_floor / exact_floor if var_floor is not None and exact_floor else None, 2.0,
        why="the two are different workloads, timed minutes apart, so the ratio is taken between their "
            "ratios to the floor (the same MLP-A in both), which cancels changes in the machine's speed")
    add("penalty step, every=1: ≤ 2× plain SGD step",
        _ratio(main, "penalty-step-mlp", "torchfim", "penalty-step-mlp", "plain"), 2.0)
    add("penalty step, every=10: ≤ 1.2× plain SGD step",
        _ratio(main, "penalty-step-mlp", "torchfim-every10", "penalty-step-mlp", "plain"), 1.2)

    width = sorted((p for p in sweep if p.get("axis") == "width" and _live(p) is not None), key=lambda p: p["P"])
    upper = [p for p in width if p["P"] >= 1e4] or width
    slope = loglog_slope([p["P"] for p in upper], [_live(p) for p in upper])
    add("peak memory of diag/exact at most linear in P (log-log slope of live peak vs P, P ≥ 1e4)", slope, 1.1,
        unit="", why="slope ≤ 1.1: no faster than linear; a fixed-size chunk of per-sample products makes "
                     "it sub-linear for small P")
    sizes = sorted((p for p in sweep if p.get("axis") == "n" and _live(p) is not None), key=lambda p: p["n"])
    growth = None
    if len(sizes) >= 2:
        growth = _live(sizes[-1]) / max(_live(sizes[0]), 1e-9)
    add("peak memory of diag/exact not growing with data-set size (live peak at the largest n / at the smallest)",
        growth, 1.25, why="≤ 1.25: flat, over a 64-fold range of n; the data set itself is allocated before the "
                         "baseline; the glibc-default peaks, which creep up by a few MiB through heap "
                         "fragmentation, are in the sweep table")
    return targets


def _live(point: dict) -> float | None:
    """The live-memory peak of a sweep point (None when it was not measured)."""
    if "error" in point:
        return None
    return point.get("peak_live_mib")


# =============================================================================== output
def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def details_path(json_path: Path) -> Path:
    json_path = Path(json_path)
    stem = json_path.name[:-5] if json_path.name.endswith(".json") else json_path.name
    return json_path.with_name(stem + ".details.json")


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def environment(cfg: Config, status: dict) -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    dirty = _git("status", "--porcelain", "--", "torchfim")
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchfim": getattr(torchfim, "__version__", None),
        "torchfim_commit": _git("rev-parse", "--short", "HEAD"),
        "torchfim_uncommitted_changes": bool(dirty),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "peers": status,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
    }


@dataclass
class Report:
    main: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)

    def write(self, json_path: Path | None) -> None:
        if json_path is None:
            return
        atomic_write_text(Path(json_path), json.dumps(self.main, indent=2) + "\n")
        atomic_write_text(details_path(json_path), json.dumps(self.details, indent=2, default=str) + "\n")


def _fmt_s(s: float) -> str:
    if s >= 100:
        return f"{s:.0f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} µs"


def _fmt_value(t: dict) -> str:
    v = t["value"]
    if v is None:
        return "—"
    return f"{v:.2f}{t['unit']}"


def summary_table(main: dict, details: dict) -> str:
    """Markdown table: rows workloads, columns contenders, cells seconds (ratio)."""
    ratios, flagged, errors, left = (details.get(k, {}) for k in ("ratios", "flagged", "errors", "left_out"))
    cols = [c for c in CONTENDERS if any(c in main.get(w, {}) or c in flagged.get(w, {}) or c in errors.get(w, {})
                                          for w in main)]
    contention = details.get("contention", {})
    show_c = any(contention.get(w) for w in main)
    lines = ["| workload | model (P) | " + " | ".join(f"`{c}`" for c in cols) + " |" + (" contention |" if show_c else ""),
             "| --- | --- |" + " --- |" * (len(cols) + show_c)]
    for w in WORKLOADS:
        if w not in main and w not in details.get("skipped", {}):
            continue
        model = details.get("models", {}).get(w, {})
        desc = f"{model.get('arch', '')} ({model.get('P', 0):,})" if model else ""
        if w in details.get("skipped", {}):
            lines.append(f"| `{w}` | skipped: {details['skipped'][w]} |" + " |" * (len(cols) + show_c))
            continue
        cells = []
        for c in cols:
            if c in main[w]:
                r = ratios.get(w, {}).get(c)
                cells.append(_fmt_s(main[w][c]) + (f" ({r:.2f}×)" if r is not None and c != details.get("ratio_reference", {}).get(w) else ""))
            elif c in flagged.get(w, {}):
                cells.append(f"✗ disagrees ({flagged[w][c]['rel_error']:.1e})")
            elif c in errors.get(w, {}):
                cells.append("error")
            elif c in left.get(w, {}):
                cells.append("n/a")
            else:
                cells.append("")
        if show_c:
            probes = contention.get(w) or []
            cells.append(f"{statistics.median(probes):.1f}×" if probes else "")
        lines.append(f"| `{w}` | {desc} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(main: dict, details: dict, md_path: Path, plot_files: dict[str, str] | None) -> str:
    env = details.get("environment", {})
    cfg = env.get("config", {})
    reps = cfg.get("reps")
    out = []
    out.append("# Performance\n")
    out.append("<!-- Generated by benchmarks/run.py; edit that script, not this file. -->\n")
    out.append(
        "How fast torchfim computes Fisher information compared with the cost of one training pass "
        "(the *floor*) and with the peer libraries BackPACK, nngeometry and curvlinops, on "
        "scikit-learn's digits ("
        + (f"the first {details.get('n_inputs')} of 1797 inputs" if details.get("n_inputs", 1797) < 1797
           else "all 1797 inputs")
        + f", mini-batches of {cfg.get('batch_size')}, "
        f"`torch.set_num_threads({cfg.get('threads')})`, float32). Every number on this page comes "
        "from one run of the benchmark script; the targets are evaluated on the same run.\n")
    out.append("## Results\n")
    out.append(f"Median seconds over {reps} rounds of repetitions after a warm-up (a contender whose warm-up "
               "took under 0.3 s is timed up to 10 times per round); in parentheses the ratio to the "
               "floor of the same model (for `penalty-step-mlp`, to the `plain` step). `n/a`: the peer has "
               "no exact computation of that quantity; `✗ disagrees`: the result failed the agreement check "
               "(relative error in parentheses) and its time was dropped.\n")
    out.append(summary_table(main, details) + "\n")
    probes = [statistics.median(v) for v in details.get("contention", {}).values() if v]
    if probes:
        out.append(f"`contention`: median over the timed calls of a probe taken just before and just after each "
                   f"call (the larger of the two), the time of a small parallel op (`tanh` of 256×256) on "
                   f"{cfg.get('threads')} threads divided by its time on one thread: about 1 or below on an idle "
                   "machine, far above when other jobs hold the cores.\n")
    if probes and max(probes) > 2.0:
        out.append(f"> **Busy machine: treat these timings with caution.** The contention probe reached "
                   f"{max(probes):.1f}× (median per workload up to that) because other jobs were running on the "
                   f"{env.get('cpu_count')} logical CPUs during this run. With more torch threads than free "
                   "cores, every parallel op waits for a descheduled thread, so all times are inflated, and "
                   "unevenly: a contender that issues many small ops suffers more than one that issues few "
                   "large ones. The interleaved repetitions spread the load over all contenders, but ratios "
                   "(and the met/missed verdicts) can move by a factor of 2 or more on an idle machine; rerun "
                   "there before drawing conclusions. The raw samples and probes are in the details JSON.\n")
    models = details.get("models", {})
    out.append("Models: MLP-A = 64-256-256-10 tanh, MLP-S = 64-32-32-10 tanh, CNN = 1×8×8 → conv 3×3 (16, "
               "padding 1) → ReLU → conv 3×3 (32, padding 1) → ReLU → linear to 10"
               + (" (this run: quick sizes)" if cfg.get("quick") else "") + ".\n")

    out.append("## Targets\n")
    out.append("Ratios of medians from the table above (`n/a`: a contender it needs is missing from this "
               "run).\n")
    out.append("| target | this run | limit | status |\n| --- | --- | --- | --- |")
    footnotes = []
    for t in details.get("targets", []):
        limit = ("< " if t["strict"] else "≤ ") + f"{t['limit']:g}{t['unit']}"
        mark = {"met": "**met**", "missed": "**missed**", "n/a": "n/a"}[t["status"]]
        mark_note = ""
        if t.get("note"):
            footnotes.append(t["note"])
            mark_note = f" [{len(footnotes)}]"
        out.append(f"| {t['target']}{mark_note} | {_fmt_value(t)} | {limit} | {mark} |")
    out.append("")
    for i, note in enumerate(footnotes, 1):
        out.append(f"[{i}] {note}  ")
    out.append("")

    out.append("## Agreement\n")
    out.append(f"Before any time is trusted, every contender's result is compared with the others: relative "
               f"error `‖a − b‖ / max(‖a‖, ‖b‖)` over all entries, limit {cfg.get('tol', 1e-4):g} in float32. "
               "The pivot is the result that agrees with the most others (ties: torchfim). Workloads that "
               "only torchfim computes are checked against an independent computation instead.\n")
    out.append("| workload | compared with | relative error | result |\n| --- | --- | --- | --- |")
    for w in WORKLOADS:
        if w not in main:
            continue
        pivot = details.get("pivot", {}).get(w)
        for c, err in details.get("agreement", {}).get(w, {}).items():
            ok = c not in details.get("flagged", {}).get(w, {})
            out.append(f"| `{w}` | `{c}` vs `{pivot}` | {err:.1e} | {'agrees' if ok else '**flagged**'} |")
        chk = details.get("checks", {}).get(w)
        if chk:
            err = chk.get("rel_error")
            res = "agrees" if chk.get("passed") else ("**flagged**" if chk.get("passed") is False else "not run")
            out.append(f"| `{w}` | `torchfim` vs {chk['against']} | {'—' if err is None else f'{err:.1e}'} | {res} |")
    out.append("")

    notes = details.get("notes", {})
    left = details.get("left_out", {})
    errs = details.get("errors", {})
    if any(notes.values()) or any(left.values()) or any(errs.values()):
        out.append("## Notes per workload\n")
        for w in WORKLOADS:
            items = list(notes.get(w, []))
            items += [f"{c} left out: {why}" for c, why in left.get(w, {}).items()]
            items += [f"{c} raised: `{e}`" for c, e in errs.get(w, {}).items()]
            if items:
                out.append(f"- `{w}`: " + "; ".join(items))
        out.append("")

    sweep = details.get("sweep", [])
    if sweep:
        out.append("## Scaling of diag/exact\n")
        out.append("`torchfim.fisher(model, batches, estimator='exact', structure='diag')` on tanh MLPs "
                   "64-w-w-C, one point per fresh process. Time: median of warm calls. Peak memory: the "
                   "process's peak resident set during the first call above the resident set just before it "
                   "(after imports, data, model and a tiny warm-up call), measured by resetting the kernel's "
                   "peak mark (`/proc/self/clear_refs`, then `VmHWM`); `tracemalloc` cannot see torch's "
                   "buffers. Each point runs twice, each time in a fresh process (a clean allocator, nothing "
                   "cached from other points): once with glibc's default malloc, which gives the time and the "
                   "*default* peak, and once with `MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0`, "
                   "under which freed buffers go back to the OS at once, so that the *live* peak follows the "
                   "memory actually in use rather than heap fragmentation (these settings slow the call, so "
                   "that run is not timed). The memory targets use the live peak.\n")
        base = Path(md_path).parent
        for axis in SWEEP_AXES:
            if plot_files and axis in plot_files:
                rel = os.path.relpath(plot_files[axis], base)
                out.append(f"![diag/exact vs {axis}]({rel})\n")
        out.append("| axis | P | width | classes | batch | n | seconds | live peak MiB | default peak MiB | "
                   "contention |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for p in sweep:
            if "error" in p:
                out.append(f"| {p['axis']} | | {p['width']} | {p['classes']} | {p['batch']} | {p['n']} | "
                           f"error: {p['error']} | | | |")
            else:
                live = _live(p)
                out.append(f"| {p['axis']} | {p['P']:,} | {p['width']} | {p['classes']} | {p['batch']} | {p['n']} | "
                           f"{_fmt_s(p['seconds'])} | {'—' if live is None else f'{live:.1f}'} | "
                           f"{p['peak_mib']:.1f} | {p.get('contention', float('nan')):.1f}× |")
        out.append("")

    out.append("## Environment\n")
    def loads(v):
        return "/".join(f"{x:.1f}" for x in v) if v else "?"

    load_s, load_e = env.get("load_average_start"), env.get("load_average_end")
    out.append(f"- {env.get('cpu')} ({env.get('cpu_count')} logical CPUs), torch threads: {env.get('torch_threads')}; "
               f"load average (1/5/15 min) {loads(load_s)} at the start, {loads(load_e)} at the end")
    out.append(f"- Python {env.get('python')}, torch {env.get('torch')}, torchfim {env.get('torchfim')} "
               f"(commit {env.get('torchfim_commit')}"
               + (", with uncommitted changes in torchfim/" if env.get("torchfim_uncommitted_changes") else "") + ")")
    for name, st in env.get("peers", {}).items():
        state = f"{st.get('version')}" if st.get("available") else f"not used: {st.get('error')}"
        out.append(f"- {st.get('distribution', name)}: {state}")
    out.append(f"- run date {env.get('date')}, total {details.get('total_seconds', 0):.0f} s\n")

    out.append("## How the numbers are taken\n")
    out.append(
        "- Each contender is built once (untimed: `backpack.extend`, a `DataLoader` for nngeometry, model "
        "copies), run once as the warm-up whose result goes to the agreement check, then timed over the "
        "repetitions, interleaved (round r runs the contenders in an order rotated by r) so that load "
        "changes on the machine hit every contender alike; the median is reported.\n"
        f"- Other jobs on the machine: before each timed call the harness waits (up to "
        f"{cfg.get('quiet_wait_s', 0):g} s per call, {cfg.get('quiet_budget_s', 0):g} s per run) until the "
        f"contention probe is at most {cfg.get('quiet_threshold', 2):g}, and it retakes a call (up to "
        f"{cfg.get('retries', 0)} times) when the probe after it is above that; the median is taken over "
        "the calls with a quiet probe before and after (when at least five), so that bursts of other work "
        f"do not leak into it. This run waited {details.get('waited_for_quiet_seconds', 0):.0f} s, retook "
        f"{sum(details.get('retried', {}).values())} calls and left out "
        f"{sum(v.count(False) for w in details.get('clean', {}).values() for v in w.values())} contended "
        "ones.\n"
        "- `floor`: one forward and backward of the summed NLL (true labels) over all mini-batches of the "
        "workload's model.\n"
        "- Score estimator with one label per input: torchfim draws the labels from its seeded generator; "
        "the harness recovers exactly those labels (and verifies them by reproducing torchfim's result with "
        "`estimator='empirical'` on them) and hands them to the peers, so the stochastic results are "
        "compared entry by entry, not in expectation.\n"
        "- Peers that cannot compute a quantity exactly (curvlinops has only stochastic diagonal and trace "
        "estimators) are left out rather than timed on something else.\n"
        "- Raw samples, per-contender warm-up times, ratios and all errors are in the details JSON written "
        "next to `--json`.\n")
    out.append("## Rerun\n")
    out.append("```bash\n.venv/bin/pip install -c constraints.txt -e '.[bench]' && "
               ".venv/bin/python benchmarks/run.py --json bench.json --markdown docs/performance.md\n```\n")
    out.append("`--quick` runs tiny sizes in seconds (what `tests/test_benchmarks.py` does); `--workloads a,b` "
               "picks workloads; `--no-sweep` skips the sweep; `--render bench.json --markdown FILE` rewrites "
               "this page from a finished run. Timings depend on the machine and on its load; compare ratios, "
               "not seconds, across machines.\n")
    return "\n".join(out)


# =============================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write {workload: {contender: seconds}} here (+ .details.json)")
    ap.add_argument("--markdown", type=Path, help="write the report (docs/performance.md) here")
    ap.add_argument("--plots", type=Path, help="directory for the sweep PNGs (default: <markdown dir>/performance)")
    ap.add_argument("--quick", action="store_true", help="tiny sizes, for the smoke test")
    ap.add_argument("--reps", type=int, help="timed repetitions per contender (default 5; --quick 3)")
    ap.add_argument("--workloads", default="all", help="comma-separated workload names, 'all' or 'none'")
    ap.add_argument("--sweep", action="store_true", help="run the scaling sweep (implied by --markdown)")
    ap.add_argument("--no-sweep", action="store_true", help="skip the sweep even with --markdown")
    ap.add_argument("--threads", type=int, help="torch threads (default 2; --quick 1)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--quiet-wait", type=float,
                    help="before each timed call wait up to this many seconds for other jobs to leave the "
                         "cores free, and retake a call that ran under contention (default 60; --quick 0: off)")
    ap.add_argument("--quiet-budget", type=float, help="total seconds of such waiting per run (default 1800)")
    ap.add_argument("--render", type=Path, help="re-render --markdown from this finished run's --json file")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--sweep-point", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        ap.error("--reps must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sweep_point:
        print("SWEEP-POINT " + json.dumps(sweep_point(json.loads(args.sweep_point))), flush=True)
        return 0

    if args.render:
        main_map = json.loads(Path(args.render).read_text())
        details = json.loads(details_path(args.render).read_text())
        details["targets"] = evaluate_targets(main_map, details.get("sweep", []))
        if args.markdown:
            plots = details.get("plots") or {}
            if details.get("sweep"):  # redraw from the stored points (the plotting code may have changed)
                plots = plot_sweep(details["sweep"], args.plots or (args.markdown.parent / "performance"))
            atomic_write_text(args.markdown, render_markdown(main_map, details, args.markdown, plots))
            print(f"wrote {args.markdown}")
        print(summary_table(main_map, details))
        return 0

    cfg = QUICK if args.quick else Config()
    cfg = replace(cfg, tol=args.tol, **({"reps": args.reps} if args.reps else {}),
                  **({"threads": args.threads} if args.threads else {}),
                  **({"quiet_wait_s": args.quiet_wait} if args.quiet_wait is not None else {}),
                  **({"quiet_budget_s": args.quiet_budget} if args.quiet_budget is not None else {}))
    torch.set_num_threads(cfg.threads)
    if args.workloads == "all":
        names = list(WORKLOADS)
    elif args.workloads == "none":
        names = []
    else:
        names = [w.strip() for w in args.workloads.split(",") if w.strip()]
        unknown = [w for w in names if w not in WORKLOADS]
        if unknown:
            print(f"unknown workload(s) {unknown}; choose from {', '.join(WORKLOADS)}", file=sys.stderr)
            return 2
    do_sweep = (args.sweep or args.markdown is not None) and not args.no_sweep

    quiet = Quiet(cfg)
    start = time.perf_counter()
    status = peer_lib.peer_status()
    load_data(cfg)  # imports scikit-learn
    # Move everything allocated by the imports to the permanent generation: gc.collect() before
    # each timed call then costs microseconds instead of a scan of the whole heap.
    gc.collect()
    gc.freeze()
    report = Report()
    d = report.details
    d.update({"about": "sibling of the --json mapping {workload: {contender: median seconds}}",
              "environment": environment(cfg, status), "n_inputs": load_data(cfg).n,
              "ratios": {}, "ratio_reference": {}, "agreement": {}, "pivot": {}, "checks": {}, "flagged": {},
              "errors": {}, "left_out": {}, "notes": {}, "skipped": {}, "models": {}, "samples": {},
              "warmup_seconds": {}, "contention": {}, "retried": {}, "clean": {}, "targets": [], "sweep": [], "plots": {}})
    for name, st in status.items():
        if not st["available"]:
            print(f"peer {name}: {st['error']}", file=sys.stderr)

    # progress: one tick per warm-up and per timed repetition of each contender
    bar = tqdm(total=0, desc="benchmarks", unit="run", disable=args.no_progress)
    for name in names:
        bar.set_postfix_str(f"{name}: building")
        try:
            wl = BUILDERS[name](cfg, status)
        except ImportError as exc:
            d["skipped"][name] = f"{type(exc).__name__}: {exc}"
            report.write(args.json)
            continue
        except Exception as exc:  # noqa: BLE001
            d["skipped"][name] = "building the workload failed: " + _short_error(exc)
            traceback.print_exc(file=sys.stderr)
            report.write(args.json)
            continue
        bar.total += len(wl.contenders) * (1 + cfg.reps)
        bar.refresh()
        out = run_workload(wl, cfg, bar, quiet)
        report.main[name] = out.seconds
        ref = out.seconds.get(wl.ratio_to)
        d["ratios"][name] = {c: (s / ref if ref else None) for c, s in out.seconds.items()}
        d["ratio_reference"][name] = wl.ratio_to
        d["agreement"][name] = out.agreement
        d["pivot"][name] = out.pivot
        if out.check is not None:
            d["checks"][name] = out.check
        d["flagged"][name] = out.flagged
        d["errors"][name] = out.errors
        d["left_out"][name] = wl.left_out
        d["notes"][name] = wl.notes + ([f"only two results, which disagree: {', '.join(out.flagged)} flagged by "
                                        "convention (torchfim is the pivot), which of the two is wrong is open"]
                                       if out.flagged and len(out.agreement) == 1 and out.pivot == "torchfim" else [])
        d["models"][name] = {"arch": wl.model, "P": wl.num_params}
        d["samples"][name] = out.samples
        d["warmup_seconds"][name] = out.warmup
        d["contention"][name] = out.contention
        d["retried"][name] = out.retried
        d["clean"][name] = out.clean
        if out.contended_medians:
            d["notes"][name].append("too few calls on a quiet machine for " + ", ".join(out.contended_medians)
                                    + ": the median includes calls that ran under contention")
        for c, info in out.flagged.items():
            tqdm.write(f"[{name}] {c} FLAGGED: {info['reason']}", file=sys.stderr)
        report.write(args.json)
    bar.close()

    if do_sweep:
        d["sweep"] = run_sweep(cfg, quiet, progress=not args.no_progress)
        plot_dir = args.plots or ((args.markdown.parent / "performance") if args.markdown else None)
        if plot_dir is not None:
            try:
                d["plots"] = plot_sweep(d["sweep"], plot_dir)
            except Exception as exc:  # noqa: BLE001
                d["errors"]["sweep-plots"] = {"matplotlib": _short_error(exc)}
    d["targets"] = evaluate_targets(report.main, d["sweep"])
    d["environment"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    d["total_seconds"] = time.perf_counter() - start
    d["waited_for_quiet_seconds"] = quiet.waited
    report.write(args.json)
    if args.markdown:
        atomic_write_text(args.markdown, render_markdown(report.main, d, args.markdown, d["plots"]))

    print(summary_table(report.main, d))
    print()
    for t in d["targets"]:
        print(f"[{t['status']:>6}] {t['target']}: {_fmt_value(t)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
