"""The soen-sun study's results.csv holds every number of results.json's measured sections, as its description
says (before: each layer's ``var_hessian_diag_max`` and ``size``, the bound ratios' ``trace_bound`` and the whole
``seed_ranges`` section were in results.json alone), and the committed docs/results copy is the writer's text of
the committed results.json."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from torchfim.experiments.soen_sun.tables import write_tables

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results" / "soen-sun"
MEASURED = ("bound_ratios", "activations", "seeds", "seed_ranges", "depth_width", "training")
#: The CSV's columns of a record's configuration.
CONFIG = ("dataset", "family", "activation", "depth", "width", "num_params", "epoch")
#: A record's configuration, what names it (section, layer) and the run's settings.
NOT_NUMBERS = set(CONFIG) | {"seed", "sweep", "seeds", "layer", "label", "n_inputs"}


def _numbers(value: object) -> list[str]:
    """Every number (or null) under ``value`` outside :data:`NOT_NUMBERS`, as the CSV writes it."""
    if isinstance(value, dict):
        return [v for key, item in value.items() if key not in NOT_NUMBERS for v in _numbers(item)]
    if isinstance(value, list):
        return [v for item in value for v in _numbers(item)]
    if value is None:
        return [""]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [repr(float(value))]
    return []


def _key(section: str, record: dict) -> tuple[str, ...]:
    name = {"seeds": f"seeds:{record.get('seed')}", "depth_width": f"depth_width:{record.get('sweep')}"}
    return (name.get(section, section), *(str(record.get(c, "")) for c in CONFIG))


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((RESULTS / "results.json").read_text(encoding="utf-8"))


def _written(results: dict, out: Path) -> Path:
    """The results.csv that the study writes beside results.json for ``results``."""
    write_tables(out, results)
    return out / "results.csv"


def test_every_measured_number_of_results_json_is_a_row_of_results_csv(committed: dict, tmp_path: Path) -> None:
    """Per record (its section and configuration), the CSV's values are exactly the record's numbers, each once,
    under distinct (layer, quantity) names."""
    with open(_written(committed, tmp_path), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    by_record: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        by_record.setdefault((row["section"], *(row[c] for c in CONFIG)), []).append(row)
    records = [(s, r) for s in MEASURED for r in committed[s]]
    assert {_key(s, r) for s, r in records} == set(by_record) and len(records) == len(by_record)
    for section, record in records:
        got = by_record[_key(section, record)]
        assert Counter(row["value"] for row in got) == Counter(_numbers(record)), _key(section, record)
        assert len({(row["layer"], row["quantity"]) for row in got}) == len(got)
    bounds = [r for r in rows if r["section"] == "bound_ratios" and r["quantity"].endswith("_bound")]
    assert {r["quantity"] for r in bounds} == {f"{b}_bound" for b in committed["bound_ratios"][0]["trace_bound"]}
    assert any(r["quantity"] == "var_hessian_diag_max" for r in rows if r["section"] == "activations")


def test_the_committed_csv_is_the_writers_text_of_the_committed_json(committed: dict, tmp_path: Path) -> None:
    assert (RESULTS / "results.csv").read_bytes() == _written(committed, tmp_path).read_bytes()
