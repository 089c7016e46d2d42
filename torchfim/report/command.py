"""``torchfim report``: the command line of :func:`torchfim.report.run_report`."""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from .. import toy
from .._words import a_or_an
from ..cli.types import layer_widths, nonnegative_int, positive_float, positive_int, seed_int, thread_count
from ..errors import TorchfimError
from .data import as_data
from .kept_steps import FOLDER
from .load import call_factory, ensure_cwd_on_path, load_factory
from .publish import check_out
from .run import run_report
from .settings import (
    DEFAULT_EPOCHS,
    DEFAULT_MAX_BLOCK,
    DEFAULT_OUT,
    DEFAULT_VARIANCE_INPUTS,
    HESSIAN_BUDGET,
    MIN_AUTO_VARIANCE_INPUTS,
    MODES,
)
from .wording import on_command_line

__all__ = ["HELP", "add_arguments", "main"]

HELP = "write a Fisher-information report (Tr(F) with error bars, Î1 vs Î2, spectra) of a model"


def interrupted_hint(out: str) -> str:
    """What to do after an interruption (printed by :mod:`torchfim.cli`), by what :mod:`.kept_steps` kept in ``out``."""
    folder = Path(out) / FOLDER
    if folder.is_dir() and any(folder.iterdir()):
        return (f"the finished steps are kept in --out's {FOLDER}/ folder; run the same command again (without "
                "--no-resume) to go on from them")
    return "no step had finished, so nothing was kept; the same command starts again from the beginning"


