"""Running the whole study: the runs of each phase (in this process or a pool), then the outputs."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..._io import write_json, write_text
from ..._words import counted
from ...errors import TorchfimError, warn_user
from ..code_version import other_code
from . import figures
from .assemble import assemble
from .plan import count_runs, is_done, main_specs, tune_lr_specs, tuned, tuning_specs
from .settings import FILES, FULL, RunSpec, Settings
from .store import execute, load_runs, write_timings
from .summary import summary

__all__ = ["run"]


def _name_other_code(done: dict[str, dict], settings: Settings, runs_dir: Path) -> None:
    """Warn where a resumed study will add runs to run files that other code made (:mod:`..code_version`)."""
    if done and len(done) < count_runs(settings) and (mixed := other_code(list(done.values()))):
        warn_user(f"torchfim: {str(runs_dir)!r}: {mixed}. The resumed study will mix them with this code's runs; for "
                  "a study of one code, use a new --out folder")


def _cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on every platform
        return os.cpu_count() or 1


def _end_with_parent(parent: int) -> None:
    """In a pool's process: end it once its parent ``parent`` is gone. A study killed (SIGKILL, or SIGTERM as ``timeout``
    and batch schedulers send, which runs no cleanup) left its pool's processes waiting for ever on a task queue whose
    pipe they hold open themselves, about 400 MB each (a review); its runs are kept, and a run cut short here is done
    again when the study is resumed. Where the parent's end is not seen (``getppid`` on Windows) nothing changes."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="torchfim-end-with-parent", daemon=True).start()


