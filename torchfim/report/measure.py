"""The report's computations: every call into torchfim, raw tensors and floats out.

Four parts, each timed: Tr(F) and its per-layer split with the score estimator's error bars on all
inputs (:func:`measure_trace`), with which layers' gradients are rounding, not data (:func:`measure_rounding`,
timed with it); the variances and bounds of Î1 and Î2 on the variance subset
(:func:`measure_variances`); the eigenvalues of the per-layer exact blocks
(:func:`measure_spectra`); the empirical Fisher with the true targets (:func:`measure_empirical`).
A "layer" is one parameter tensor; its quantities are those of the model with every other
parameter frozen, which makes θ that one tensor (:func:`only_trainable` for its spectrum; its trace
variances come with the model's from one pass, :mod:`torchfim.trace_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from ..engine.backend import NoForwardDerivative
from ..engine.derivative_settings import made_in_inference_mode
from .data import Inputs
from .kept_steps import KeptSteps
from .warned import step_warnings, warn_again

__all__ = [
    "only_trainable",
    "json_float",
    "Steps",
    "measure_trace",
    "measure_rounding",
    "measure_variances",
    "measure_spectra",
    "measure_empirical",
]


@contextmanager
def only_trainable(model: nn.Module, name: str) -> Iterator[None]:
    """Make ``name`` the only parameter with ``requires_grad=True`` (restored afterwards)."""
    params = dict(model.named_parameters())
    saved = {n: p.requires_grad for n, p in params.items()}
    try:
        for n, p in params.items():
            _requires_grad(p, n == name)
        yield
    finally:
        for n, p in params.items():
            _requires_grad(p, saved[n])


def _requires_grad(p: Tensor, flag: bool) -> None:
    """``p.requires_grad_(flag)``; inside inference mode for a parameter made there (a model loaded for
    evaluation), where torch alone allows turning it on."""
    with torch.inference_mode() if made_in_inference_mode(p) else nullcontext():
        p.requires_grad_(flag)


def json_float(x: object) -> float | None:
    """A JSON-safe float (None for NaN/inf/None)."""
    if x is None:
        return None
    v = float(x.detach().double().cpu()) if isinstance(x, Tensor) else float(x)  # type: ignore[arg-type]
    return v if math.isfinite(v) else None


class Steps:
    """The progress bar of a report: ``step(description)`` names the next step, ``done()`` ticks it;
    :meth:`run` does both around a step whose result ``kept`` (:mod:`.kept_steps`) keeps on disk."""

    def __init__(self, total: int, progress: bool, kept: KeptSteps | None = None) -> None:
        from .._progress import ProgressBar

        self.bar = ProgressBar(total=total, disable=not progress, leave=False, unit="step", desc="report")
        #: Whether the library's own bars show too: the Hessian estimator's sweeps over parameter entries,
        #: minutes on a transformer, get one below the report's.
        self.progress = progress
        self.kept = KeptSteps(None, "") if kept is None else kept

    def step(self, desc: str) -> None:
        """Name the step being computed."""
        self.bar.set_description(desc)

    def done(self) -> None:
        """Count one step as done."""
        self.bar.update(1)

    def run(self, desc: str, compute: Callable[[], object]) -> object:
        """The result of the step ``desc``: kept from an interrupted run of the same report (its library
        warnings warned again), else ``compute()`` (then kept, with them: :mod:`.warned`); ``desc`` names the step
        on the bar and in the folder of kept steps."""
        self.step(desc)
        found, result, said = self.kept.get(desc)
        if found:
            warn_again(said)
        else:
            with step_warnings() as said:
                result = compute()
            self.kept.put(desc, result, said)
        self.done()
        return result

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


def measure_trace(model: nn.Module, X: Inputs, opts: dict, names: list[str], k: int, seed: int, steps: Steps) -> dict:
    """Tr(F) and diag(F) exact on all inputs, one score estimate with ``k`` labels (seed + 1), and
    the one-label variance of the trace estimator Î1, for the model and for each layer alone."""
    import torchfim
    from torchfim.trace_summary import score_trace_variances

    trace_exact = steps.run("Tr(F) exact", lambda: torchfim.fisher(model, X, **opts, structure="trace").detach())
    diag_exact = steps.run("diag(F) exact", lambda: torchfim.fisher(model, X, **opts, structure="diag").detach())
    diag_score = steps.run("score estimate", lambda: torchfim.fisher(
        model, X, **opts, estimator="score", structure="diag", n_samples=k,
        generator=torch.Generator().manual_seed(seed + 1),
    ).detach())

    def score_variances() -> dict:
        var1 = score_trace_variances(model, X, **opts, bounds=False)
        return {"var1_score_all": json_float(var1.variance),
                "layer_var1_score_all": [json_float(var1.tensor_variances[name]) for name in names]}

    return {"trace_exact": trace_exact, "diag_exact": diag_exact, "diag_score": diag_score,
            **steps.run("Var Tr Î1 (all inputs), the model and each tensor", score_variances)}


def measure_rounding(model: nn.Module, S: Inputs, opts: dict, names: list[str], seed: int,
                     steps: Steps) -> dict[str, float | None] | None:
    """Per layer, how far its score gradients on the first inputs of ``S`` differ between the model's precision and
    another (:func:`torchfim.report.rounding.rounding_disagreement`: near 0 for data, near 1 for rounding)."""
    from .rounding import rounding_disagreement

    return steps.run("rounding check: each tensor's gradients in two precisions",
                     lambda: rounding_disagreement(model, S, opts, names, seed))


def measure_variances(model: nn.Module, S: Inputs, opts: dict, names: list[str], with_hessian: bool, steps: Steps) -> dict:
    """On the subset ``S``: diag(F), the trace estimators' variances and bounds for the model and
    each layer alone, and the diagonals of Var(Î1) and Var(Î2) (the Î2 figures None without Î2, and
    ``hessian_skipped`` saying why where the model has no forward-mode derivative for them).
    The trace figures of each estimator come from one pass over ``S`` (:mod:`torchfim.trace_summary`)."""
    import torchfim
    from torchfim.trace_summary import hessian_trace_variances, score_trace_variances

    diag_subset = steps.run("diag(F) on the subset", lambda: torchfim.fisher(model, S, **opts, structure="diag").detach())
    summaries = {"score": steps.run("Var Tr Î1 and its bound, the model and each tensor",
                                    lambda: _summary(score_trace_variances(model, S, **opts), names))}
    diagvar_score = steps.run("Σ diag Var Î1", lambda: torchfim.fisher_variance(
        model, S, **opts, estimator="score", structure="diag").detach())
    skipped = None

    def hessian_variances() -> dict:
        try:
            return _summary(hessian_trace_variances(model, S, **opts, progress=steps.progress), names)
        except NoForwardDerivative as err:  # the rest of the report stands without Î2's figures
            return {"skipped": f"the Hessian estimator's (Î2) variances were skipped: {err}"}

    if with_hessian:
        part = steps.run("Var Î2: traces and diagonal", hessian_variances)
        skipped = part.get("skipped")
        if skipped is None:
            summaries["hessian"] = part
    subset_total: dict[str, float | None] = {}
    subset_layers: list[dict[str, float | None]] = [{} for _ in names]
    missing = {"variance": None, "bound": None, "tensor_variances": [None] * len(names),
               "tensor_bounds": [None] * len(names)}
    for est in ("score", "hessian"):
        got = summaries.get(est, missing)
        subset_total[f"var_{est}"], subset_total[f"bound_{est}"] = got["variance"], got["bound"]
        for layer, variance, bound in zip(subset_layers, got["tensor_variances"], got["tensor_bounds"]):
            layer[f"var_{est}"], layer[f"bound_{est}"] = variance, bound
    hessian = summaries.get("hessian")
    return {"diag_subset": diag_subset, "subset_total": subset_total, "subset_layers": subset_layers,
            "diagvar_score": diagvar_score, "diagvar_hessian": hessian["diag_variance"] if hessian else None,
            "hessian_skipped": skipped}


def _summary(got, names: list[str]) -> dict:
    """A trace summary (:mod:`torchfim.trace_summary`) as plain numbers, to keep: the model's variance and
    bound, each tensor's (by ``names``' order; bounds None where not computed), the diagonal variance."""
    return {"variance": json_float(got.variance), "bound": json_float(got.bound),
            "tensor_variances": [json_float(got.tensor_variances[name]) for name in names],
            "tensor_bounds": [json_float(got.tensor_bounds[name]) if got.tensor_bounds else None for name in names],
            "diag_variance": None if got.diag_variance is None else got.diag_variance.detach()}


def measure_spectra(
    model: nn.Module, X: Inputs, opts: dict, names: list[str], layers: list[int], steps: Steps
) -> dict[int, list[float]]:
    """Layer index -> the eigenvalues (largest first, float64) of its exact block on all inputs."""
    import torchfim

    def eigenvalues(name: str) -> list[float]:
        with only_trainable(model, name):
            block = torchfim.fisher(model, X, **opts, structure="full")
        return [float(v) for v in torch.linalg.eigvalsh(block.detach().double().cpu()).flip(0)]

    return {i: steps.run(f"eigenvalues {names[i]}", lambda name=names[i]: eigenvalues(name)) for i in layers}


def measure_empirical(model: nn.Module, X: Inputs, Y: Tensor | None, opts: dict, steps: Steps) -> Tensor | None:
    """diag of the empirical Fisher with the true targets ``Y`` (None without targets).

    Dict inputs carry ``Y`` as their ``labels`` (:meth:`.Data.given`, as in every library call of the report),
    so that the library pairs them with the outputs as it pairs a dict batch's own (a Hugging Face causal
    language model's shifted as its loss shifts them); tensor inputs whose targets hold -100 come as their
    ``(inputs, targets)`` mini-batch.
    """
    import torchfim

    if Y is None:
        return None
    if isinstance(X, dict):
        given = {"inputs": {**X, "labels": Y}}
    else:  # a tensor, or the (inputs, targets) mini-batch of targets with -100
        given = {"inputs": X} if isinstance(X, list) else {"inputs": X, "targets": Y}
    return steps.run("empirical Fisher", lambda: torchfim.fisher(
        model, **given, **opts, estimator="empirical", structure="diag").detach())
