"""The demo: a small MLP trained on scikit-learn's digits, and its Fisher information by the four
estimators side by side.

``torchfim demo`` (or ``scripts/demo``) runs :func:`run_demo`: it trains a 64-32-32-10 tanh MLP with
Adam for a fixed number of epochs (stopping early if a time limit is reached first), then computes,
on all 1797 digits, Tr(F) and the diagonal of F with the ``exact``, ``score``, ``hessian`` and
``empirical`` estimators, and prints them as a table. The ``score`` and ``hessian`` rows draw
``n_samples`` labels per input from the model with a seeded ``torch.Generator``; ``empirical`` uses
the true labels, so it is the biased one.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

from . import toy
from ._words import counted
from .cli.types import layer_widths, positive_float, positive_int, seed_int, thread_count
from .errors import TorchfimError

__all__ = ["run_demo", "format_table", "ESTIMATORS", "EPOCHS", "HELP", "add_arguments", "main"]

#: Estimators shown by the demo, in table order.
ESTIMATORS = ("exact", "score", "hessian", "empirical")

#: At most this many epochs of Adam over mini-batches (about 2.5 s on 2 cores).
EPOCHS = 100

HELP = "train a small MLP on the digits and compare the four Fisher estimators"


#: The digits the Fisher is computed on (all of scikit-learn's), and their classes.
_DIGITS, _CLASSES = 1797, 10

_COLUMNS = ("estimator", "Tr(F)", "s.e.", "diag mean", "diag median", "diag max", "time(s)")
_KEYS = ("trace", "trace_se", "diag_mean", "diag_median", "diag_max", "time")


def _cell(key: str, value: float) -> str:
    if key == "time":
        return f"{value:.2f}"
    return "—" if math.isnan(value) else f"{value:.4g}"


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """The results as an aligned text table, one row per estimator (4 significant digits; ``—`` for a standard
    error that does not apply, NaN)."""
    body = []
    for name, r in rows.items():
        cells = [name] + [_cell(k, r.get(k, math.nan)) for k in _KEYS]
        body.append(cells)
    widths = [max(len(c[j]) for c in [list(_COLUMNS)] + body) for j in range(len(_COLUMNS))]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first] + rest).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(_COLUMNS), rule] + [line(c) for c in body])


def run_demo(
    seconds: float = 3.0,
    seed: int = 0,
    n_samples: int = 1,
    out: Callable[[str], object] | None = print,
    *,
    epochs: int = EPOCHS,
    hidden: tuple[int, ...] = toy.HIDDEN,
    progress: bool = True,
    threads: int | None = 1,
) -> dict:
    """Train the demo MLP on the digits, then compare the Fisher estimators on all 1797 inputs.

    The model is a tanh MLP ``64 - hidden... - 10`` (:func:`torchfim.toy.mlp`). Training runs
    ``epochs`` epochs of Adam, or stops at the first epoch end past ``seconds``. ``seed`` fixes the
    initialisation, the mini-batch order and the labels that ``score`` and ``hessian`` draw
    (each estimator gets a fresh ``torch.Generator`` seeded from it). ``out`` receives the printed
    lines (``None`` prints nothing); ``progress`` shows a progress bar on stderr (where that is not a terminal, a
    line every half minute and one at the end: :mod:`torchfim._progress`). ``threads`` sets torch's intra-op threads for the run (restored after; ``None`` leaves them): the demo's tensors
    are small; on an idle 2-core machine two threads were ~30% faster than one, on a busy one
    (other processes on both cores) 3-10x slower, so one is the default.

    Returns a dict with the trained ``model``, the ``inputs`` and ``targets`` used, ``n_parameters``,
    ``training`` (see :func:`torchfim.toy.train_classifier`), ``n_samples``, ``estimators`` (estimator name -> ``{"trace",
    "diag_mean", "diag_median", "diag_max", "time"}``, floats; ``trace`` is the sum of the
    diagonal, i.e. Tr(F) of that same estimate), ``diags`` (estimator name -> the P-vector) and the
    printed ``table``.
    """
    if not seconds > 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    if int(epochs) < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    if int(n_samples) < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    hidden = tuple(int(h) for h in hidden)
    if any(h < 1 for h in hidden):
        raise ValueError(f"hidden widths must be at least 1, got {hidden}")
    if threads is not None and int(threads) < 1:
        raise ValueError(f"threads must be at least 1 (or None), got {threads}")
    _check_labels_fit(int(n_samples), "n_samples")
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(int(threads))
    try:
        return _run_demo(seconds, seed, int(n_samples), out, int(epochs), hidden, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _check_labels_fit(n_samples: int, name: str) -> None:
    """Refuse, before training, ``n_samples`` labels per digit whose output scores would not fit in memory: the
    demo draws them for all the digits in one call (the library would refuse them after training, advising
    mini-batches the demo has no option for); ``name``: the option as the user gave it (``n_samples`` of
    :func:`run_demo`, ``--n-samples`` of the command)."""
    from ._memory import fits_in_memory, size_text

    per_label = _DIGITS * _CLASSES
    if per_label * n_samples < 2**26:  # as the library: under 0.5 GiB, not worth reading the free memory
        return
    fits, needed, free = fits_in_memory(per_label * n_samples, torch.float64, torch.device("cpu"))
    if not fits:
        most = int(free * 2**30 // (2 * 8 * per_label))  # fits_in_memory's two float64 copies of the scores
        given = f"{name} {n_samples}" if name.startswith("--") else f"{name}={n_samples}"
        raise TorchfimError(
            f"{given}: the demo draws that many labels for each of its {_DIGITS} digits at once, and their output "
            f"scores need about {size_text(needed)}, but {size_text(free)} is available; pass a smaller {name} "
            f"(at most {most:,} fit)"
        )


def _run_demo(seconds, seed, n_samples, out, epochs, hidden, progress) -> dict:
    from ._progress import ProgressBar
    from .datasets import load_digits

    X, y = load_digits()
    model = toy.mlp(X.shape[1], hidden, 10, seed=seed)
    bar = ProgressBar(total=epochs + len(ESTIMATORS), disable=not progress, leave=False, unit="step")
    try:
        training = _train(model, X, y, epochs, seconds, seed, bar)
        rows, diags = _estimate(model, X, y, n_samples, seed, bar)
    finally:
        bar.close()
    table = format_table(rows)
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    emit = out if out is not None else (lambda _line: None)
    stop = " (stopped by the time limit)" if training["stopped_by_time"] else ""
    emit(
        f"MLP {'-'.join(map(str, (X.shape[1], *hidden, 10)))} (tanh), {counted(n_params, 'parameter')}, trained "
        f"{counted(training['epochs'], 'epoch')} in {training['seconds']:.1f} s{stop}: "
        f"train loss {training['loss']:.3g}, accuracy {100 * training['accuracy']:.1f}%"
    )
    emit(
        f"Fisher information on all {X.shape[0]} digits (mean over inputs); score and hessian "
        f"draw {counted(n_samples, 'label')} per input from the model (seed {seed}), empirical uses the "
        f"true labels."
    )
    emit("")
    for row in table.splitlines():
        emit(row)
    emit("")
    emit("s.e.: the standard error of Tr(F) over the label draws, from the closed-form variance (fisher_variance); "
         "the exact Fisher has none, and the empirical Fisher is no estimate of F (its labels are the data's).")
    return {
        "model": model,
        "inputs": X,
        "targets": y,
        "n_parameters": n_params,
        "n_samples": n_samples,
        "seed": seed,
        "training": training,
        "estimators": rows,
        "diags": diags,
        "table": table,
    }


def _train(model, X, y, epochs: int, seconds: float, seed: int, bar) -> dict:
    """Train the demo model (one progress step per epoch); returns the training summary."""
    bar.set_description("training")

    def on_epoch(epoch: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(epoch=epoch, loss=f"{loss:.3g}")

    training = toy.train_classifier(
        model, X, y, epochs=epochs, seconds=seconds,
        generator=torch.Generator().manual_seed(seed), on_epoch=on_epoch,
    )
    if training["epochs"] < epochs:  # stopped by the time limit: skip the rest of the epochs
        bar.update(epochs - training["epochs"])
    bar.set_postfix()
    return training


def _estimate(model, X, y, n_samples: int, seed: int, bar) -> tuple[dict, dict]:
    """Each estimator's diagonal of F on all inputs: ``(rows of the table, diagonals)``."""
    import torchfim

    rows: dict[str, dict[str, float]] = {}
    diags: dict[str, torch.Tensor] = {}
    for name in ESTIMATORS:
        bar.set_description(f"fisher {name}")
        kwargs: dict = dict(family="categorical", estimator=name)
        if name == "empirical":
            kwargs["targets"] = y
        if name in ("score", "hessian"):  # the others draw no labels (and the library warns it ignores n_samples)
            kwargs["n_samples"] = n_samples
        t0 = time.perf_counter()
        # One diagonal per estimator; its sum is Tr(F) of that very estimate (same labels).
        # A separate structure="trace" call would cost as much again for "hessian".
        diag = torchfim.fisher(
            model, X, structure="diag",
            generator=torch.Generator().manual_seed(seed + 1), **kwargs,
        )
        elapsed = time.perf_counter() - t0
        diag = diag.detach()
        diags[name] = diag
        se = math.nan
        if name in ("score", "hessian"):  # the spread of this very Tr(F) over the labels (untimed)
            se = float(torchfim.fisher_variance(model, X, family="categorical", estimator=name, structure="trace",
                                                n_samples=n_samples)) ** 0.5
        rows[name] = {
            "trace": float(diag.sum()),
            "trace_se": se,
            "diag_mean": float(diag.mean()),
            "diag_median": float(diag.median()),
            "diag_max": float(diag.max()),
            "time": elapsed,
        }
        bar.update(1)
    return rows, diags


