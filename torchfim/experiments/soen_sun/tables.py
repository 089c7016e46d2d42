"""results.json and results.csv (every number of results.json's measured sections, in long form), written atomically."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from ..._io import write_json, write_text
from .settings import FILES

__all__ = ["csv_text", "write_tables"]


#: The CSV's columns: where the number sits (section, configuration, epoch, layer), what it is, and its value.
COLUMNS = ("section", "dataset", "family", "activation", "depth", "width", "num_params", "epoch", "layer", "quantity",
           "value")
_CONFIG = COLUMNS[1:7]
_LAYER_SUMS = ("fisher_diag_sum", "var_score_diag_sum", "var_hessian_diag_sum", "var_hessian_diag_max", "size")
_TRACE = ("fisher", "var_score", "var_hessian", "rel_se_score", "rel_se_hessian")
_STATS = ("count", "zero_variance", "min", "q05", "q25", "median", "q75", "q95", "max")


def _csv_rows(results: dict[str, Any]) -> list[list[Any]]:
    """One row per number of results.json's measured sections: section, configuration, epoch, layer, quantity,
    value. Every number of a record is there but the configuration (in the columns), the record's seed and sweep
    (in the section), its ``n_inputs`` (a setting) and its labels; ``seed_ranges`` rows leave depth, width and
    ``num_params`` empty (they range over seeds of one configuration)."""
    rows: list[list[Any]] = []

    def add(section, cfg, layer, quantity, value, epoch=""):
        config = [cfg.get(c, "") for c in _CONFIG]
        rows.append([section, *config, epoch, layer, quantity, "" if value is None else repr(float(value))])

    for section in ("activations", "seeds"):
        for rec in results.get(section, []):
            name = section if section == "activations" else f"seeds:{rec['seed']}"
            for lay in rec["layers"]:
                for q in _LAYER_SUMS:
                    add(name, rec, lay["layer"], q, lay[q])
            for q in _TRACE:
                add(name, rec, "trace", q, rec["trace"][q])
    for rec in results.get("bound_ratios", []):
        for lay in rec["layers"]:
            add("bound_ratios", rec, lay["layer"], "size", lay["size"])
            for bound, st in lay["ratios"].items():
                for k in _STATS:
                    add("bound_ratios", rec, lay["layer"], f"{bound}_ratio_{k}", st[k])
        for bound, v in rec["trace_ratio"].items():
            add("bound_ratios", rec, "trace", f"{bound}_ratio", v)
        for bound, v in rec["trace_bound"].items():
            add("bound_ratios", rec, "trace", f"{bound}_bound", v)
    for rec in results.get("seed_ranges", []):
        for lay in rec["layers"]:
            for q, v in lay.items():
                if q != "layer":
                    add("seed_ranges", rec, lay["layer"], q, v)
        for q, v in rec["trace"].items():
            add("seed_ranges", rec, "trace", q, v)
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


def csv_text(results: dict[str, Any]) -> str:
    """The text of ``results.csv`` for the results.json dict ``results`` (a header, then :func:`_csv_rows`)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    w.writerows(_csv_rows(results))
    return buf.getvalue()


def write_timings(path: Path, seconds: dict[str, float], total: float) -> None:
    """``timings.json``: the wall-clock seconds of each part and of the whole run, kept out of ``results.json`` so
    that a run repeated on the same code and threads writes ``results.json`` byte for byte again."""
    write_json(path, {"note": "wall-clock seconds; they depend on the machine and its load",
                      "seconds": {part: round(s, 3) for part, s in seconds.items()}, "seconds_total": round(total, 3)})


def write_tables(out: Path, results: dict[str, Any]) -> None:
    """Write ``results.json`` and ``results.csv`` into ``out``."""
    write_json(out / FILES["json"], results)
    write_text(out / FILES["csv"], csv_text(results))
