"""``torchfim report``: a Fisher-information report of a model on a data set, with error bars.

Usage::

    torchfim report [--model MODULE:FACTORY] [--checkpoint FILE] [--data MODULE:FACTORY]
                    [--family NAME] [--out DIR]

``MODULE:FACTORY`` names an importable callable (the current directory is on ``sys.path``; a path
``dir/file.py:FACTORY`` works too) that takes no arguments. The model factory returns an
``nn.Module``; the data factory returns a tensor of inputs, an ``(inputs, targets)`` pair, or a
torch ``Dataset`` yielding ``x`` or ``(x, y)``. ``--checkpoint`` is a file written by ``torch.save``:
a state dict (loaded strictly into the ``--model`` or default model) or a whole module. With no
flags, the embedded default is used: the demo's tanh MLP (64-32-32-10), trained for a few seconds
on scikit-learn's digits, and all 1797 digits as data.

The report (:func:`run_report`), written to ``--out`` (default ``torchfim-report/``):

* ``report.md`` -- readable on its own, figures embedded, with the numbers behind each figure;
* ``report.json`` -- every number (key ``"torchfim_report"`` holds the format version);
* ``model.pt`` -- the model's ``state_dict`` (``torchfim report --checkpoint DIR/model.pt`` on the
  default re-creates the same report without training);
* figures: ``trace_per_layer.png`` (per-layer Tr(F), exact, with a score-estimator draw and its
  ±2 standard errors), ``variance_per_layer.png`` (Var of the per-layer trace estimators Î1 and Î2
  with their upper bounds), ``samples_needed.png`` (labels per input for 10% relative error of each
  layer's trace), ``spectrum.png`` (eigenvalues of the per-layer exact blocks),
  ``empirical_vs_true.png`` (only when the data has targets) and ``overview.png`` (four panels).

"Layer" means one parameter tensor (``0.weight``, ``0.bias``...), as in ``structure="layers"``.
Per-layer variances are exact: :func:`torchfim.fisher_variance` with ``structure="trace"`` on the
model with every other parameter frozen (``requires_grad=False``), which makes θ that one tensor.
Tr(F) and the score-estimator variances use all inputs; the Hessian-estimator parts (one
forward-over-forward pass per parameter and input) use a seeded random subset of
``variance_inputs`` inputs (default 256, shrunk for large models, see :data:`HESSIAN_BUDGET`), and
so, for comparability, does the Î1-vs-Î2 comparison.

Cost: besides the Hessian parts, about ``L + 5`` passes over all inputs (L = parameter tensors: one
score-variance pass per layer for the error bars, one exact-block pass per layer of at most
``max_block`` parameters for the spectra); 15-20 s for the default on 2 cores.

The report is built in memory, written into a temporary directory beside ``--out`` (every file
atomically), and renamed into place at the end, so a failed or interrupted run leaves no partial
report (and an earlier report at ``--out`` stays as it was).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from .cli import nonnegative_int, positive_int
from .errors import TorchfimError
from .report_load import (
    Data,
    apply_state_dict,
    as_data,
    call_factory,
    load_checkpoint,
    load_factory,
)

__all__ = ["run_report", "compute_report", "default_model", "FORMAT_VERSION", "FILES", "HELP"]

HELP = "write a Fisher-information report (Tr(F) with error bars, Î1 vs Î2, spectra) of a model"

#: Version of the report.json layout (bumped when keys change meaning).
FORMAT_VERSION = 1
#: Default output directory.
DEFAULT_OUT = "torchfim-report"
#: The default model's training: this many epochs of Adam on the digits (about 1 s on one core),
#: with a safety time limit; the epoch cap normally ends training, so the default is deterministic.
DEFAULT_EPOCHS = 30
DEFAULT_TRAIN_SECONDS = 60.0
#: Inputs used by the variance parts (the Hessian estimator costs a pass per parameter per input).
DEFAULT_VARIANCE_INPUTS = 256
#: Unless the number of variance inputs is given explicitly, the subset is shrunk so that
#: parameters × inputs stays under this (the Hessian-estimator parts cost about five
#: forward-over-forward passes per parameter and input), but not below MIN_AUTO_VARIANCE_INPUTS;
#: a model too large even for that gets the score-estimator parts only (the Î2 numbers are None).
HESSIAN_BUDGET = 4_000_000
MIN_AUTO_VARIANCE_INPUTS = 16
#: Largest per-layer block whose eigenvalues are computed (a dense size² matrix and eigvalsh).
DEFAULT_MAX_BLOCK = 2048
#: Target relative error for the samples-needed figure.
REL_ERROR = 0.1

#: Files every report has; ``empirical_vs_true.png`` is added when the data has targets.
FILES = (
    "report.md",
    "report.json",
    "model.pt",
    "overview.png",
    "trace_per_layer.png",
    "variance_per_layer.png",
    "samples_needed.png",
    "spectrum.png",
)
EMPIRICAL_FIGURE = "empirical_vs_true.png"


# ----------------------------------------------------------------------------------- the model
def default_model(
    state_dict: dict | None = None,
    *,
    hidden: tuple[int, ...] | None = None,
    epochs: int = DEFAULT_EPOCHS,
    seed: int = 0,
    seconds: float = DEFAULT_TRAIN_SECONDS,
    on_epoch: Callable[[int, float], None] | None = None,
    checkpoint_name: str = "the checkpoint",
) -> tuple[nn.Module, Data, dict | None]:
    """The embedded default: the demo's tanh MLP on scikit-learn's digits, and the digits.

    Without ``state_dict`` the MLP (``hidden`` widths, default the demo's 32,32) is initialised
    from ``seed`` and trained with :func:`torchfim.demo.train` for ``epochs`` epochs (``seconds`` is
    a safety limit; the epoch cap normally ends training, so the result is deterministic). With
    ``state_dict`` (of that architecture, e.g. a report's ``model.pt``) the weights are loaded
    instead. Returns ``(model, data, training)``, ``training`` being :func:`torchfim.demo.train`'s
    summary or None.
    """
    from .datasets import load_digits
    from .demo import HIDDEN, build_model, train

    hidden = HIDDEN if hidden is None else tuple(int(h) for h in hidden)
    X, y = load_digits()
    model = build_model(n_in=X.shape[1], hidden=hidden, n_out=10, seed=seed)
    training = None
    if state_dict is not None:
        apply_state_dict(
            model, state_dict, checkpoint_name,
            f"without --model it must hold the default MLP 64-{'-'.join(map(str, hidden))}-10 "
            "(a report's model.pt; set --hidden to its widths), or pass --model MODULE:FACTORY "
            "for the architecture it was saved from",
        )
    else:
        training = train(
            model, X, y, epochs=epochs, seconds=seconds,
            generator=torch.Generator().manual_seed(seed), on_epoch=on_epoch,
        )
    model.eval()
    return model, digits_data(X, y), training


def digits_data(X: Tensor | None = None, y: Tensor | None = None) -> Data:
    """All 1797 digits of scikit-learn, with their labels, as report data."""
    if X is None or y is None:
        from .datasets import load_digits

        X, y = load_digits()
    return Data(X, y, "scikit-learn digits (1797 images of 8×8 pixels scaled to [0, 1], with labels)")


# -------------------------------------------------------------------------------- computation
@contextmanager
def _only_trainable(model: nn.Module, name: str) -> Iterator[None]:
    """Make ``name`` the only parameter with ``requires_grad=True`` (restored afterwards)."""
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            p.requires_grad_(n == name)
        yield
    finally:
        for n, p in params.items():
            p.requires_grad_(saved[n])


def _f(x: object) -> float | None:
    """A JSON-safe float (None for NaN/inf/None)."""
    if x is None:
        return None
    v = float(x.detach().double().cpu()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]
    return v if math.isfinite(v) else None


def _k_unrounded(var1: float | None, value: float | None, rel: float) -> float | None:
    """``Var₁ / (rel·value)²``: the labels per input for that relative error, before rounding up."""
    if var1 is None or value is None or not value > 0:
        return None
    return max(var1, 0.0) / (rel * value) ** 2


def _k_needed(var1: float | None, value: float | None, rel: float) -> int | None:
    """``⌈Var₁ / (rel·value)²⌉`` (at least 1), as :func:`torchfim.samples_needed`; None if undefined."""
    ratio = _k_unrounded(var1, value, rel)
    return None if ratio is None else max(1, math.ceil(ratio * (1 - 1e-12)))


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def _check_model_and_data(model: nn.Module, data: Data, fam, family_name: str) -> tuple[Data, str | None]:
    """Run the model on a few inputs; errors name the fix. Returns data (targets dropped if unusable)."""
    from .engine.view import check_mode as _check_mode

    if not isinstance(model, nn.Module):
        raise TorchfimError(
            f"the model must be a torch.nn.Module, got {type(model).__name__}; "
            "make the --model factory return the module"
        )
    _check_mode(model)
    if not any(p.requires_grad for p in model.parameters()):
        raise TorchfimError(
            "the model has no parameters with requires_grad=True, so its Fisher is empty; "
            "return a model whose parameters require gradients"
        )
    first = next(p for p in model.parameters() if p.requires_grad)
    x = data.inputs[: min(8, data.n)]
    x = x.to(device=first.device, dtype=first.dtype if x.is_floating_point() else x.dtype)
    try:
        with torch.no_grad():
            o = model(x)
    except Exception as exc:
        raise TorchfimError(
            f"the model could not run on the data's inputs of shape {tuple(data.inputs.shape)} "
            f"({type(exc).__name__}: {' '.join(str(exc).split())}); make --data return inputs the "
            "model accepts (first dimension = batch)"
        ) from exc
    if not isinstance(o, Tensor):
        raise TorchfimError(
            f"the model returned a {type(o).__name__}, not a tensor; make forward return one "
            "(batch, outputs) tensor"
        )
    if o.is_floating_point() and not bool(torch.isfinite(o).all()):
        raise TorchfimError(
            "the model produced non-finite outputs (NaN or Inf) on the data; check the inputs for "
            "NaN/Inf and the weights (--checkpoint) for divergence"
        )
    try:
        fam.check_output(o)
    except TorchfimError as exc:
        raise TorchfimError(
            f"the model's outputs (shape {tuple(o.shape)}) do not fit --family {family_name}: {exc} "
            "(or pass the --family that matches the outputs: categorical, bernoulli, gaussian, poisson)"
        ) from exc
    note = None
    if data.targets is not None:
        try:
            y = data.targets[: x.shape[0]]
            fam.check_targets(y.to(o.device), o)
        except TorchfimError as exc:
            note = f"the data's targets are not labels of the {family_name} family ({exc}), so the empirical Fisher was skipped"
            data = Data(data.inputs, None, data.source)
    return data, note


def compute_report(
    model: nn.Module,
    data: Data,
    family: str = "categorical",
    *,
    n_samples: int = 1,
    variance_inputs: int | None = None,
    max_block: int = DEFAULT_MAX_BLOCK,
    seed: int = 0,
    rel_error: float = REL_ERROR,
    progress: bool = True,
) -> dict:
    """Every number of the report, as a JSON-ready dict (see the module docstring for what and how).

    ``model`` is put in eval mode. ``n_samples`` is the labels per input of the score estimate and
    its error bars; the variance comparison is for one label per input (divide by k for k labels).
    """
    import torchfim
    from tqdm.auto import tqdm

    from .families import get_family

    fam = get_family(family)
    family_name = fam.name
    model.eval()
    data, targets_note = _check_model_and_data(model, data, fam, family_name)
    X, Y = data.inputs, data.targets
    n = data.n
    k = int(n_samples)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    names = [name for name, _ in named]
    sizes = [p.numel() for _, p in named]
    shapes = [list(p.shape) for _, p in named]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    P = sum(sizes)

    m, with_hessian, variance_note = _variance_plan(variance_inputs, n, P)
    subset_idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:m].sort().values
    S = X[subset_idx]
    eig_layers = [i for i, s in enumerate(sizes) if s <= max_block]
    L = len(names)
    per_variance = 4 if with_hessian else 2
    total_steps = (4 + L + 1 + per_variance * (L + 1) + (2 if with_hessian else 1) + len(eig_layers)
                   + (1 if Y is not None else 0))
    timings: dict[str, float] = {}
    bar = tqdm(total=total_steps, disable=not progress, leave=False, unit="step", desc="report")

    def step(desc: str) -> None:
        bar.set_description(desc)

    def done() -> None:
        bar.update(1)

    def per_layer(vec: Tensor) -> list[float]:
        return [float(vec[o : o + s].double().sum()) for o, s in zip(offsets, sizes)]

    try:
        # --- 1. Tr(F) on all inputs, its per-layer split, a score estimate and its error bars
        t0 = time.perf_counter()
        step("Tr(F) exact")
        trace_exact = torchfim.fisher(model, X, family=fam, structure="trace")
        done()
        step("diag(F) exact")
        diag_exact = torchfim.fisher(model, X, family=fam, structure="diag").detach()
        done()
        step("score estimate")
        diag_score = torchfim.fisher(
            model, X, family=fam, estimator="score", structure="diag", n_samples=k,
            generator=torch.Generator().manual_seed(seed + 1),
        ).detach()
        done()
        step("Var Tr Î1 (all inputs)")
        var1_score_all = _f(torchfim.fisher_variance(model, X, family=fam, estimator="score", structure="trace"))
        done()
        layer_var1_score_all = []
        for name in names:
            step(f"Var Tr Î1 {name}")
            with _only_trainable(model, name):
                layer_var1_score_all.append(
                    _f(torchfim.fisher_variance(model, X, family=fam, estimator="score", structure="trace"))
                )
            done()
        timings["trace"] = time.perf_counter() - t0

        # --- 2. Î1 vs Î2 on the subset (exact variances, bounds), one label per input
        t0 = time.perf_counter()
        step("diag(F) on the subset")
        diag_subset = torchfim.fisher(model, S, family=fam, structure="diag").detach()
        done()

        def variances(label: str) -> dict[str, float | None]:
            out: dict[str, float | None] = {}
            for key, fn, est in (
                ("var_score", torchfim.fisher_variance, "score"),
                ("bound_score", torchfim.variance_bound, "score"),
                ("var_hessian", torchfim.fisher_variance, "hessian"),
                ("bound_hessian", torchfim.variance_bound, "hessian"),
            ):
                if est == "hessian" and not with_hessian:
                    out[key] = None
                    continue
                step(f"{key} {label}")
                out[key] = _f(fn(model, S, family=fam, estimator=est, structure="trace"))
                done()
            return out

        subset_total = variances("(model)")
        subset_layers = []
        for name in names:
            with _only_trainable(model, name):
                subset_layers.append(variances(name))
        step("Σ diag Var Î1")
        diagvar_score = torchfim.fisher_variance(model, S, family=fam, estimator="score", structure="diag").detach()
        done()
        diagvar_hessian = None
        if with_hessian:
            step("Σ diag Var Î2")
            diagvar_hessian = torchfim.fisher_variance(
                model, S, family=fam, estimator="hessian", structure="diag"
            ).detach()
            done()
        timings["variance"] = time.perf_counter() - t0

        # --- 3. eigenvalues of the per-layer exact blocks (all inputs)
        t0 = time.perf_counter()
        spectra: dict[int, list[float]] = {}
        for i in eig_layers:
            step(f"eigenvalues {names[i]}")
            with _only_trainable(model, names[i]):
                block = torchfim.fisher(model, X, family=fam, structure="full")
            eig = torch.linalg.eigvalsh(block.detach().double().cpu()).flip(0)
            spectra[i] = [float(v) for v in eig]
            del block
            done()
        timings["spectrum"] = time.perf_counter() - t0

        # --- 4. the empirical Fisher (true targets), when there are targets
        t0 = time.perf_counter()
        diag_emp = None
        if Y is not None:
            step("empirical Fisher")
            diag_emp = torchfim.fisher(
                model, X, family=fam, estimator="empirical", structure="diag", targets=Y
            ).detach()
            done()
        timings["empirical"] = time.perf_counter() - t0
    finally:
        bar.close()

    # --------------------------------------------------------------- assemble the JSON-ready dict
    tr_layers = per_layer(diag_exact)
    tr_score_layers = per_layer(diag_score)
    tr_subset_layers = per_layer(diag_subset)
    dvs_layers = per_layer(diagvar_score)
    dvh_layers = per_layer(diagvar_hessian) if diagvar_hessian is not None else [None] * L
    tr = _f(trace_exact)
    tr_subset = float(diag_subset.double().sum())
    scale = m / n  # Var over all n inputs ≈ (m/n)·Var over the random subset of m (see the notes)

    def layer_block(i: int | None) -> dict:
        if i is None:
            sub = subset_total
            value, value_sub = tr, tr_subset
            var_all = var1_score_all
            est = float(diag_score.double().sum())
            dvs = float(diagvar_score.double().sum())
            dvh = None if diagvar_hessian is None else float(diagvar_hessian.double().sum())
        else:
            sub = subset_layers[i]
            value, value_sub = tr_layers[i], tr_subset_layers[i]
            var_all = layer_var1_score_all[i]
            est = tr_score_layers[i]
            dvs, dvh = dvs_layers[i], dvh_layers[i]
        var_h_all = None if sub["var_hessian"] is None else sub["var_hessian"] * scale
        return {
            "trace_exact": value,
            "trace_score_estimate": est,
            "trace_score_stderr": None if var_all is None else math.sqrt(max(var_all, 0.0) / k),
            "trace_hessian_stderr": None if var_h_all is None else math.sqrt(max(var_h_all, 0.0) / k),
            "var1_score_all_inputs": var_all,
            "var1_hessian_all_inputs_extrapolated": var_h_all,
            "subset": {
                "trace_exact": value_sub,
                **sub,
                "bound_ratio_score": _ratio(sub["bound_score"], sub["var_score"]),
                "bound_ratio_hessian": _ratio(sub["bound_hessian"], sub["var_hessian"]),
                "better_for_trace": None if sub["var_score"] is None or sub["var_hessian"] is None
                else ("hessian" if sub["var_hessian"] <= sub["var_score"] else "score"),
                "diag_var_sum_score": dvs,
                "diag_var_sum_hessian": dvh,
                "better_for_diagonal": None if dvh is None else ("hessian" if dvh <= dvs else "score"),
            },
            "samples_needed": {
                "score": _k_needed(var_all, value, rel_error),
                "hessian": _k_needed(var_h_all, value, rel_error),
            },
            "samples_needed_unrounded": {
                "score": _k_unrounded(var_all, value, rel_error),
                "hessian": _k_unrounded(var_h_all, value, rel_error),
            },
        }

    layers = []
    for i, name in enumerate(names):
        entry = {"name": name, "shape": shapes[i], "size": sizes[i], **layer_block(i)}
        entry["share_of_trace"] = _ratio(tr_layers[i], sum(tr_layers))
        if i in spectra:
            entry["spectrum"] = _spectrum_summary(spectra[i])
        else:
            entry["spectrum"] = None
        layers.append(entry)

    empirical = None
    if diag_emp is not None:
        empirical = {
            "trace": float(diag_emp.double().sum()),
            "trace_exact": float(diag_exact.double().sum()),
            "trace_ratio": _ratio(float(diag_emp.double().sum()), float(diag_exact.double().sum())),
            "cosine_diag": _cosine(diag_emp, diag_exact),
            "layers": [
                {
                    "name": name,
                    "trace": float(diag_emp[o : o + s].double().sum()),
                    "trace_exact": tr_layers[i],
                    "trace_ratio": _ratio(float(diag_emp[o : o + s].double().sum()), tr_layers[i]),
                    "cosine_diag": _cosine(diag_emp[o : o + s], diag_exact[o : o + s]),
                }
                for i, (name, o, s) in enumerate(zip(names, offsets, sizes))
            ],
            "points": _scatter_points(diag_exact, diag_emp, names, offsets, sizes, seed),
        }

    return {
        "torchfim_report": FORMAT_VERSION,
        "torchfim_version": torchfim.__version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "family": family_name,
        "n_samples": k,
        "rel_error": rel_error,
        "seed": seed,
        "model": {
            "class": type(model).__name__,
            "n_parameters": P,
            "n_layers": L,
            "dtype": str(next(p for p in model.parameters() if p.requires_grad).dtype).replace("torch.", ""),
        },
        "data": {
            "source": data.source,
            "n_inputs": n,
            "input_shape": list(X.shape[1:]),
            "has_targets": Y is not None,
            "targets_note": targets_note,
            "variance_inputs": m,
            "variance_inputs_note": variance_note,
            "hessian_variances": with_hessian,
            "variance_subset_seed": seed,
            "variance_subset_indices": [int(i) for i in subset_idx],
        },
        "max_block": int(max_block),
        "trace": {"exact": tr, **{k_: v for k_, v in layer_block(None).items() if k_ != "trace_exact"}},
        "layers": layers,
        "empirical": empirical,
        "spectra": {names[i]: spectra[i] for i in eig_layers},
        "timings": timings,
    }


def _variance_plan(variance_inputs: int | None, n: int, P: int) -> tuple[int, bool, str | None]:
    """``(m, with_hessian, note)``: the subset size for the variance parts and whether Î2's are done.

    An explicit ``variance_inputs`` is obeyed (capped at ``n``). Otherwise the default 256 shrinks
    so that ``P·m ≤ HESSIAN_BUDGET``, down to MIN_AUTO_VARIANCE_INPUTS; past that the Hessian
    estimator's variances are skipped (the score estimator's stay, on min(n, 256) inputs).
    """
    if variance_inputs is not None:
        return min(int(variance_inputs), n), True, None
    m = min(DEFAULT_VARIANCE_INPUTS, n)
    if P * m <= HESSIAN_BUDGET:
        return m, True, None
    affordable = HESSIAN_BUDGET // P
    if affordable >= MIN_AUTO_VARIANCE_INPUTS:
        return int(affordable), True, (
            f"the variance subset was reduced from {m} to {affordable} inputs because the model has "
            f"{P} parameters and the Hessian estimator's variance costs a pass per parameter per "
            "input; pass --variance-inputs N to choose (and wait for) another size"
        )
    return m, False, (
        f"the Hessian estimator's (Î2) variances were skipped: with {P} parameters they would cost "
        f"{P} forward-over-forward passes per input; pass --variance-inputs N to compute them "
        "anyway on N inputs (slow), or freeze parameters with requires_grad_(False) in --model"
    )


#: At most this many diagonal entries per layer in the empirical-vs-true scatter (and report.json).
SCATTER_POINTS_PER_LAYER = 4000


def _scatter_points(exact: Tensor, emp: Tensor, names, offsets, sizes, seed: int) -> dict[str, dict]:
    """Per layer, the diagonal entries drawn in the scatter: flat ``index``, ``exact``, ``empirical``.

    Every entry of layers up to :data:`SCATTER_POINTS_PER_LAYER` entries, a seeded random sample
    of that many from larger ones (so report.json stays small for large models).
    """
    exact, emp = exact.double().cpu(), emp.double().cpu()
    points = {}
    for i, (name, o, s) in enumerate(zip(names, offsets, sizes)):
        if s > SCATTER_POINTS_PER_LAYER:
            g = torch.Generator().manual_seed(seed + 7919 * (i + 1))
            idx = (torch.randperm(s, generator=g)[:SCATTER_POINTS_PER_LAYER].sort().values + o)
        else:
            idx = torch.arange(o, o + s)
        points[name] = {
            "index": [int(j) for j in idx],
            "exact": [float(v) for v in exact[idx]],
            "empirical": [float(v) for v in emp[idx]],
        }
    return points


def _cosine(a: Tensor, b: Tensor) -> float | None:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else None


def _spectrum_summary(eig: list[float]) -> dict:
    """λ_max, λ_min, Σλ, numerical rank (λ > 10⁻⁶·λ_max) and the top-10 share of the trace."""
    top = eig[0] if eig else 0.0
    total = sum(v for v in eig if v > 0)
    rank = sum(1 for v in eig if v > 1e-6 * top) if top > 0 else 0
    return {
        "max": top,
        "min": eig[-1] if eig else None,
        "sum": sum(eig),
        "rank_1e-6": rank,
        "top10_share": _ratio(sum(v for v in eig[:10] if v > 0), total),
        "condition_of_nonzero": _ratio(top, min((v for v in eig if v > 1e-6 * top), default=None))
        if top > 0 else None,
    }


# ---------------------------------------------------------------------------------- publishing
def _is_report_dir(path: Path) -> bool:
    try:
        with open(path / "report.json", encoding="utf-8") as f:
            return "torchfim_report" in json.load(f)
    except (OSError, ValueError):
        return False


def check_out(out: str | os.PathLike) -> Path:
    """``out`` as a Path, if it is free or an earlier torchfim report (which will be replaced)."""
    path = Path(out)
    if path.exists():
        if not path.is_dir():
            raise TorchfimError(f"--out {out} is an existing file; choose a directory name for the report")
        if any(path.iterdir()) and not _is_report_dir(path):
            raise TorchfimError(
                f"--out {out} is a directory that is not a torchfim report; choose a new directory "
                "(an earlier report there would be replaced, other files never)"
            )
    return path


def publish(out: Path, files: dict[str, bytes | str]) -> Path:
    """Write ``files`` into a temporary directory beside ``out``, then rename it to ``out``.

    An existing report at ``out`` is replaced only once the new one is complete.
    """
    from ._io import write_bytes, write_text

    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    old: Path | None = None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for name, content in files.items():
            if isinstance(content, str):
                write_text(tmp / name, content)
            else:
                write_bytes(tmp / name, content)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=parent))
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and old.exists() and not out.exists():
            os.replace(old, out)  # put the earlier report back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------- run it all
def run_report(
    model: nn.Module | None = None,
    data: object = None,
    *,
    family: str = "categorical",
    out: str | os.PathLike | None = DEFAULT_OUT,
    checkpoint: str | os.PathLike | None = None,
    n_samples: int = 1,
    variance_inputs: int | None = None,
    max_block: int = DEFAULT_MAX_BLOCK,
    seed: int = 0,
    epochs: int = DEFAULT_EPOCHS,
    hidden: tuple[int, ...] | None = None,
    threads: int | None = None,
    progress: bool = True,
    emit: Callable[[str], object] | None = print,
    command: str | None = None,
    data_source: str | None = None,
    model_source: str | None = None,
) -> dict:
    """Compute the report of ``model`` on ``data`` and write it to ``out`` (see the module docstring).

    ``model``: an ``nn.Module`` (its weights replaced from ``checkpoint`` if given), or None for
    the embedded default (trained for ``epochs`` epochs with ``hidden`` widths and ``seed``, or
    loaded from ``checkpoint``). ``data``: anything :func:`torchfim.report_load.as_data` accepts (a
    tensor, ``(inputs, targets)``, a Dataset); None means the digits, which only suits the default
    architecture. ``out=None`` computes without writing. ``emit`` receives the terminal summary
    lines (None: silent); ``progress`` shows a tqdm bar on stderr; ``threads`` sets torch's
    intra-op threads for the run (restored after; None leaves them).

    Returns ``{"results": <the report.json dict>, "model", "data": Data, "out": Path | None,
    "markdown", "table", "training"}``.
    """
    for name, value, least in (("n_samples", n_samples, 1), ("variance_inputs", variance_inputs, 1),
                               ("max_block", max_block, 0), ("epochs", epochs, 1)):
        if name == "variance_inputs" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TorchfimError(f"{name} must be an integer ≥ {least}, got {value!r}")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise TorchfimError(f"threads must be an integer ≥ 1 or None, got {threads!r}")
    out_path = check_out(out) if out is not None else None
    # Fail before the expensive part if the figures cannot be drawn.
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "torchfim report draws figures with matplotlib, which is not installed: run "
            "pip install 'torchfim[cli]'"
        ) from exc

    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(model, data, family, out_path, checkpoint, n_samples, variance_inputs, max_block,
                    seed, epochs, hidden, progress, emit, command, data_source, model_source)
    finally:
        torch.set_num_threads(previous_threads)


def _run(model, data, family, out_path, checkpoint, n_samples, variance_inputs, max_block, seed,
         epochs, hidden, progress, emit, command, data_source, model_source) -> dict:
    from tqdm.auto import tqdm

    from . import report_render as render

    started = time.perf_counter()
    training = None
    loaded = load_checkpoint(checkpoint) if checkpoint is not None else None
    if model is None and isinstance(loaded, nn.Module):
        model = loaded
        model_source = model_source or f"{type(model).__name__}, a whole module from {checkpoint}"
        if data is None:
            data = digits_data()
    elif model is None:
        bar = tqdm(total=epochs, disable=not progress or loaded is not None, leave=False,
                   unit="epoch", desc="training the default MLP")

        def on_epoch(epoch: int, loss: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3g}")

        try:
            model, default_data, training = default_model(
                loaded, hidden=hidden, epochs=epochs, seed=seed, on_epoch=on_epoch,
                checkpoint_name=str(checkpoint),
            )
        finally:
            bar.close()
        widths = "-".join(str(lin.out_features) for lin in model.modules() if isinstance(lin, nn.Linear))
        if model_source is None:
            model_source = f"the embedded default, the tanh MLP 64-{widths} of torchfim.demo, " + (
                f"with weights from {checkpoint}" if training is None
                else f"trained {training['epochs']} epochs with Adam on the digits (seed {seed}): "
                     f"train loss {training['loss']:.3g}, accuracy {100 * training['accuracy']:.1f}%"
                     + (" (stopped by the time limit)" if training["stopped_by_time"] else "")
            )
        if data is None:
            data = default_data
    else:
        if loaded is not None:
            state = loaded.state_dict() if isinstance(loaded, nn.Module) else loaded
            apply_state_dict(model, state, str(checkpoint),
                             "pass the checkpoint saved from this --model's architecture "
                             "(or the --model factory that built it)")
        if data is None:
            raise TorchfimError("a model was given without data: pass --data MODULE:FACTORY")
    if not isinstance(data, Data):
        data = as_data(data, data_source or "the data passed in")
    elif data_source is not None:
        data = Data(data.inputs, data.targets, data_source)
    if model_source is None:
        model_source = type(model).__name__

    setup_seconds = time.perf_counter() - started
    results = compute_report(model, data, family, n_samples=n_samples, variance_inputs=variance_inputs,
                             max_block=max_block, seed=seed, progress=progress)
    results["model"]["source"] = model_source
    results["model"]["training"] = training
    results["model"]["checkpoint"] = None if checkpoint is None else str(checkpoint)
    results["command"] = command
    results["timings"]["setup"] = setup_seconds
    results["timings"]["compute_total"] = time.perf_counter() - started

    t0 = time.perf_counter()
    figures = render.figures(results)
    results["timings"]["figures"] = time.perf_counter() - t0
    results["timings"]["total"] = time.perf_counter() - started
    results["files"] = sorted(["report.md", "report.json", "model.pt", *figures])
    markdown = render.markdown(results, figures)
    table = render.summary_table(results)

    if out_path is not None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        files: dict[str, bytes | str] = {
            "report.json": json.dumps(results, indent=1, allow_nan=False, ensure_ascii=False) + "\n",
            "report.md": markdown,
            "model.pt": buffer.getvalue(),
            **figures,
        }
        publish(out_path, files)

    if emit is not None:
        for line in table.splitlines():
            emit(line)
        if out_path is not None:
            emit("")
            emit(f"wrote {out_path}/ ({', '.join(results['files'])}) in {results['timings']['total']:.1f} s; "
                 f"read {out_path / 'report.md'}")
    return {"results": results, "model": model, "data": data, "out": out_path,
            "markdown": markdown, "table": table, "training": training}


# --------------------------------------------------------------------- command-line glue (cli.py)




def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .demo import HIDDEN, _widths
    from .families import FAMILIES

    parser.add_argument("--model", metavar="MODULE:FACTORY",
                        help="importable callable returning the nn.Module (current directory on "
                             "sys.path; file.py:FACTORY works too). Default: the demo's MLP, "
                             "trained briefly on scikit-learn's digits")
    parser.add_argument("--checkpoint", metavar="FILE",
                        help="torch.save file: a state dict for --model (or the default MLP), or a "
                             "whole module (unpickled: only files you trust)")
    parser.add_argument("--data", metavar="MODULE:FACTORY",
                        help="callable returning the inputs: a tensor, an (inputs, targets) pair, or "
                             "a Dataset yielding (x, y). Default: the 1797 digits")
    parser.add_argument("--family", default="categorical", choices=sorted(FAMILIES),
                        help="output distribution of the model (default: categorical)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"report directory (default: {DEFAULT_OUT}/; an earlier report there "
                             "is replaced)")
    parser.add_argument("--n-samples", type=positive_int, default=1,
                        help="labels per input for the score estimate and its error bars (default: 1)")
    parser.add_argument("--variance-inputs", type=positive_int, default=None, metavar="N",
                        help=f"inputs (a seeded random subset) for the Î1-vs-Î2 variances; the "
                             f"Hessian estimator costs a pass per parameter per input (default: "
                             f"{DEFAULT_VARIANCE_INPUTS}, fewer for models with over "
                             f"{HESSIAN_BUDGET // DEFAULT_VARIANCE_INPUTS} parameters, and none "
                             f"of Î2's over {HESSIAN_BUDGET // MIN_AUTO_VARIANCE_INPUTS})")
    parser.add_argument("--max-block", type=nonnegative_int, default=DEFAULT_MAX_BLOCK, metavar="N",
                        help="compute eigenvalues of layers with at most N parameters "
                             f"(default: {DEFAULT_MAX_BLOCK})")
    parser.add_argument("--seed", type=nonnegative_int, default=0,
                        help="seed for the default model's training, the subset and sampled labels "
                             "(default: 0)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                        help=f"training epochs of the default model (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--hidden", type=_widths, default=None, metavar="W1,W2,...",
                        help="hidden widths of the default model (default: "
                             f"{','.join(map(str, HIDDEN))})")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch intra-op threads (default: 1 for the embedded default model, "
                             "whose tensors are small; torch's own setting for --model)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _command(args: argparse.Namespace) -> str:
    """The command line that re-creates this report (options left at their defaults omitted)."""
    import shlex

    from .demo import HIDDEN

    defaults = {"model": None, "checkpoint": None, "data": None, "family": "categorical",
                "out": DEFAULT_OUT, "n_samples": 1, "variance_inputs": None,
                "max_block": DEFAULT_MAX_BLOCK, "seed": 0, "epochs": DEFAULT_EPOCHS, "hidden": None}
    parts = ["torchfim", "report"]
    for key, default in defaults.items():
        value = getattr(args, key, default)
        if value == default or (key == "hidden" and value is not None and tuple(value) == HIDDEN):
            continue
        text = ",".join(map(str, value)) if key == "hidden" else str(value)
        parts += ["--" + key.replace("_", "-"), text]
    return " ".join(shlex.quote(p) for p in parts)


def main(args: argparse.Namespace) -> int:
    from .report_load import ensure_cwd_on_path

    ensure_cwd_on_path()
    if args.model is not None and (args.hidden is not None or args.epochs != DEFAULT_EPOCHS):
        raise TorchfimError("--hidden and --epochs describe the default model; drop them with --model")
    if args.model is None and args.checkpoint is not None and args.epochs != DEFAULT_EPOCHS:
        raise TorchfimError("--epochs trains the default model, but --checkpoint loads its weights; drop one")
    if args.model is None and args.data is not None and args.checkpoint is None:
        raise TorchfimError(
            "--data without --model would analyse the default MLP (trained on the digits) on your "
            "data; pass --model MODULE:FACTORY for your model (and --checkpoint for its weights)"
        )
    check_out(args.out)
    model = data = None
    if args.model is not None:
        model = call_factory(load_factory(args.model, "--model"), args.model, "--model")
        if not isinstance(model, nn.Module):
            raise TorchfimError(
                f"--model {args.model}: the factory returned a {type(model).__name__}, not a "
                "torch.nn.Module; return the model"
            )
    if args.data is not None:
        raw = call_factory(load_factory(args.data, "--data"), args.data, "--data")
        data = as_data(raw, f"{args.data}()", "--data")
    threads = args.threads if args.threads is not None else (1 if args.model is None else None)
    run_report(
        model, data, family=args.family, out=args.out, checkpoint=args.checkpoint,
        n_samples=args.n_samples, variance_inputs=args.variance_inputs, max_block=args.max_block,
        seed=args.seed, epochs=args.epochs, hidden=args.hidden, threads=threads,
        progress=not args.no_progress, command=_command(args),
        model_source=None if args.model is None else f"{args.model}()"
        + (f" with weights from {args.checkpoint}" if args.checkpoint else ""),
    )
    return 0
