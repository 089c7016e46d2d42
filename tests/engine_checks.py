"""Checks the engine's rule tests share: which rule each module got, and a Fisher against the dense oracle or the
whole-model backend."""

from __future__ import annotations

import warnings

import torch
from oracles import blocks, exact_fisher
from torch import nn

import torchfim
from torchfim.engine import ModelView, batches
from torchfim.engine.per_module import PerModuleBackend
from torchfim.engine.view import forward_defaults


def module_rules(model: nn.Module, x: torch.Tensor | dict, output=None) -> tuple[PerModuleBackend, dict]:
    """The per-module backend after recording ``x`` once (the coverage check done), and its rules by the
    path of their module; ``output`` as :func:`torchfim.fisher` takes it (a Hugging Face model's inputs get
    ``use_cache=False`` as the library passes it)."""
    view = ModelView(model, output=output)
    backend = PerModuleBackend(view)
    inputs = {**forward_defaults(model), **x} if isinstance(x, dict) else x
    backend.record(next(batches(inputs, None, view.device, view.dtype)))
    paths = {m: p for p, m in view.model.named_modules()}
    return backend, {paths[m]: r for m, r in backend.rules.items()}


def assert_equals_dense(got: torch.Tensor | dict, full: torch.Tensor, model: nn.Module, structure: str) -> None:
    """``got`` (the full matrix, a diagonal, or blocks by parameter name) equals the dense ``full`` to 1e-10."""
    if structure == "full":
        assert torch.allclose(got, full, rtol=1e-10, atol=1e-14)
        return
    if structure == "diag":
        assert torch.allclose(got, torch.diagonal(full), rtol=1e-10, atol=1e-14)
        return
    for name, block in blocks(full, model).items():
        assert torch.allclose(got[name], block, rtol=1e-10, atol=1e-14), name


def assert_quietly_equals_dense_over(model: nn.Module, xs: list[torch.Tensor]) -> None:
    """The full categorical Fisher of ``model`` over the mini-batches ``xs``, in one call with no warning, equals the
    dense oracle of each weighted by its inputs: ``Σ_b n_b F_b / Σ_b n_b``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torchfim.fisher(model, xs, structure="full")
    want = sum(len(x) * exact_fisher(model, x, "categorical") for x in xs) / sum(len(x) for x in xs)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


def assert_quietly_equals_dense(model: nn.Module, x: torch.Tensor, structure: str) -> tuple[PerModuleBackend, dict]:
    """The categorical Fisher of ``model`` on ``x`` in ``structure`` equals the dense oracle, with no warning on
    the way (nothing moved, demoted or looped); the backend and rules as :func:`module_rules` gives them."""
    full = exact_fisher(model, x, "categorical")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = torchfim.fisher(model, x, structure=structure)
    assert_equals_dense(got, full, model, structure)
    return module_rules(model, x)


def assert_same_fisher(got: torch.Tensor | dict, want: torch.Tensor | dict) -> None:
    """Two results of one structure (a tensor, or blocks by parameter name) agree to 1e-10."""
    if isinstance(want, dict):
        assert all(torch.allclose(got[n], want[n], rtol=1e-10, atol=1e-14) for n in want)
    else:
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-14)


def torchfim_messages(caught: list) -> list[str]:
    """The messages of torchfim's own warnings among ``caught``."""
    return [str(w.message) for w in caught if str(w.message).startswith("torchfim")]


def assert_matches_functional(model: nn.Module, x: torch.Tensor, estimator: str, targets: torch.Tensor) -> None:
    """The diagonal of ``estimator`` (the same labels: one seeded generator; ``targets`` for the empirical
    Fisher) and, for the sampled estimators, the closed-form variances of the diagonal and the trace equal
    the whole-model torch.func backend's to rounding."""
    kw = {"targets": targets} if estimator == "empirical" else {}

    def both(call) -> tuple[torch.Tensor, torch.Tensor]:
        return call("auto"), call("functional")

    pairs = [both(lambda b: torchfim.fisher(model, x, estimator=estimator, structure="diag", backend=b,
                                            generator=torch.Generator().manual_seed(1), **kw))]
    if estimator != "empirical":
        pairs += [both(lambda b, s=s: torchfim.fisher_variance(model, x, estimator=estimator, structure=s, backend=b))
                  for s in ("diag", "trace")]
    for got, reference in pairs:
        assert torch.allclose(got, reference, rtol=1e-10, atol=1e-14 * reference.abs().max())


def _rules(model: nn.Module, x: torch.Tensor) -> dict[str, str]:
    return {path: type(rule).__name__ for path, rule in module_rules(model, x)[1].items()}


def _assert_equals_functional(model: nn.Module, x: torch.Tensor, estimator: str, seed: int,
                              structures: tuple[str, ...] = ("diag", "blocks"), atol: float = 1e-12) -> None:
    """The per-module backend's Fisher equals the functional backend's (same labels) to 1e-10."""
    for structure in structures:
        kw = dict(estimator=estimator, structure=structure, generator=torch.Generator().manual_seed(seed))
        got = torchfim.fisher(model, x, **kw)
        kw["generator"] = torch.Generator().manual_seed(seed)
        want = torchfim.fisher(model, x, backend="functional", **kw)
        if structure == "diag":
            assert torch.allclose(got, want, rtol=1e-10, atol=atol)
        else:
            assert all(torch.allclose(got[k], want[k], rtol=1e-10, atol=atol) for k in want)
