"""``torchfim reproduce explosion`` (also ``torchfim explosion``): the study's command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..._words import counted
from ...cli.types import nonnegative_int, positive_int
from ...errors import TorchfimError
from ..out_folder import check_study_out
from .figures import curves_name
from .plan import count_runs, is_complete
from .settings import DEFAULT_OUT, FILES, PRESETS, Settings, settings_from_json
from .store import extract_runs, holds_runs
from .study import run

__all__ = ["HELP", "add_arguments", "interrupted_hint", "main"]

HELP = "the Catastrophic Fisher Explosion study (Jastrzębski et al. 2021) at CPU scale"
#: The options that make the runs, which --from-results takes from the results.json instead.
_RUN_OPTIONS = {"quick": False, "tiny": False, "seeds": None, "master_seed": None, "jobs": 1, "max_runs": None}


def seed_count(text: str) -> int:
    """``--seeds``: a whole number ≥ 2 (``--seeds 0`` was told "expected a whole number ≥ 1", and 1 then refused)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 2:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 2 (prob_outperform needs 2 paired runs), got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchfim reproduce explosion``."""
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"output folder (created if needed; default: {DEFAULT_OUT}/)")
    parser.add_argument("--quick", action="store_true",
                        help="one data set and model, fewer epochs, 2 seeds (a few minutes at most; for smoke runs)")
    parser.add_argument("--resume", action="store_true",
                        help="go on from the finished runs in DIR/runs/ even where other code (another torch or "
                             "torchfim) made some of them, mixing them with this code's; without it, the same command "
                             "run again after an interruption goes on from them where this code made them all (the "
                             "results are the same as a run that was not stopped), and refuses them otherwise")
    parser.add_argument("--seeds", type=seed_count, default=None, metavar="N",
                        help=f"seeds per configuration (default: {Settings().n_seeds}, or 2 with --quick; at least 2)")
    parser.add_argument("--master-seed", type=nonnegative_int, default=None, metavar="S",
                        help="the study's master seed, from which every run's seeds derive (default: 0)")
    parser.add_argument("--jobs", type=positive_int, default=1, metavar="J",
                        help="runs in parallel, one process and thread each (default: 1; results do not depend on it); "
                             "at most one process per CPU and per run still to do: a larger J starts no more")
    parser.add_argument("--from-results", default=None, metavar="RESULTS_JSON",
                        help="write the run files stored in this results.json into DIR/runs/ and rebuild results.json, "
                        "summary.md and the figures from them with this code (no training; DIR must hold no runs)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--max-runs", type=positive_int, default=None, help=argparse.SUPPRESS)  # stop after N new runs


def main(args: argparse.Namespace | list[str] | None = None) -> int:
    """Run from parsed ``args`` (the ``torchfim reproduce explosion`` options) or from an argv list."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="python -m torchfim.experiments.explosion", description=HELP)
        add_arguments(parser)
        args = parser.parse_args(args)
    for module in ("matplotlib", "sklearn", "mnist1d", "tqdm"):
        try:
            __import__(module)
        except ImportError as exc:
            raise ImportError(
                f"torchfim explosion needs the optional package {module!r}: pip install 'torchfim[cli]'"
            ) from exc
    if args.from_results is not None:
        return _from_results(args)
    settings = PRESETS["tiny" if args.tiny else "quick" if args.quick else "full"]
    _check_out(args.out, settings)
    if args.seeds is not None:
        if args.seeds < 2:
            raise TorchfimError("--seeds must be at least 2 (prob_outperform needs 2 paired runs)")
        settings = replace(settings, n_seeds=args.seeds)
    start = time.perf_counter()
    master_seed = 0 if args.master_seed is None else args.master_seed
    try:
        res = run(args.out, settings, master_seed=master_seed, resume=True if args.resume else None, jobs=args.jobs,
                  progress=not args.no_progress, max_runs=args.max_runs)  # fmt: skip
    except KeyboardInterrupt:
        args._interrupted = lambda parsed: interrupted_hint(parsed.out)  # said by torchfim.cli when interrupted
        raise
    if res is None:
        print(f"stopped after {counted(args.max_runs, 'run')}; run the same command again to go on", file=sys.stderr)
        return 0
    out = Path(args.out)
    print(f"wrote {out / FILES['summary']}, {out / FILES['json']} and figures in {time.perf_counter() - start:.0f} s")
    return 0


