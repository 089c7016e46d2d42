"""Turning the report's measurements into the JSON-ready dict that report.json holds.

Everything derived is computed here (per-layer sums, standard errors, labels needed for a relative
standard error, spectrum summaries, the empirical-vs-true comparison), so the figures and the text, which
only read this dict, never show a number that report.json lacks.
"""

from __future__ import annotations

import math
import platform
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import settings
from .data import Data
from .measure import json_float
from .outputs import OutputLayout
from .rounding import ROUNDING_DISAGREEMENT

__all__ = ["Layout", "Setup", "assemble", "samples_needed_unrounded", "samples_needed", "ratio", "versions",
           "model_summary"]


@dataclass(frozen=True)
class Layout:
    """Where each trainable parameter tensor (a "layer") sits in the flat θ."""

    names: list[str]
    shapes: list[list[int]]
    sizes: list[int]
    offsets: list[int]

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        """The trainable parameters of ``model``, in ``named_parameters()`` order."""
        named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        sizes = [p.numel() for _, p in named]
        return cls([name for name, _ in named], [list(p.shape) for _, p in named], sizes,
                   [sum(sizes[:i]) for i in range(len(sizes))])

    @property
    def n_parameters(self) -> int:
        """P, the number of trainable parameters."""
        return sum(self.sizes)

    def per_layer(self, vec: Tensor) -> list[float]:
        """The sum of a P-vector over each layer's entries (float64)."""
        return [float(vec[o : o + s].double().sum()) for o, s in zip(self.offsets, self.sizes)]


@dataclass(frozen=True)
class Setup:
    """The choices a report was computed with (see :func:`torchfim.report.compute_report`)."""

    family: str
    n_samples: int
    seed: int
    rel_error: float
    max_block: int
    subset: Tensor  # indices of the variance inputs
    with_hessian: bool
    spectrum_layers: list[int]
    targets_note: str | None
    variance_note: str | None
    outputs: OutputLayout = OutputLayout()


def samples_needed_unrounded(var1: float | None, value: float | None, rel: float) -> float | None:
    """``Var₁ / (rel·value)²``: the labels per input for that relative standard error (one σ), before rounding
    up."""
    if var1 is None or value is None or not value > 0:
        return None
    return max(var1, 0.0) / (rel * value) ** 2