# ------------------------------------------------------------------- the command (torchfim.cli)
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchfim demo``."""
    parser.add_argument("--seconds", type=positive_float, default=3.0,
                        help="time limit for training, in seconds (default: 3)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="seed for initialisation, batches and sampled labels (default: 0)")
    parser.add_argument("--epochs", type=positive_int, default=EPOCHS,
                        help=f"at most this many training epochs (default: {EPOCHS})")
    parser.add_argument("--hidden", type=layer_widths, default=toy.HIDDEN, metavar="W1,W2,...",
                        help="hidden layer widths of the MLP (default: "
                             f"{','.join(map(str, toy.HIDDEN))}; empty for a linear model)")
    parser.add_argument("--n-samples", type=positive_int, default=1,
                        help="labels drawn per input by the score and hessian estimators "
                             "(default: 1)")
    parser.add_argument("--threads", type=thread_count, default=1,
                        help="torch intra-op threads (default: 1; 2 was ~30%% faster on an idle "
                             "2-core machine but several times slower on a busy one)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def main(args: argparse.Namespace) -> int:
    """Run ``torchfim demo`` with the parsed options."""
    _check_labels_fit(args.n_samples, "--n-samples")
    run_demo(seconds=args.seconds, seed=args.seed, n_samples=args.n_samples,
             epochs=args.epochs, hidden=args.hidden, progress=not args.no_progress,
             threads=args.threads)
    return 0
