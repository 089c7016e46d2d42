"""Unknown keyword arguments of a public call, explained: the peers' keywords (BackPACK, curvlinops, nngeometry,
laplace-torch, ASDL) and near-misses of torchfim's own, named with what to pass instead.

Python's own error (``fisher() got an unexpected keyword argument 'loss_func'``) names the problem but not the
fix; :func:`explains_keywords` adds the fix and keeps the error a :class:`TypeError`.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable
from typing import TypeVar

from .errors import TorchfimError
from .families import loss_family_hint

__all__ = ["UnknownKeywordError", "explains_keywords", "keyword_hint"]


class UnknownKeywordError(TorchfimError, TypeError):
    """A keyword argument the function does not take; the message says what to pass instead."""


_LOSS = ("torchfim takes the distribution of the outputs as family= ('categorical' for CrossEntropyLoss, "
         "'gaussian' for MSELoss, 'bernoulli' for BCEWithLogitsLoss; docs/peers.md)")
_REDUCTION = ("torchfim's Fisher is the mean over inputs of the sum over each input's positions (docs/math.md §2.4 "
              "and §5.5): multiply it by the number of inputs for a summed loss's curvature, divide it by the "
              "positions per input for a per-token mean")
_TARGETS = ("true labels go with the inputs, as (inputs, targets) pairs or a DataLoader of them (fisher also takes "
            "targets=); estimator='empirical' reads their values, every estimator their -100s")
_DATA = "pass the inputs as the second positional argument (a tensor, (inputs, targets) pairs or a DataLoader)"
_METHOD = "backend= ('auto', 'modules' or 'functional'; method= is its old name, which fisher and fisher_variance take)"
_DAMPING = ("torchfim returns the Fisher itself, without damping or prior: add λ·I (or the prior precision) to the "
            "result, or solve with it damped, as_structure(result, model).solve(v, damping=λ) (docs/uses.md)")

#: The peers' keyword names (and near-misses of torchfim's own): the keyword of torchfim's they stand for (None:
#: none, the hint holds for every call), and what to say where the function takes that keyword.
FOREIGN_KEYWORDS: dict[str, tuple[str | None, str]] = {
    **dict.fromkeys(("loss_func", "lossfunc", "loss_fn", "loss", "criterion", "likelihood"), ("family", _LOSS)),
    "reduction": (None, _REDUCTION),
    **dict.fromkeys(("data", "dataloader", "data_loader", "loader", "train_loader", "x", "X"),
                    ("inputs", _DATA)),
    **dict.fromkeys(("labels", "y"), (None, _TARGETS)),
    **dict.fromkeys(("mc_samples", "num_samples", "n_mc", "num_mc_samples", "samples", "nsamples", "n_sample"),
                    ("n_samples", "n_samples= (sampled labels per input)")),
    **dict.fromkeys(("fisher_type", "curvature", "hessian_type", "variant"),
                    ("estimator", "estimator= ('exact', 'score', 'hessian' or 'empirical')")),
    **dict.fromkeys(("hessian_structure", "representation", "repr", "subset_of_weights"),
                    ("structure", "structure= ('full', 'diag', 'trace' or 'blocks')")),
    **dict.fromkeys(("damping", "prior_precision", "prior_prec"), (None, _DAMPING)),
    **dict.fromkeys(("sigma", "std", "noise_std", "sigma_noise"),
                    (None, "a Gaussian's σ goes with the family: family=torchfim.families.Gaussian(sigma=0.5)")),
    **dict.fromkeys(("device", "dtype"),
                    (None, ("torchfim computes on the model's device and in its dtype, and moves the inputs there: "
                            "move the model (model.to(device, dtype))"))),
    "method": ("backend", _METHOD),
}

#: Keywords one function lacks that a sibling takes, named with the sibling.
_ELSEWHERE = {
    ("compare_estimators", "structure"): ("compare_estimators compares each parameter tensor's diagonal; "
                                          "fisher_variance(structure=...) gives the variances of another structure"),
    ("compare_estimators", "estimator"): "compare_estimators compares both estimators, 'score' and 'hessian'",
    ("samples_needed", "n_samples"): "samples_needed returns the labels per input (n_samples) that reach rel_error",
}

Function = TypeVar("Function", bound=Callable)


def keyword_hint(name: str, keyword: str, value: object, accepted: list[str]) -> str:
    """What to pass to ``name`` instead of ``keyword=value``: a sibling's or a peer's keyword, or the nearest
    of ``accepted``; empty where there is nothing to say."""
    if (name, keyword) in _ELSEWHERE:
        return _ELSEWHERE[name, keyword]
    stands_for, hint = FOREIGN_KEYWORDS.get(keyword, ("", ""))
    if hint and (stands_for is None or stands_for in accepted):
        return (loss_family_hint(value) if hint is _LOSS else "") or hint
    near = difflib.get_close_matches(keyword, accepted, n=1, cutoff=0.7)
    return f"did you mean {near[0]}=?" if near else ""


def explains_keywords(function: Function, options: tuple[str, ...] = ()) -> Function:
    """Decorate a public function (or ``__init__``) so that a keyword it does not take raises an
    :class:`UnknownKeywordError` naming what to pass instead (:func:`keyword_hint`), before the call runs.
    ``options``: the names its ``**options`` take (a function with ``**`` and no ``options`` is not checked)."""
    signature = inspect.signature(function)
    named = [p for p, v in signature.parameters.items() if v.kind not in (v.VAR_POSITIONAL, v.VAR_KEYWORD)]
    takes_any = any(v.kind == v.VAR_KEYWORD for v in signature.parameters.values()) and not options
    accepted = frozenset((*named, *options))
    name = function.__qualname__.rpartition("<locals>.")[2].removesuffix(".__init__")

    @functools.wraps(function)
    def call(*args: object, **kwargs: object) -> object:
        if not takes_any and not accepted.issuperset(kwargs):
            unknown = [k for k in kwargs if k not in accepted]
            hints = [(k, keyword_hint(name, k, kwargs[k], sorted(accepted))) for k in unknown]
            listed = "; ".join(f"{k!r}: {h}" if h else repr(k) for k, h in hints)
            raise UnknownKeywordError(f"{name}() takes no keyword argument {listed}")
        return function(*args, **kwargs)

    return call  # type: ignore[return-value]