def samples_needed(var1: float | None, value: float | None, rel: float) -> int | None:
    """``⌈Var₁ / (rel·value)²⌉`` (at least 1), as :func:`torchfim.samples_needed`; None if undefined."""
    ratio = samples_needed_unrounded(var1, value, rel)
    return None if ratio is None else max(1, math.ceil(ratio * (1 - 1e-12)))


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``; None where either is None or ``b`` is 0."""
    if a is None or b is None or b == 0:
        return None
    return a / b


def versions() -> dict:
    """The report.json keys of its format version and of the versions that computed it."""
    import torchfim

    return {"torchfim_report": settings.FORMAT_VERSION, "torchfim_version": torchfim.__version__,
            "torch_version": torch.__version__, "python_version": platform.python_version()}


def model_summary(model: nn.Module, layout: Layout) -> dict:
    """The ``model`` entry of report.json: class, trainable parameters and tensors, frozen parameters (left out of
    every number), dtype."""
    first = next(p for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in {id(p): p for p in model.parameters() if not p.requires_grad}.values())
    return {"class": type(model).__name__, "n_parameters": layout.n_parameters, "n_layers": len(layout.names),
            "n_frozen_parameters": frozen, "dtype": str(first.dtype).replace("torch.", "")}


def _cosine(a: Tensor, b: Tensor) -> float | None:
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    den = float(a.norm() * b.norm())
    return float(a @ b) / den if den > 0 else None


def _zero_to_precision(trace: float, total: float, disagreement: float | None, checked: bool, eps: float) -> bool:
    """Whether a layer's Fisher is zero to precision: its numbers are rounding, not data.

    Where the rounding check ran (``checked``: :mod:`torchfim.report.rounding`), by its ``disagreement`` ``d``
    between the layer's score gradients in two precisions: above
    :data:`~torchfim.report.rounding.ROUNDING_DISAGREEMENT` the two computations give other numbers, which data
    does not; a layer whose gradients were exactly 0 on the inputs checked (``d`` None) is zero where its Tr is.
    Without the check (a model that does not run in the other precision), Tr at most ``eps² · Tr(F)``, what scores
    of rounding size (``eps`` times the model's) give. That threshold alone let a float64 ViT's key bias through
    (its softmax runs in float32: Tr 1.06e-22 against ε²·Tr(F) = 1.4e-30) and would flag a genuine float32 layer
    of inputs scaled by 1e-9 (a review); before it, a CLI trial's BERT key bias (softmax ignores it: 1.9e-43 in
    float64) came out 3.6e-26 in float32, and its labels needed (3e9 per input), rank and condition were reported
    as data."""
    if not total > 0:
        return False
    if not checked:
        return trace <= eps * eps * total
    if disagreement is None:
        return trace == 0
    return disagreement > ROUNDING_DISAGREEMENT


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
        "top10_share": ratio(sum(v for v in eig[:10] if v > 0), total),
        "condition_of_nonzero": ratio(top, min((v for v in eig if v > 1e-6 * top), default=None))
        if top > 0 else None,
    }


def _block(value, value_sub, var_all, est, dvs, dvh, sub: dict, k: int, scale: float, rel: float) -> dict:
    """The report.json entry of one layer (or of the whole model): trace, error bars, Î1 vs Î2."""
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
            "bound_ratio_score": ratio(sub["bound_score"], sub["var_score"]),
            "bound_ratio_hessian": ratio(sub["bound_hessian"], sub["var_hessian"]),
            "better_for_trace": None if sub["var_score"] is None or sub["var_hessian"] is None
            else ("hessian" if sub["var_hessian"] <= sub["var_score"] else "score"),
            "diag_var_sum_score": dvs,
            "diag_var_sum_hessian": dvh,
            "better_for_diagonal": None if dvh is None else ("hessian" if dvh <= dvs else "score"),
        },
        "samples_needed": {
            "score": samples_needed(var_all, value, rel),
            "hessian": samples_needed(var_h_all, value, rel),
        },
        "samples_needed_unrounded": {
            "score": samples_needed_unrounded(var_all, value, rel),
            "hessian": samples_needed_unrounded(var_h_all, value, rel),
        },
        # Î1's labels from the subset, extrapolated as Î2's are: the like-for-like comparison with Î2's k, and the
        # subset's extrapolation of Î1's variance over its exact value (far from 1: an unrepresentative subset)
        "samples_needed_score_from_subset": None if sub["var_score"] is None
        else samples_needed(sub["var_score"] * scale, value, rel),
        "subset_extrapolation_ratio": None if sub["var_score"] is None or not var_all
        else sub["var_score"] * scale / var_all,
    }


def _blocks(layout: Layout, measured: dict, setup: Setup, n: int) -> tuple[dict, list[dict]]:
    """``(whole model, [each layer])`` entries; the subset's Î2 variance is scaled by m/n, which
    estimates the variance over all n inputs without bias (a mean of per-input terms over n²)."""
    L = len(layout.names)
    diag_score, diagvar_hessian = measured["diag_score"], measured["diagvar_hessian"]
    tr_score_layers = layout.per_layer(diag_score)
    tr_subset_layers = layout.per_layer(measured["diag_subset"])
    dvs_layers = layout.per_layer(measured["diagvar_score"])
    dvh_layers = layout.per_layer(diagvar_hessian) if diagvar_hessian is not None else [None] * L
    tr_layers = layout.per_layer(measured["diag_exact"])
    scale = setup.subset.numel() / n
    args = (setup.n_samples, scale, setup.rel_error)
    whole = _block(
        json_float(measured["trace_exact"]), float(measured["diag_subset"].double().sum()),
        measured["var1_score_all"], float(diag_score.double().sum()),
        float(measured["diagvar_score"].double().sum()),
        None if diagvar_hessian is None else float(diagvar_hessian.double().sum()),
        measured["subset_total"], *args,
    )
    layers = [
        _block(tr_layers[i], tr_subset_layers[i], measured["layer_var1_score_all"][i], tr_score_layers[i],
               dvs_layers[i], dvh_layers[i], measured["subset_layers"][i], *args)
        for i in range(L)
    ]
    return whole, layers


def _scatter_points(exact: Tensor, emp: Tensor, layout: Layout, seed: int) -> dict[str, dict]:
    """Per layer, the diagonal entries drawn in the scatter: flat ``index``, ``exact``, ``empirical``.

    Every entry of layers up to :data:`~torchfim.report.settings.SCATTER_POINTS_PER_LAYER`
    entries, a seeded random sample of that many from larger ones (so report.json stays small).
    """
    exact, emp = exact.double().cpu(), emp.double().cpu()
    most = settings.SCATTER_POINTS_PER_LAYER
    points = {}
    for i, (name, o, s) in enumerate(zip(layout.names, layout.offsets, layout.sizes)):
        if s > most:
            g = torch.Generator().manual_seed(seed + 7919 * (i + 1))
            idx = (torch.randperm(s, generator=g)[:most].sort().values + o)
        else:
            idx = torch.arange(o, o + s)
        points[name] = {
            "index": [int(j) for j in idx],
            "exact": [float(v) for v in exact[idx]],
            "empirical": [float(v) for v in emp[idx]],
        }
    return points


def _empirical(diag_emp: Tensor | None, diag_exact: Tensor, layout: Layout, seed: int) -> dict | None:
    """The empirical Fisher (true targets) against the true one: traces, ratios, cosines, points."""
    if diag_emp is None:
        return None
    tr_layers = layout.per_layer(diag_exact)
    return {
        "trace": float(diag_emp.double().sum()),
        "trace_exact": float(diag_exact.double().sum()),
        "trace_ratio": ratio(float(diag_emp.double().sum()), float(diag_exact.double().sum())),
        "cosine_diag": _cosine(diag_emp, diag_exact),
        "layers": [
            {
                "name": name,
                "trace": float(diag_emp[o : o + s].double().sum()),
                "trace_exact": tr_layers[i],
                "trace_ratio": ratio(float(diag_emp[o : o + s].double().sum()), tr_layers[i]),
                "cosine_diag": _cosine(diag_emp[o : o + s], diag_exact[o : o + s]),
            }
            for i, (name, o, s) in enumerate(zip(layout.names, layout.offsets, layout.sizes))
        ],
        "points": _scatter_points(diag_exact, diag_emp, layout, seed),
    }


def assemble(model: nn.Module, data: Data, layout: Layout, setup: Setup, measured: dict, timings: dict) -> dict:
    """Every number of the report, as the JSON-ready dict of report.json (without the keys that
    :func:`torchfim.report.run_report` adds: model source and training, command, files)."""

    whole, blocks = _blocks(layout, measured, setup, data.n)
    tr_layers = layout.per_layer(measured["diag_exact"])
    spectra = measured["spectra"]
    # Without the rounding check, in half precision ε² (6e-5 in bfloat16) is the size of real small layers: nothing
    # is flagged there.
    dtype = measured["diag_exact"].dtype
    eps = torch.finfo(dtype).eps if torch.finfo(dtype).bits >= 32 else 0.0
    rounding = measured.get("rounding")  # None: the check could not run (the model has no twin in another precision)
    layers = []
    for i, name in enumerate(layout.names):
        entry = {"name": name, "shape": layout.shapes[i], "size": layout.sizes[i], **blocks[i]}
        entry["share_of_trace"] = ratio(tr_layers[i], sum(tr_layers))
        entry["spectrum"] = _spectrum_summary(spectra[i]) if i in spectra else None
        entry["rounding_disagreement"] = None if rounding is None else rounding.get(name)
        entry["zero_to_precision"] = _zero_to_precision(tr_layers[i], sum(tr_layers), entry["rounding_disagreement"],
                                                        rounding is not None, eps)
        if entry["zero_to_precision"]:  # rounding, not data: no labels needed, no spectrum
            entry["samples_needed"] = entry["samples_needed_unrounded"] = {"score": None, "hessian": None}
            entry["samples_needed_score_from_subset"] = entry["spectrum"] = None
        layers.append(entry)
    return {
        **versions(),
        "mode": "full",  # "score_only" for the report of torchfim.report.score_only
        "family": setup.family,
        "outputs": setup.outputs.to_json(),
        "n_samples": setup.n_samples,
        "rel_error": setup.rel_error,
        "seed": setup.seed,
        "model": model_summary(model, layout),
        "data": {
            "source": data.source,
            "n_inputs": data.n,
            "input_shape": data.input_shape(),
            "has_targets": data.targets is not None,
            "targets_note": setup.targets_note,
            "variance_inputs": setup.subset.numel(),
            "variance_inputs_note": setup.variance_note,
            "hessian_variances": setup.with_hessian,
            "variance_subset_seed": setup.seed,
            "variance_subset_indices": [int(i) for i in setup.subset],
        },
        "max_block": int(setup.max_block),
        "trace": {"exact": whole["trace_exact"], **{k: v for k, v in whole.items() if k != "trace_exact"}},
        "layers": layers,
        "empirical": _empirical(measured["diag_emp"], measured["diag_exact"], layout, setup.seed),
        "spectra": {layout.names[i]: spectra[i] for i in setup.spectrum_layers},
        "timings": timings,
    }