def interrupted_hint(out: str) -> str:
    """What to do after an interruption: run the same command again, which goes on from the finished runs in
    DIR/runs/, if any."""
    kept = len(list((Path(out) / "runs").glob("*.json")))
    if not kept:
        return "no run had finished, so none was kept; run the same command again to start over"
    kept_runs = f"the {counted(kept, 'finished run')} {'is' if kept == 1 else 'are'} kept in {Path(out) / 'runs'}/"
    return f"{kept_runs}; run the same command again to go on from {'it' if kept == 1 else 'them'}"


def _check_out(out: str, settings: Settings) -> None:
    """Refuse an ``--out`` that cannot be written, or that holds a user's files of the study's names, its learning
    curves' included (the study's own are those of a results.json of the study, or beside run files of an
    unfinished one)."""
    names = [*FILES.values(), *(curves_name(f"{d}/{m}") for d, m in settings.combos)]
    check_study_out(out, names, "explosion", earlier=holds_runs)


def _from_results(args: argparse.Namespace) -> int:
    """``--from-results``: the run files of a results.json into DIR/runs/, then the outputs rebuilt from them."""
    given = [f"--{k.replace('_', '-')}" for k, default in _RUN_OPTIONS.items() if getattr(args, k) != default]
    if given:
        raise TorchfimError(
            f"{', '.join(given)} cannot apply with --from-results: the runs, their settings and seeds are those "
            "stored in the results.json; drop them"
        )
    path = Path(args.from_results)
    results, settings = _read_study(path)
    _check_out(args.out, settings)
    runs_dir = Path(args.out) / "runs"
    if runs_dir.is_dir() and any(runs_dir.iterdir()):
        raise TorchfimError(f"{str(runs_dir)!r} already holds run files; pass an empty --out folder with --from-results")
    _check_whole(path, results, settings)
    n = extract_runs(results, runs_dir, settings)
    # max_runs=0: the runs are all there (checked above), so nothing is trained
    run(args.out, settings, master_seed=results["master_seed"], resume=True, progress=False, max_runs=0)
    print(f"rebuilt {Path(args.out) / FILES['summary']} and {Path(args.out) / FILES['json']} from {n} run files")
    return 0


def _read_study(path: Path) -> tuple[dict, Settings]:
    """The results.json ``path`` and its settings, once it holds what a study's does: its settings, master seed and
    runs, each a record with its spec and result."""
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(results, dict):
            raise ValueError(f"it holds a JSON {type(results).__name__}, not the study's object")
        settings = settings_from_json(results["settings"])
        runs, master_seed = results["runs"], results["master_seed"]
        if isinstance(master_seed, bool) or not isinstance(master_seed, int) or master_seed < 0:
            raise ValueError(f"its master_seed, {master_seed!r}, is not a whole number ≥ 0")
        if not isinstance(runs, dict) or not all(isinstance(r, dict) and isinstance(r.get("spec"), dict)
                                                 and isinstance(r.get("result"), dict) for r in runs.values()):
            raise ValueError("its 'runs' are not the study's run records, each with a 'spec' and a 'result'")
    except KeyError as exc:
        raise TorchfimError(f"cannot read the study in {str(path)!r} (no {exc} in it); pass a results.json the study "
                            "wrote") from None
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise TorchfimError(f"cannot read the study in {str(path)!r} ({exc}); pass a results.json the study wrote") from exc
    return results, settings


def _check_whole(path: Path, results: dict, settings: Settings) -> None:
    """Refuse a results.json that lacks some of the runs its settings describe (a study cut short or edited), whose
    missing runs the rebuild would train, where --from-results promises no training."""
    runs = results["runs"]
    try:
        whole, total = is_complete(settings, results["master_seed"], runs), count_runs(settings)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise TorchfimError(f"cannot read the runs of the study in {str(path)!r} ({type(exc).__name__}: {exc}); pass "
                            "a results.json the study wrote") from exc
    if not whole:
        raise TorchfimError(
            f"{str(path)!r} holds {counted(len(runs), 'run')}, not every run of the study its settings describe "
            f"({total}), so the missing ones would be trained; pass the results.json of a finished "
            "study, or run the study itself (without --from-results) to train them"
        )