def noise_scale(text: str) -> float:
    """``--sigma``: a number within :data:`torchfim.families.gaussian.SIGMA_RANGE`, which the Gaussian family takes."""
    from ..families.gaussian import SIGMA_RANGE

    value = positive_float(text)
    low, high = SIGMA_RANGE
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"expected a noise scale from {low:g} to {high:g}, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``torchfim report``."""
    from ..families import FAMILIES

    parser.add_argument("--model", metavar="MODULE:FACTORY",
                        help="importable callable returning the nn.Module (current directory on "
                             "sys.path; file.py:FACTORY works too). Default: the demo's MLP, "
                             "trained briefly on scikit-learn's digits")
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="the weights for --model (or the default MLP): a torch.save file (a state dict, "
                             "or a whole module, unpickled: only files you trust), a .safetensors file, or a "
                             "Hugging Face checkpoint folder (save_pretrained's, a Trainer's checkpoint-N)")
    parser.add_argument("--data", metavar="MODULE:FACTORY",
                        help="callable returning the inputs: a tensor, an (inputs, targets) pair, "
                             "a Dataset yielding (x, y), or a dict of keyword inputs (a tokenizer's "
                             "output; its 'labels' are the targets). Default: the 1797 digits")
    parser.add_argument("--family", default="categorical", choices=sorted(FAMILIES),
                        help="output distribution of the model (default: categorical)")
    parser.add_argument("--sigma", type=noise_scale, default=None, metavar="σ",
                        help="the noise scale σ of --family gaussian, y ~ N(output, σ²), from 1e-75 to 1e75 (default: "
                             "1); the Fisher scales as 1/σ²")
    parser.add_argument("--mask", metavar="KEY", default=None,
                        help="for outputs with positions (a language model's tokens): the entry of the "
                             "dict inputs marking observed positions, e.g. attention_mask (default: all)")
    parser.add_argument("--class-dim", type=int, choices=(-1, 1), default=None,
                        help="where the classes are in outputs with positions: -1, (batch, *positions, C), or "
                             "1, (batch, C, *positions) as F.cross_entropy takes them (default: last, with a "
                             "note in the report for outputs with two or more position dims)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"report directory (default: {DEFAULT_OUT}/); the report writes only its "
                             "own files there (an earlier report's are replaced, all others kept)")
    parser.add_argument("--n-samples", type=positive_int, default=1,
                        help="labels per input for the score estimate and its error bars (default: 1; at "
                             "least 2 in the score-only report, whose error bars come from their spread)")
    parser.add_argument("--variance-inputs", type=positive_int, default=None, metavar="N",
                        help=f"inputs (a seeded random subset) for the Î1-vs-Î2 variances; the "
                             f"Hessian estimator costs a pass per parameter over them (default: "
                             f"{DEFAULT_VARIANCE_INPUTS}, fewer where parameters × output positions "
                             f"exceed {HESSIAN_BUDGET // DEFAULT_VARIANCE_INPUTS}, and none of Î2's "
                             f"over {HESSIAN_BUDGET // MIN_AUTO_VARIANCE_INPUTS}); unused by the score-only report")
    parser.add_argument("--max-block", type=nonnegative_int, default=DEFAULT_MAX_BLOCK, metavar="N",
                        help="compute eigenvalues of layers with at most N parameters "
                             f"(default: {DEFAULT_MAX_BLOCK}); unused by the score-only report")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="seed for the default model's training, the subset and sampled labels "
                             "(default: 0)")
    parser.add_argument("--epochs", type=positive_int, default=DEFAULT_EPOCHS,
                        help=f"training epochs of the default model, all of them however long they take (a few "
                             "hundredths of a second each on one core), so a seed gives the same model and "
                             f"report on every run (default: {DEFAULT_EPOCHS})")
    parser.add_argument("--hidden", type=layer_widths, default=None, metavar="W1,W2,...",
                        help="hidden widths of the default model (default: "
                             f"{','.join(map(str, toy.HIDDEN))})")
    parser.add_argument("--threads", type=thread_count, default=None,
                        help="torch intra-op threads, at most 256 (default: 1 for the embedded default model, "
                             "whose tensors are small; torch's own setting for --model)")
    parser.add_argument("--mode", choices=sorted(MODES), default="auto",
                        help="full: the exact Fisher, variances, bounds and spectra, however long they take "
                             "(refused where they would not fit in memory); score-only: Tr(F) per layer by the "
                             "score estimator with error bars from at least 2 labels per input; auto (default): "
                             "full where it fits in memory and its estimated time in 30 minutes")
    parser.add_argument("--no-resume", action="store_true",
                        help="compute every step again; by default a report run again after an interruption reads "
                             "the steps it had finished back from --out (kept there until the report is written)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(_interrupted=lambda args: interrupted_hint(args.out))


def _command(args: argparse.Namespace, unused: object = ()) -> str:
    """The command line that re-creates this report (options left at their defaults omitted, and those in
    ``unused``, the report.json's ``unused_options`` of a score-only report)."""
    import shlex

    defaults = {"model": None, "checkpoint": None, "data": None, "family": "categorical", "sigma": None, "mask": None,
                "class_dim": None, "mode": "auto",
                "out": DEFAULT_OUT, "n_samples": 1, "variance_inputs": None,
                "max_block": DEFAULT_MAX_BLOCK, "seed": 0, "epochs": DEFAULT_EPOCHS, "hidden": None}
    parts = ["torchfim", "report"]
    for key, default in defaults.items():
        value = getattr(args, key, default)
        if key in unused or value == default or (key == "hidden" and value is not None and tuple(value) == toy.HIDDEN):
            continue
        text = ",".join(map(str, value)) if key == "hidden" else str(value)
        parts += ["--" + key.replace("_", "-"), text]
    return " ".join(shlex.quote(p) for p in parts)


def main(args: argparse.Namespace) -> int:
    """Run ``torchfim report`` with the parsed options; its messages name these flags, not run_report's keywords."""
    with on_command_line():
        return _report(args)


def _report(args: argparse.Namespace) -> int:
    """The options checked, the model and data built from their factories, and the report run."""
    from ..families import Gaussian

    ensure_cwd_on_path()
    if args.model is not None and (args.hidden is not None or args.epochs != DEFAULT_EPOCHS):
        raise TorchfimError("--hidden and --epochs describe the default model; drop them with --model")
    if args.model is None and args.checkpoint is not None and args.epochs != DEFAULT_EPOCHS:
        raise TorchfimError("--epochs trains the default model, but --checkpoint loads its weights; drop one")
    if args.model is None and args.data is not None and args.checkpoint is None:
        raise TorchfimError(
            "--data without --model would analyse the default MLP (trained on the digits) on your "
            "data; pass --model MODULE:FACTORY for your model (and --checkpoint for its weights)"
        )
    if args.sigma is not None and args.family != "gaussian":
        raise TorchfimError(f"--sigma is the noise scale of the Gaussian family, but --family is {args.family}; drop "
                            "--sigma, or pass --family gaussian")
    check_out(args.out)
    model = data = None
    if args.model is not None:
        model = call_factory(load_factory(args.model, "--model"), args.model, "--model")
        if not isinstance(model, nn.Module):
            raise TorchfimError(
                f"--model {args.model}: the factory returned {a_or_an(type(model).__name__)}, not a "
                "torch.nn.Module; return the model"
            )
    if args.data is not None:
        raw = call_factory(load_factory(args.data, "--data"), args.data, "--data")
        data = as_data(raw, f"{args.data}()", "--data")
    threads = args.threads if args.threads is not None else (1 if args.model is None else None)
    run_report(
        model, data, family=args.family if args.sigma is None else Gaussian(sigma=args.sigma), out=args.out, checkpoint=args.checkpoint,
        n_samples=args.n_samples, variance_inputs=args.variance_inputs, max_block=args.max_block,
        seed=args.seed, epochs=args.epochs, hidden=args.hidden, threads=threads,
        progress=not args.no_progress, command=lambda results: _command(args, results.get("unused_options", ())), mask=args.mask, class_dim=args.class_dim,
        score_only=MODES[args.mode], resume=not args.no_resume,
        model_source=None if args.model is None else f"{args.model}()"
        + (f" with weights from {args.checkpoint}" if args.checkpoint else ""),
    )
    return 0
