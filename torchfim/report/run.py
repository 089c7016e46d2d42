"""Running a whole report: resolve the model and data, compute, render, publish, summarise."""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from .._out_folder import folder_text
from .._words import counted
from ..errors import TorchfimError
from . import figures, kept_steps, settings
from .compute import compute_report
from .data import Data, as_data
from .default import default_model, digits_data
from .load import apply_checkpoint, load_checkpoint
from .markdown import markdown
from .publish import check_out, publish
from .score_only_render import draw_score_only, markdown_score_only, summary_score_only
from .terminal import summary_table
from .wording import option, said

__all__ = ["run_report"]


def run_report(
    model: nn.Module | None = None,
    data: object = None,
    *,
    family: str | object = "categorical",
    out: str | os.PathLike | None = settings.DEFAULT_OUT,
    checkpoint: str | os.PathLike | None = None,
    n_samples: int = 1,
    variance_inputs: int | None = None,
    max_block: int = settings.DEFAULT_MAX_BLOCK,
    seed: int = 0,
    epochs: int = settings.DEFAULT_EPOCHS,
    hidden: tuple[int, ...] | None = None,
    threads: int | None = None,
    progress: bool = True,
    emit: Callable[[str], object] | None = print,
    command: str | Callable[[dict], str] | None = None,
    data_source: str | None = None,
    model_source: str | None = None,
    mask: str | None = None,
    class_dim: int | None = None,
    score_only: bool | None = None,
    resume: bool = True,
) -> dict:
    """Compute the report of ``model`` on ``data`` and write it to ``out`` (see :mod:`torchfim.report`).

    ``model``: an ``nn.Module`` (its weights replaced from ``checkpoint`` if given), or None for
    the embedded default (trained for ``epochs`` epochs with ``hidden`` widths and ``seed``, or
    loaded from ``checkpoint``). ``data``: anything :func:`torchfim.report.as_data` accepts (a
    tensor, ``(inputs, targets)``, a Dataset); None means the digits, which only suits the default
    architecture. ``out=None`` computes without writing; otherwise only the report's own files are
    written into ``out`` (see :mod:`torchfim.report.publish`). ``emit`` receives the terminal
    summary lines (None: silent); ``progress`` shows a progress bar on stderr (where that is not a terminal, a
    line every half minute and one at the end: :mod:`torchfim._progress`); ``threads`` sets torch's intra-op threads for the run (restored after; None leaves them); ``command``, report.md's Re-create line, may be
    a function of the report.json dict (the command line leaves out what a score-only report did not use). A model whose outputs have
    positions (a language model's ``(batch, tokens, vocabulary)``) is read one output vector per
    position; ``mask`` names the entry of dict inputs that marks the observed ones (e.g.
    ``"attention_mask"``), ``class_dim=1`` reads ``(batch, C, *positions)`` outputs.
    ``score_only``: as in :func:`~torchfim.report.compute_report` (None: the score-only report where the
    full one would not fit in memory or would take too long). While it computes, each finished step is kept in
    ``out``'s folder :data:`~torchfim.report.kept_steps.FOLDER`, removed once the report is written: the same
    report run again after an interruption reads the finished steps back (``resume=False`` computes them all
    again); with ``out=None`` nothing is kept.

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
                    seed, epochs, hidden, progress, emit, command, data_source, model_source, mask, class_dim,
                    score_only, resume)
    finally:
        torch.set_num_threads(previous_threads)


def _run(model, data, family, out_path, checkpoint, n_samples, variance_inputs, max_block, seed,
         epochs, hidden, progress, emit, command, data_source, model_source, mask, class_dim, score_only,
         resume) -> dict:
    started = time.perf_counter()
    model, data, training, model_source = _model_and_data(
        model, data, checkpoint, hidden, epochs, seed, progress, data_source, model_source)
    setup_seconds = time.perf_counter() - started
    keep_in = None if out_path is None else out_path / kept_steps.FOLDER
    if keep_in is not None and not resume:
        kept_steps.discard(keep_in)
    results = compute_report(model, data, family, n_samples=n_samples, variance_inputs=variance_inputs,
                             max_block=max_block, seed=seed, progress=progress, mask=mask, class_dim=class_dim,
                             score_only=score_only, keep_in=keep_in)
    results["model"]["source"] = model_source
    results["model"]["training"] = training
    results["model"]["checkpoint"] = None if checkpoint is None else str(checkpoint)
    results["command"] = command(results) if callable(command) else command
    results["timings"]["setup"] = setup_seconds
    results["timings"]["compute_total"] = time.perf_counter() - started

    draw, write, summarise = ((draw_score_only, markdown_score_only, summary_score_only)
                              if results["mode"] == "score_only" else (figures.draw, markdown, summary_table))
    t0 = time.perf_counter()
    figure_files = draw(results)
    results["timings"]["figures"] = time.perf_counter() - t0
    results["timings"]["total"] = time.perf_counter() - started
    results["files"] = sorted(["report.md", "report.json", "model.pt", *figure_files])
    text = write(results)
    table = summarise(results)
    if out_path is not None:
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buffer)
        publish(out_path, {
            "report.json": json.dumps(results, indent=1, allow_nan=False, ensure_ascii=False) + "\n",
            "report.md": text,
            "model.pt": buffer.getvalue(),
            **figure_files,
        })
        kept_steps.discard(keep_in)
    if emit is not None:
        _summarise(emit, table, results, out_path)
    return {"results": results, "model": model, "data": data, "out": out_path,
            "markdown": text, "table": table, "training": training}


def _summarise(emit: Callable[[str], object], table: str, results: dict, out_path: Path | None) -> None:
    for line in table.splitlines():
        emit(line)
    if out_path is not None:
        emit("")
        if results.get("resumed_steps"):
            emit(f"read {counted(results['resumed_steps'], 'finished step')} back from an interrupted run of this report "
                 f"({option('resume', False)} computes them again)")
        emit(f"wrote {folder_text(out_path)} ({', '.join(results['files'])}) in {results['timings']['total']:.1f} s; "
             f"read {out_path / 'report.md'}")


def _model_and_data(model, data, checkpoint, hidden, epochs, seed, progress, data_source, model_source):
    """``(model, Data, training summary or None, model description)`` from what the caller gave."""
    training = None
    loaded = load_checkpoint(checkpoint) if checkpoint is not None else None
    if model is None and isinstance(loaded, nn.Module):
        model = loaded
        model_source = model_source or f"{type(model).__name__}, a whole module from {checkpoint}"
        if data is None:
            data = digits_data()
    elif model is None:
        model, default_data, training = _default(loaded, checkpoint, hidden, epochs, seed, progress)
        if model_source is None:
            model_source = _default_source(model, checkpoint, training, seed)
        if data is None:
            data = default_data
    else:
        if loaded is not None:
            apply_checkpoint(model, loaded, checkpoint, said(
                "pass the checkpoint saved from this --model's architecture (or the --model factory that built it)",
                "pass the checkpoint saved from this model's architecture (or the model it was saved from)"))
        if data is None:
            raise TorchfimError("a model was given without data: pass " + said(
                "--data MODULE:FACTORY", "data, a tensor of inputs (or an (inputs, targets) pair)"))
    if not isinstance(data, Data):
        data = as_data(data, data_source or "the data passed in")
    elif data_source is not None:
        data = Data(data.inputs, data.targets, data_source)
    return model, data, training, model_source or type(model).__name__


def _default(state_dict, checkpoint, hidden, epochs: int, seed: int, progress: bool):
    """The embedded default model (trained, or loaded from ``state_dict``), with a progress bar."""
    from .._progress import ProgressBar

    bar = ProgressBar(total=epochs, disable=not progress or state_dict is not None, leave=False,
               unit="epoch", desc="training the default MLP")

    def on_epoch(epoch: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3g}")

    try:
        return default_model(state_dict, hidden=hidden, epochs=epochs, seed=seed, on_epoch=on_epoch,
                             checkpoint_name=str(checkpoint))
    finally:
        bar.close()


def _default_source(model: nn.Module, checkpoint, training: dict | None, seed: int) -> str:
    widths = "-".join(str(lin.out_features) for lin in model.modules() if isinstance(lin, nn.Linear))
    return f"the embedded default, the tanh MLP 64-{widths} of torchfim.demo, " + (
        f"with weights from {checkpoint}" if training is None
        else f"trained {counted(training['epochs'], 'epoch')} with Adam on the digits (seed {seed}): "
             f"train loss {training['loss']:.3g}, accuracy {100 * training['accuracy']:.1f}%"
    )
