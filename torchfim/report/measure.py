"""The report's computations: every call into torchfim, raw tensors and floats out.

Four parts, each timed: Tr(F) and its per-layer split with the score estimator's error bars on all
inputs (:func:`measure_trace`); the variances and bounds of Î1 and Î2 on the variance subset
(:func:`measure_variances`); the eigenvalues of the per-layer exact blocks
(:func:`measure_spectra`); the empirical Fisher with the true targets (:func:`measure_empirical`).
A "layer" is one parameter tensor; its quantities are those of the model with every other
parameter frozen, which makes θ that one tensor (:func:`only_trainable` for its spectrum; its trace
variances come with the model's from one pass, :mod:`torchfim.trace_summary`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import Tensor, nn

from ..engine.backend import NoForwardDerivative
from ..engine.derivative_settings import made_in_inference_mode
from .data import Inputs

__all__ = [
    "only_trainable",
    "json_float",
    "Steps",
    "measure_trace",
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
    """The progress bar of a report: ``step(description)`` names the next step, ``done()`` ticks it."""

    def __init__(self, total: int, progress: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, disable=not progress, leave=False, unit="step", desc="report")
        #: Whether the library's own bars show too: the Hessian estimator's sweeps over parameter entries,
        #: minutes on a transformer, get one below the report's.
        self.progress = progress

    def step(self, desc: str) -> None:
        """Name the step being computed."""
        self.bar.set_description(desc)

    def done(self) -> None:
        """Count one step as done."""
        self.bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        self.bar.close()


def measure_trace(model: nn.Module, X: Inputs, opts: dict, names: list[str], k: int, seed: int, steps: Steps) -> dict:
    """Tr(F) and diag(F) exact on all inputs, one score estimate with ``k`` labels (seed + 1), and
    the one-label variance of the trace estimator Î1, for the model and for each layer alone."""
    import torchfim
    from torchfim.trace_summary import score_trace_variances

    steps.step("Tr(F) exact")
    trace_exact = torchfim.fisher(model, X, **opts, structure="trace")
    steps.done()
    steps.step("diag(F) exact")
    diag_exact = torchfim.fisher(model, X, **opts, structure="diag").detach()
    steps.done()
    steps.step("score estimate")
    diag_score = torchfim.fisher(
        model, X, **opts, estimator="score", structure="diag", n_samples=k,
        generator=torch.Generator().manual_seed(seed + 1),
    ).detach()
    steps.done()
    steps.step("Var Tr Î1 (all inputs), the model and each tensor")
    var1 = score_trace_variances(model, X, **opts, bounds=False)
    steps.done()
    return {"trace_exact": trace_exact, "diag_exact": diag_exact, "diag_score": diag_score,
            "var1_score_all": json_float(var1.variance),
            "layer_var1_score_all": [json_float(var1.tensor_variances[name]) for name in names]}


def measure_variances(model: nn.Module, S: Inputs, opts: dict, names: list[str], with_hessian: bool, steps: Steps) -> dict:
    """On the subset ``S``: diag(F), the trace estimators' variances and bounds for the model and
    each layer alone, and the diagonals of Var(Î1) and Var(Î2) (the Î2 figures None without Î2, and
    ``hessian_skipped`` saying why where the model has no forward-mode derivative for them).
    The trace figures of each estimator come from one pass over ``S`` (:mod:`torchfim.trace_summary`)."""
    import torchfim
    from torchfim.trace_summary import hessian_trace_variances, score_trace_variances

    steps.step("diag(F) on the subset")
    diag_subset = torchfim.fisher(model, S, **opts, structure="diag").detach()
    steps.done()
    steps.step("Var Tr Î1 and its bound, the model and each tensor")
    summaries = {"score": score_trace_variances(model, S, **opts)}
    steps.done()
    steps.step("Σ diag Var Î1")
    diagvar_score = torchfim.fisher_variance(model, S, **opts, estimator="score", structure="diag").detach()
    steps.done()
    skipped = None
    if with_hessian:
        steps.step("Var Î2: traces and diagonal")
        try:
            summaries["hessian"] = hessian_trace_variances(model, S, **opts, progress=steps.progress)
        except NoForwardDerivative as err:  # the rest of the report stands without Î2's figures
            skipped = f"the Hessian estimator's (Î2) variances were skipped: {err}"
        steps.done()
    subset_total: dict[str, float | None] = {}
    subset_layers: list[dict[str, float | None]] = [{} for _ in names]
    for est in ("score", "hessian"):
        got = summaries.get(est)
        subset_total[f"var_{est}"] = json_float(got.variance) if got else None
        subset_total[f"bound_{est}"] = json_float(got.bound) if got else None
        for name, layer in zip(names, subset_layers):
            layer[f"var_{est}"] = json_float(got.tensor_variances[name]) if got else None
            layer[f"bound_{est}"] = json_float(got.tensor_bounds[name]) if got and got.tensor_bounds else None
    hessian = summaries.get("hessian")
    return {"diag_subset": diag_subset, "subset_total": subset_total, "subset_layers": subset_layers,
            "diagvar_score": diagvar_score, "diagvar_hessian": hessian.diag_variance if hessian else None,
            "hessian_skipped": skipped}


def measure_spectra(
    model: nn.Module, X: Inputs, opts: dict, names: list[str], layers: list[int], steps: Steps
) -> dict[int, list[float]]:
    """Layer index -> the eigenvalues (largest first, float64) of its exact block on all inputs."""
    import torchfim

    spectra: dict[int, list[float]] = {}
    for i in layers:
        steps.step(f"eigenvalues {names[i]}")
        with only_trainable(model, names[i]):
            block = torchfim.fisher(model, X, **opts, structure="full")
        eig = torch.linalg.eigvalsh(block.detach().double().cpu()).flip(0)
        spectra[i] = [float(v) for v in eig]
        del block
        steps.done()
    return spectra


def measure_empirical(model: nn.Module, X: Inputs, Y: Tensor | None, opts: dict, steps: Steps) -> Tensor | None:
    """diag of the empirical Fisher with the true targets ``Y`` (None without targets).

    Dict inputs get ``Y`` back as their ``labels``, so that the library pairs them with the outputs as
    it pairs a dict batch's own (a Hugging Face causal language model's shifted as its loss shifts them).
    """
    import torchfim

    if Y is None:
        return None
    steps.step("empirical Fisher")
    given = {"inputs": {**X, "labels": Y}} if isinstance(X, dict) else {"inputs": X, "targets": Y}
    diag_emp = torchfim.fisher(model, **given, **opts, estimator="empirical", structure="diag").detach()
    steps.done()
    return diag_emp
