"""The study's measurements: exact Fisher, exact variances of Î1 and Î2 and the bounds, and the
records that results.json holds for each configuration."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

import torchfim

from .settings import BOUNDS, ZERO_VARIANCE_RTOL

__all__ = [
    "linear_layers",
    "to_float",
    "measure",
    "rel_se",
    "config_record",
    "activation_records",
    "loss_acc",
    "seed_ranges",
]


def linear_layers(model: nn.Module) -> list[dict[str, Any]]:
    """Each Linear layer's label and the flat slice of θ its weight and bias occupy."""
    out, offset = [], 0
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for i, lin in enumerate(linears):
        size = sum(p.numel() for p in lin.parameters() if p.requires_grad)
        kind = "output" if i == len(linears) - 1 else f"hidden {i + 1}"
        out.append(
            {
                "layer": f"L{i + 1}",
                "label": f"L{i + 1} ({lin.in_features}→{lin.out_features}, {kind})",
                "start": offset,
                "stop": offset + size,
                "size": size,
            }
        )
        offset += size
    if offset != sum(p.numel() for p in model.parameters() if p.requires_grad):  # pragma: no cover
        raise RuntimeError("the MLP's parameters are not all in its Linear layers")
    return out


# --------------------------------------------------------------------------- measurements
def to_float(t: torch.Tensor | float) -> float:
    """A tensor or number as a Python float."""
    return float(t)


def measure(model: nn.Module, x: torch.Tensor, family: str, *, bounds: bool) -> dict[str, torch.Tensor]:
    """Exact Fisher, exact variances of Î1 and Î2 (one label per input), and the bounds: diag and trace."""
    r: dict[str, torch.Tensor] = {}
    for st in ("diag", "trace"):
        r[f"fisher_{st}"] = torchfim.fisher(model, x, family=family, estimator="exact", structure=st)
        r[f"var_score_{st}"] = torchfim.fisher_variance(model, x, family=family, estimator="score", structure=st)
        r[f"var_hessian_{st}"] = torchfim.fisher_variance(model, x, family=family, estimator="hessian", structure=st)
        if bounds:
            spec = torchfim.score_variance_bound_spectral(model, x, family=family, structure=st)
            kurt = torchfim.score_variance_bound_kurtosis(model, x, family=family, structure=st)
            r[f"score_spectral_{st}"] = spec
            r[f"score_kurtosis_{st}"] = kurt
            r[f"score_tightest_{st}"] = torch.minimum(spec, kurt)  # = torchfim.variance_bound(estimator="score")
            r[f"hessian_spectral_{st}"] = torchfim.hessian_variance_bound_spectral(model, x, family=family, structure=st)
    return r


def _ratio_stats(bound: np.ndarray, var: np.ndarray, floor: np.ndarray) -> dict[str, Any]:
    """Box-plot statistics of ``bound / var`` over the entries whose variance exceeds their own ``floor``."""
    keep = var > floor
    stats: dict[str, Any] = {"count": int(keep.sum()), "zero_variance": int((~keep).sum())}
    names = ("min", "q05", "q25", "median", "q75", "q95", "max")
    if not keep.any():
        stats.update({k: None for k in names})
        return stats
    ratio = bound[keep] / var[keep]
    values = np.quantile(ratio, [0.0, 0.05, 0.25, 0.5, 0.75, 0.95, 1.0])
    stats.update({k: float(v) for k, v in zip(names, values)})
    return stats


def rel_se(var: float, value: float) -> float | None:
    """The relative standard error √Var / value (None when the value is not positive)."""
    return math.sqrt(max(var, 0.0)) / value if value > 0 else None


def config_record(
    dataset: str, family: str, activation: str, depth: int, width: int, n: int, model: nn.Module
) -> dict[str, Any]:
    """The fields that identify a configuration in results.json."""
    return {
        "dataset": dataset,
        "family": family,
        "activation": activation,
        "depth": depth,
        "width": width,
        "n_inputs": n,
        "num_params": sum(p.numel() for p in model.parameters()),
    }


