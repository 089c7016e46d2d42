"""The study's files: one run file per finished run in ``runs/`` (written the moment it finishes,
atomically), reading them back for ``--resume``, and ``timings.json``."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..._io import write_json
from ...errors import TorchfimError
from ..code_version import code_version
from .settings import RunSpec, Settings
from .train import train_one

__all__ = ["execute", "load_runs", "write_timings", "extract_runs", "holds_runs"]


#: What every run file holds (written by :func:`_write_run`).
_RECORD_KEYS = ("run_id", "fingerprint", "spec", "result")


def _run_path(runs_dir: Path, run_id: str) -> Path:
    return runs_dir / f"{run_id}.json"


def _write_run(runs_dir: Path, run_id: str, fingerprint: str, spec: dict, result: dict, **extra: Any) -> dict:
    """Write one run file (atomically) and return its record: id, settings fingerprint, spec, result, ``extra`` (the
    code that made it, :func:`~torchfim.experiments.code_version.code_version`, where known)."""
    record = {"run_id": run_id, "fingerprint": fingerprint, "spec": spec, "result": result, **extra}
    write_json(_run_path(runs_dir, run_id), record, indent=None)
    return record


def execute(spec: RunSpec, settings: Settings, runs_dir: str, master_seed: int) -> tuple[str, dict, float]:
    """Train ``spec`` (a run of the study of ``master_seed``), write its run file atomically, return (run id,
    record, seconds).

    A module-level function of picklable arguments, so that a process pool can run it.
    """
    start = time.perf_counter()
    result = train_one(spec, settings)
    seconds = time.perf_counter() - start
    record = _write_run(Path(runs_dir), spec.run_id, settings.fingerprint(), asdict(spec), result,
                        master_seed=master_seed, seconds=round(seconds, 3), code=code_version())
    return spec.run_id, record, seconds


def extract_runs(results: dict[str, Any], runs_dir: Path, settings: Settings) -> int:
    """Write the run files stored in a ``results.json`` (its ``"runs"``) into ``runs_dir``; return how many.

    ``results.json`` keeps every run's specification and result, so this gives back the run files
    a study was assembled from (without their wall-clock seconds, which are in ``timings.json``, nor the code that
    made them, which it does not keep).
    """
    runs_dir.mkdir(parents=True, exist_ok=True)
    fp = settings.fingerprint()
    for run_id, run in results["runs"].items():
        _write_run(runs_dir, run_id, fp, run["spec"], run["result"], master_seed=results["master_seed"])
    return len(results["runs"])


def load_runs(runs_dir: Path, settings: Settings, master_seed: int) -> dict[str, dict]:
    """Run id -> record of every run file in ``runs_dir``; refuses files that cannot be read and files made
    with other settings or another master seed."""
    done: dict[str, dict] = {}
    if not runs_dir.is_dir():
        return done
    fp = settings.fingerprint()
    for path in sorted(runs_dir.glob("*.json")):
        record = _read_run(path)
        if record["fingerprint"] != fp:
            raise TorchfimError(
                f"the run file {str(path)!r} was made with different settings (another preset, or another "
                "version of the study); use a new --out folder or delete its runs/ folder"
            )
        saved = record.get("master_seed")  # None in the run files of versions before it was stored
        if saved is not None and saved != master_seed:
            raise TorchfimError(
                f"the run file {str(path)!r} was made with master seed {saved}, not the {master_seed} given; pass "
                f"--master-seed {saved} to finish that study, or a new --out folder for a study of seed {master_seed}"
            )
        done[record["run_id"]] = record
    return done


def holds_runs(out: Path) -> bool:
    """Whether ``out/runs`` holds a run file of the study (a JSON object with every key a run file has): the folder
    of an unfinished study, whose other files are its own."""
    for path in (out / "runs").glob("*.json"):
        try:
            _read_run(path)
        except TorchfimError:
            continue
        return True
    return False


def _read_run(path: Path) -> dict:
    """The record in the run file ``path``; refuses a file that is not one (cut short, emptied, edited)."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        missing = [k for k in _RECORD_KEYS if k not in record] if isinstance(record, dict) else list(_RECORD_KEYS)
        if missing:
            raise ValueError(f"it is incomplete: no {', '.join(map(repr, missing))}")
    except (OSError, ValueError) as exc:
        raise TorchfimError(f"cannot read the run file {str(path)!r} ({exc}); delete it and rerun with --resume") from exc
    return record


def write_timings(path: Path, timings: dict[str, float], invocation: dict[str, Any]) -> None:
    """``timings.json``: seconds per run and one entry per invocation (kept across ``--resume``)."""
    history: list = []
    if path.exists():
        try:
            history = list(json.loads(path.read_text(encoding="utf-8")).get("invocations", []))
        except (OSError, ValueError, AttributeError):
            history = []
    history.append(invocation)
    write_json(path, {
        "note": "wall-clock seconds; they depend on the machine and its load, and are kept out of results.json",
        "run_seconds_total": round(sum(timings.values()), 1),
        "invocations": history,
        "seconds_per_run": dict(sorted(timings.items())),
    })  # fmt: skip
