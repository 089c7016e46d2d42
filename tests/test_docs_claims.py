"""Numbers and names the user documentation states as facts of the code, held where a test can hold them cheaply:
the defaults of the README's table, the thresholds the docs name (30 minutes, a minute, a factor of 10, a hundred
times), the step scan's grid and the diagnostics' defaults of docs/forecast.md, and worked figures of docs/uses.md
and docs/forecast.md. The docs' code blocks run in tests/doc_blocks.py; these are the claims in their prose."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch

import torchfim
import torchfim.train
from torchfim.families import Gaussian
from torchfim.forecast import Forecast, scan_steps


def _defaults(function) -> dict[str, object]:
    return {n: p.default for n, p in inspect.signature(function).parameters.items()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize(("function", "stated"), [
    (torchfim.fisher, {"structure": "diag", "family": "categorical", "estimator": "exact", "n_samples": 1}),
    (torchfim.fisher_variance, {"estimator": "score", "structure": "diag"}),
    (torchfim.variance_bound, {"estimator": "score", "structure": "diag"}),
    (torchfim.fisher_covariance, {"structure": "diag"}),
    (torchfim.combined_variance, {"structure": "diag"}),
    (torchfim.samples_needed, {"structure": "trace", "rel_error": 0.1}),
    (torchfim.train.FisherPenalty, {"alpha": 0.1, "every": 1, "kind": "batch_gradient", "grad_method": "exact"}),
    (torchfim.train.FisherTraceMonitor, {"every": 10, "n_samples": 1}),
], ids=lambda v: getattr(v, "__name__", ""))
def test_the_readme_table_defaults_are_the_signatures(function, stated) -> None:
    """README.md, "At a glance", and docs/training.md (the penalty's default kind and gradient)."""
    defaults = _defaults(function)
    assert {name: defaults[name] for name in stated} == stated


def test_the_thresholds_the_docs_name() -> None:
    """docs/report.md: the full report where its estimated time is within 30 minutes; docs/models.md and
    docs/speed.md: the exact Fisher and a second-order sweep warn past a minute; docs/training.md: a log axis where
    Tr(F) spans more than a factor of 10."""
    from torchfim.engine.directions import LONG_SWEEP_S
    from torchfim.estimators import LONG_EXACT_S
    from torchfim.report.settings import FULL_REPORT_SECONDS
    from torchfim.train.trace_plot import LOG_SPAN

    assert FULL_REPORT_SECONDS == 30 * 60
    assert LONG_EXACT_S == LONG_SWEEP_S == 60
    assert LOG_SPAN == 10


@pytest.mark.parametrize(("width", "warned"), [(99, False), (100, True)])
def test_the_standard_error_warns_from_a_hundred_times_the_estimates_work(width, warned) -> None:
    """docs/models.md: ``return_stderr=True`` warns where its closed form is a hundred times the estimate's work or
    more (output numbers per input against labels drawn)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, width).double()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torchfim.fisher(model, torch.randn(2, 3, dtype=torch.float64), estimator="score", structure="trace",
                        return_stderr=True, generator=torch.Generator().manual_seed(0))
    assert any("computes the standard error in closed form" in str(w.message) for w in caught) == warned


def test_the_gaussian_fisher_scales_as_one_over_sigma_squared() -> None:
    """README.md and docs/models.md: σ = 0.1 gives 100 times the Fisher of σ = 1 (brute force: ``JᵀJ/σ²``)."""
    torch.manual_seed(0)
    model, x = torch.nn.Linear(3, 2).double(), torch.randn(5, 3, dtype=torch.float64)
    unit = torchfim.fisher(model, x, family="gaussian", structure="full")
    tenth = torchfim.fisher(model, x, family=Gaussian(sigma=0.1), structure="full")
    jac = torch.func.jacrev(lambda p: torch.func.functional_call(model, p, (x,)))(dict(model.named_parameters()))
    j = torch.cat([jac[n].reshape(5, 2, -1) for n, _ in model.named_parameters()], -1)  # (n, outputs, P)
    brute = torch.einsum("noi,noj->ij", j, j) / 5
    assert torch.allclose(unit, brute, rtol=1e-12, atol=1e-14)
    assert torch.allclose(tenth, 100 * brute, rtol=1e-12, atol=1e-12)


def test_the_uses_page_plans_one_label_for_the_trace_and_24_for_every_diagonal_entry() -> None:
    """docs/uses.md, "How many labels": on its example model the default ``structure="trace"`` plans 1 label per
    input against 24 for every diagonal entry."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = torch.randn(40, 4, dtype=torch.float64)
    k_diag = torchfim.samples_needed(model, x, estimator="score", structure="diag", rel_error=0.1)
    k_trace = torchfim.samples_needed(model, x, estimator="score", rel_error=0.1)
    assert (k_trace, k_diag) == (1, 24)


def test_the_step_scan_grid_and_the_diagnostics_defaults() -> None:
    """docs/forecast.md §3: 25 steps, two per decade, from ``10⁻¹²·s_a`` to ``s_a`` (``s_a = max(|θ_a|, 1)``),
    ``rtol = 1e-6``; §4: ``diagnostics(eps=1e-3, n_trials=100, tolerance=0.01)``."""
    assert _defaults(scan_steps)["rtol"] == 1e-6
    assert _defaults(Forecast.diagnostics) == {"eps": 1e-3, "n_trials": 100, "tolerance": 0.01, "generator": None}
    x = torch.linspace(0, 1, 5, dtype=torch.float64)
    theta0 = torch.tensor([3.0, 0.5], dtype=torch.float64)
    scan = scan_steps(lambda t: t[0] * torch.exp(-x / t[1]), torch.eye(5, dtype=torch.float64), theta0)
    for a, s in enumerate((3.0, 1.0)):
        steps = scan[a].steps
        assert len(steps) == 25
        assert math.isclose(float(steps[0]), 1e-12 * s, rel_tol=1e-12)
        assert math.isclose(float(steps[-1]), s, rel_tol=1e-12)
        assert torch.allclose(steps[1:] / steps[:-1], torch.full((24,), 10**0.5, dtype=torch.float64))


def test_a_correlation_of_099_moves_the_errors_by_17_percent_under_the_default_draws() -> None:
    """docs/forecast.md §4: "A correlation of 0.99 already turns 0.1% in F into errors that move by 17% (the default
    draws)"."""
    rho = 0.99
    fisher = torch.linalg.inv(torch.tensor([[1.0, rho], [rho, 1.0]], dtype=torch.float64))
    diag = Forecast(fisher).diagnostics()
    assert round(diag.max_relative_change, 2) == 0.17 and diag.unstable


def test_a_shared_measurement_gathers_twenty_three_numbers(monkeypatch) -> None:
    """docs/training.md: ``across_processes=True`` combines the shares "from one ``all_gather`` of twenty-three
    numbers" per measurement (and one when the monitor is built)."""
    from processes import one_process_group

    import torchfim.train.process_share as process_share

    sizes, gather = [], process_share.gather_numbers
    monkeypatch.setattr(process_share, "gather_numbers",
                        lambda numbers, *args: sizes.append(len(numbers)) or gather(numbers, *args))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    with one_process_group():
        monitor = torchfim.train.FisherTraceMonitor(model, torch.randn(16, 4), across_processes=True)
        monitor.measure(0)
    assert sizes == [1, 23]


def _options(parser, path: str = "torchfim") -> dict[str, str]:
    """Every ``--option`` of ``parser`` and of its sub-parsers that ``--help`` lists (``--help`` aside, and the
    hidden ones, for tests), with the command that takes it."""
    import argparse

    found: dict[str, str] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= {o: c for o, c in _options(sub, f"{path} {name}").items() if o not in found}
        if action.help != argparse.SUPPRESS:
            found |= {o: path for o in action.option_strings if o.startswith("--") and o != "--help"}
    return found


def test_every_command_line_option_is_named_in_the_docs() -> None:
    """Each option of ``torchfim`` and its commands is named in README.md or docs/*.md (followed by a non-option
    character, so ``--seed`` does not count for ``--seeds``); the docs' prose tells what ``--help`` lists."""
    import re

    from doc_blocks import ROOT

    from torchfim.cli import build_parser

    text = "\n".join(p.read_text(encoding="utf-8") for p in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
    missing = {option: command for option, command in _options(build_parser()).items()
               if not re.search(re.escape(option) + r"(?![\w-])", text)}
    assert not missing, f"options no page names: {missing}"


@pytest.mark.parametrize(("command", "stated"), [
    ("demo", {"--seconds": 3, "--epochs": 100, "--threads": 1, "--n-samples": 1}),
    ("report", {"--max-block": 2048, "--seed": 0, "--epochs": 30, "--n-samples": 1, "--mode": "auto",
                "--out": "torchfim-report"}),
    ("reproduce soen-sun", {"--threads": 1}),
    ("reproduce explosion", {"--jobs": 1}),
    ("plot-trace", {"--band": 2, "--out": "trace.png"}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_the_option_defaults_the_docs_state_are_the_parsers(command: str, stated: dict) -> None:
    """README.md (the demo), docs/report.md, docs/accuracy.md (soen-sun) and docs/training.md (plot-trace, the
    explosion study) state these defaults of the command line."""
    import argparse

    from torchfim.cli import build_parser

    parser = build_parser()
    for word in command.split():
        parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[word]
    defaults = {a.option_strings[-1]: a.default for a in parser._actions if a.option_strings}
    assert {option: defaults[option] for option in stated} == stated