def activation_records(
    base: dict[str, Any], layers: list[dict[str, Any]], m: dict[str, torch.Tensor]
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The (b) record and, when bounds were measured, the (a) record of one configuration."""
    diag = {k: v.numpy() for k, v in m.items() if k.endswith("_diag")}
    rows = []
    for lay in layers:
        part = slice(lay["start"], lay["stop"])
        v1, v2 = float(diag["var_score_diag"][part].sum()), float(diag["var_hessian_diag"][part].sum())
        rows.append(
            {
                "layer": lay["layer"],
                "label": lay["label"],
                "size": lay["size"],
                "fisher_diag_sum": float(diag["fisher_diag"][part].sum()),
                "var_score_diag_sum": v1,
                "var_hessian_diag_sum": v2,
                "var_hessian_diag_max": float(np.abs(diag["var_hessian_diag"][part]).max()),
                "better": "hessian" if v2 <= v1 else "score",
            }
        )
    tr_f, tr1, tr2 = to_float(m["fisher_trace"]), to_float(m["var_score_trace"]), to_float(m["var_hessian_trace"])
    rec_b = {
        **base,
        "layers": rows,
        "trace": {
            "fisher": tr_f,
            "var_score": tr1,
            "var_hessian": tr2,
            "rel_se_score": rel_se(tr1, tr_f),
            "rel_se_hessian": rel_se(tr2, tr_f),
            "better": "hessian" if tr2 <= tr1 else "score",
        },
    }
    if "score_spectral_diag" not in m:
        return rec_b, None
    floor = ZERO_VARIANCE_RTOL * diag["fisher_diag"] ** 2  # per entry: zero up to round-off (settings.py)
    a_layers = []
    for lay in layers:
        part = slice(lay["start"], lay["stop"])
        ratios = {}
        for bound in BOUNDS:
            est = bound.split("_")[0]
            ratios[bound] = _ratio_stats(diag[f"{bound}_diag"][part], diag[f"var_{est}_diag"][part], floor[part])
        a_layers.append({"layer": lay["layer"], "label": lay["label"], "size": lay["size"], "ratios": ratios})
    trace_ratios = {}
    for bound in BOUNDS:
        var = to_float(m[f"var_{bound.split('_')[0]}_trace"])
        trace_ratios[bound] = to_float(m[f"{bound}_trace"]) / var if var > 0 else None
    trace_bounds = {bound: to_float(m[f"{bound}_trace"]) for bound in BOUNDS}
    rec_a = {**base, "layers": a_layers, "trace_ratio": trace_ratios, "trace_bound": trace_bounds}
    return rec_b, rec_a


@torch.no_grad()
def loss_acc(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` on ``(X, y)``."""
    out = model(X)
    return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).double().mean())


def seed_ranges(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (data set, family, activation): min and max over all seeds of each layer's Σ diag variance and of
    the trace variances (the error bars of figure (b)), and how often Î2 has the smaller trace variance."""
    out = []
    for rec in results["activations"]:
        key = (rec["dataset"], rec["family"], rec["activation"])
        recs = [rec] + [r for r in results["seeds"] if (r["dataset"], r["family"], r["activation"]) == key]
        entry: dict[str, Any] = {
            "dataset": key[0], "family": key[1], "activation": key[2], "seeds": [r["seed"] for r in recs],
            "layers": [], "trace": {},
        }
        for li, lay in enumerate(rec["layers"]):
            row = {"layer": lay["layer"]}
            for est in ("score", "hessian"):
                vals = [r["layers"][li][f"var_{est}_diag_sum"] for r in recs]
                row[f"var_{est}_diag_sum_min"], row[f"var_{est}_diag_sum_max"] = min(vals), max(vals)
            row["hessian_better_count"] = sum(r["layers"][li]["better"] == "hessian" for r in recs)
            entry["layers"].append(row)
        for est in ("score", "hessian"):
            vals = [r["trace"][f"var_{est}"] for r in recs]
            entry["trace"][f"var_{est}_min"], entry["trace"][f"var_{est}_max"] = min(vals), max(vals)
        entry["trace"]["hessian_better_count"] = sum(r["trace"]["better"] == "hessian" for r in recs)
        out.append(entry)
    return out
