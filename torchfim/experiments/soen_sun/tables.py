"""results.json and results.csv (the same numbers in long form), written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..._io import write_json, write_text
from .settings import FILES

__all__ = ["write_tables"]


def _csv_rows(results: dict[str, Any]) -> list[list[Any]]:
    """One row per number: section, configuration, epoch, layer, quantity, value."""
    rows: list[list[Any]] = []

    def add(section, cfg, layer, quantity, value, epoch=""):
        rows.append(
            [
                section,
                cfg.get("dataset", ""),
                cfg.get("family", ""),
                cfg.get("activation", ""),
                cfg.get("depth", ""),
                cfg.get("width", ""),
                cfg.get("num_params", ""),
                epoch,
                layer,
                quantity,
                "" if value is None else repr(float(value)),
            ]
        )

    for rec in results.get("activations", []):
        for lay in rec["layers"]:
            for q in ("fisher_diag_sum", "var_score_diag_sum", "var_hessian_diag_sum"):
                add("activations", rec, lay["layer"], q, lay[q])
        for q in ("fisher", "var_score", "var_hessian", "rel_se_score", "rel_se_hessian"):
            add("activations", rec, "trace", q, rec["trace"][q])
    for rec in results.get("seeds", []):
        for lay in rec["layers"]:
            for q in ("fisher_diag_sum", "var_score_diag_sum", "var_hessian_diag_sum"):
                add(f"seeds:{rec['seed']}", rec, lay["layer"], q, lay[q])
        for q in ("fisher", "var_score", "var_hessian", "rel_se_score", "rel_se_hessian"):
            add(f"seeds:{rec['seed']}", rec, "trace", q, rec["trace"][q])
    for rec in results.get("bound_ratios", []):
        for lay in rec["layers"]:
            for bound, st in lay["ratios"].items():
                for k in ("count", "zero_variance", "min", "q05", "q25", "median", "q75", "q95", "max"):
                    add("bound_ratios", rec, lay["layer"], f"{bound}_ratio_{k}", st[k])
        for bound, v in rec["trace_ratio"].items():
            add("bound_ratios", rec, "trace", f"{bound}_ratio", v)
    for rec in results.get("depth_width", []):
        for q in ("fisher_trace", "var_score_trace", "var_hessian_trace", "var_score_diag_sum", "var_hessian_diag_sum",
                  "fisher_diag_sum", "rel_se_score", "rel_se_hessian"):
            add(f"depth_width:{rec['sweep']}", rec, "all", q, rec[q])
    for rec in results.get("training", []):
        for q in ("train_loss", "train_accuracy", "heldout_accuracy", "fisher_trace", "var_score_trace",
                  "var_hessian_trace", "rel_se_score", "rel_se_hessian", "samples_needed_score",
                  "samples_needed_hessian"):
            add("training", rec, "trace" if "trace" in q or "se" in q or "samples" in q else "all", q, rec[q],
                epoch=rec["epoch"])
    return rows


def write_timings(path: Path, seconds: dict[str, float], total: float) -> None:
    """``timings.json``: the wall-clock seconds of each part and of the whole run, kept out of ``results.json`` so
    that a run repeated on the same code and threads writes ``results.json`` byte for byte again."""
    write_json(path, {"note": "wall-clock seconds; they depend on the machine and its load",
                      "seconds": {part: round(s, 3) for part, s in seconds.items()}, "seconds_total": round(total, 3)})


def write_tables(out: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.csv`` into ``out``."""
    write_json(out / FILES["json"], results)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["section", "dataset", "family", "activation", "depth", "width", "num_params", "epoch", "layer",
                "quantity", "value"])
    w.writerows(_csv_rows(results))
    write_text(out / FILES["csv"], buf.getvalue())