class _Executor:
    """Runs specs one at a time in this process or in a pool of processes: at most ``jobs``, one per CPU and one
    per spec of a phase (a larger ``jobs`` starts no more). ``largest`` is the most processes that ran runs at once
    (1 in this process), what ``timings.json`` records beside the ``jobs`` asked for."""

    def __init__(self, jobs: int):
        self.jobs = max(1, min(jobs, _cpus()))
        self.pool: Any = None
        self.size = 0
        self.largest = 0

    def map(self, specs: list[RunSpec], settings: Settings, runs_dir: Path,
            master_seed: int) -> Iterator[tuple[str, dict, float]]:
        """``(run id, record, seconds)`` of each spec as it finishes (several at once: by run id)."""
        workers = min(self.jobs, len(specs))
        self.largest = max(self.largest, workers)  # a pool larger than the phase runs ``workers`` at a time
        if workers <= 1 and self.pool is None:
            for s in specs:
                yield execute(s, settings, str(runs_dir), master_seed)
            return
        from concurrent.futures import FIRST_COMPLETED, wait

        if workers > self.size:  # a phase with more runs than the pool has processes: a larger pool
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.close()
            self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_end_with_parent, initargs=(os.getpid(),))
            self.size = workers
        pending = {self.pool.submit(execute, s, settings, str(runs_dir), master_seed) for s in specs}
        try:
            while pending:
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in sorted(finished, key=lambda f: f.result()[0]):
                    yield f.result()
        finally:
            for f in pending:
                f.cancel()

    def close(self, cancel: bool = False) -> None:
        """Shut the pool down (``cancel``: drop the runs not started)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool, self.size = None, 0


def _postfix(spec: RunSpec) -> str:
    s = f"{spec.phase} {spec.dataset}/{spec.model} {spec.variant}"
    return s + (f" seed {spec.seed_index}" if spec.seed_index is not None else "")


class _Phases:
    """Runs the missing runs of one phase after another, counting them on the progress bar."""

    def __init__(self, done: dict[str, dict], settings: Settings, master_seed: int, runs_dir: Path,
                 executor: _Executor, bar, max_runs: int | None, on_run: Callable[[str], None] | None) -> None:
        self.done, self.settings, self.runs_dir, self.executor, self.bar = done, settings, runs_dir, executor, bar
        self.master_seed = master_seed
        self.max_runs, self.on_run = max_runs, on_run
        self.timings: dict[str, float] = {k: v.get("seconds", 0.0) for k, v in done.items()}
        self.counted: set[str] = set()
        self.new = 0

    def run(self, specs: list[RunSpec]) -> bool:
        """Run the specs not done yet (at most ``max_runs`` new ones in all); True when all are done."""
        done, bar = self.done, self.bar
        wanted = {s.run_id for s in specs if is_done(done, s)}
        bar.update(sum(1 for k in done if k in wanted and k not in self.counted))
        self.counted.update(k for k in done if k in wanted)
        todo = [s for s in specs if not is_done(done, s)]
        if self.max_runs is not None:
            todo = todo[: max(0, self.max_runs - self.new)]
        if todo:
            bar.set_postfix_str(_postfix(todo[0]), refresh=False)
        for run_id, record, seconds in self.executor.map(todo, self.settings, self.runs_dir, self.master_seed):
            done[run_id] = record
            self.counted.add(run_id)
            self.timings[run_id] = round(seconds, 3)
            self.new += 1
            bar.update(1)
            nxt = next((s for s in todo if not is_done(done, s)), None)
            bar.set_postfix_str(_postfix(nxt) if nxt else "", refresh=True)
            if self.on_run is not None:
                self.on_run(run_id)
        return all(is_done(done, s) for s in specs)


def run(
    out: str | os.PathLike,
    settings: Settings = FULL,
    master_seed: int = 0,
    resume: bool | None = False,
    jobs: int = 1,
    progress: bool = True,
    max_runs: int | None = None,
    on_run: Callable[[str], None] | None = None,
) -> dict[str, Any] | None:
    """Run (or finish, with ``resume``) the study in ``out``; return ``results.json``'s content.

    ``resume``: True finishes the study whose run files are in ``out/runs``; None (the command line's default)
    does so where this code made every one of them (:mod:`..code_version`: the runs it would make again), and
    refuses run files of other code; False refuses any run file. Returns None when ``max_runs`` new runs were done
    before the study was complete (the run files are kept; call again with ``resume=True`` to finish). ``on_run(run_id)`` is called after
    each run file is written (raising there stops the study; the files written so far are kept).
    """
    from ..._progress import ProgressBar

    out = Path(out)
    runs_dir = out / "runs"
    done = load_runs(runs_dir, settings, master_seed)
    mixed = other_code(list(done.values())) if done and resume is None else ""
    if done and not resume and (resume is not None or mixed):
        said = f", and {mixed}" if mixed else ""
        raise TorchfimError(
            f"{str(runs_dir)!r} already holds {counted(len(done), 'finished run')}{said}; pass --resume to finish "
            "that study, or choose another --out folder"
        )
    _name_other_code(done, settings, runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    bar = ProgressBar(total=count_runs(settings), desc="explosion", unit="run", disable=not progress, file=sys.stderr)
    executor = _Executor(jobs)
    phases = _Phases(done, settings, master_seed, runs_dir, executor, bar, max_runs, on_run)
    try:
        ok = phases.run(tune_lr_specs(settings, master_seed))
        if ok:
            lr_star, _, _, _ = tuned(settings, master_seed, done)
            ok = phases.run(tuning_specs(settings, master_seed, lr_star))
        if ok:
            lr_star, alpha, noisy_alpha, _ = tuned(settings, master_seed, done)
            ok = phases.run(main_specs(settings, master_seed, lr_star, alpha, noisy_alpha))
    except BaseException:
        executor.close(cancel=True)
        raise
    finally:
        executor.close()
        bar.close()
    wall = time.perf_counter() - start
    write_timings(out / FILES["timings"], phases.timings, {"runs": phases.new, "wall_seconds": round(wall, 1),
                                                           "jobs": jobs, "processes": executor.largest,
                                                           "complete": ok})  # fmt: skip
    if not ok:
        return None
    results = json.loads(json.dumps(assemble(settings, master_seed, done)))  # as results.json reads back
    write_json(out / FILES["json"], results, indent=None)
    write_text(out / FILES["summary"], summary(results, figures.draw(out, results)))
    return results
