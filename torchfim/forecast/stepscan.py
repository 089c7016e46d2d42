"""Scanning the step of a finite-difference stencil for the plateau where the derivative is stable.

A stencil derivative with step ``h`` carries two errors: truncation, growing like ``h²`` (3-point)
or ``h⁴`` (5-point), and round-off, growing like ``ε/h``. Between them lies a *plateau* of steps on
which the derivative does not change. :func:`scan_steps` computes the derivative of ``(μ, C)`` along
each parameter on a geometric grid of steps, measures the change between neighbouring steps, and
reports the longest run of steps whose neighbours agree to ``rtol``. Steps below the plateau are
flagged ``round_off``, steps above it ``truncation``; the step chosen on the plateau is the one
whose derivative agrees best with both its neighbours.

Changes are measured in the norm the Fisher matrix itself uses, so that they are unit-free and
weigh the mean and the covariance as the forecast does: for a derivative ``D = (∂μ, ∂C)``,
``‖D‖² = ∂μᵀ C⁻¹ ∂μ + ½ tr(C⁻¹ ∂C C⁻¹ ∂C)`` (``= F_aa`` when ``D`` is the derivative along ``θ_a``),
and the relative change between steps ``h_k`` and ``h_{k+1}`` is
``‖D(h_{k+1}) − D(h_k)‖ / max(‖D(h_k)‖, ‖D(h_{k+1})‖)``.

**Agreement.** Two neighbouring steps *agree* when their relative change is at most ``rtol`` **and
both steps are resolved**. A step ``h`` is resolved when

* every point ``θ_a + k·h`` of the stencil differs from ``θ_a`` in θ's dtype (below half the spacing
  of the dtype's numbers at ``θ_a``, ``θ ± h`` rounds back to ``θ`` and the stencil differences equal
  values), and
* the derivative rises above its rounding: ``‖D(h)‖ > ‖δ(h)‖`` with ``δ = ε Σ_k |w_k| |f(θ + k h)| / h``
  entrywise (``w_k`` the stencil's weights, ``ε`` the epsilon of the dtype ``f = (μ, C)`` is
  computed in), the change of ``f`` that rounding its values alone can produce.

An unresolved step is round-off whatever its derivative: two exactly-zero derivatives (``θ ± h``
rounded back to ``θ``, or a mean too large for its dtype to register the change) "agree" perfectly
and mean nothing. Unresolved steps are flagged ``round_off`` wherever they sit and are never
chosen. Without any agreeing pair, ``found`` is ``False`` and ``reason`` says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import TorchfimError, check_choice, real_number
from ._model import CovLike, GaussianModel, MeanLike, parameter_names
from .derivatives import STENCILS, stencil_terms, step_resolves
from .gaussian import whitened_fisher

__all__ = ["ParameterScan", "StepScan", "scan_steps"]


@dataclass(frozen=True, eq=False)
class ParameterScan:
    """The step scan of one parameter.

    Attributes:
        name: the parameter's name.
        steps: the ``K`` steps tried, ascending.
        mean_derivatives: ``(K, d)``, ``∂μ/∂θ`` with each step.
        cov_derivatives: ``(K, d, d)``, ``∂C/∂θ`` with each step (``None`` for a fixed covariance).
        information: ``(K,)``, the Fisher entry ``F_aa`` the derivative with each step gives.
        relative_change: ``(K − 1,)``, the change between steps ``k`` and ``k + 1`` (module docstring).
        plateau: ``(lo, hi)``, indices of the first and last step of the plateau.
        found: whether a plateau was found; if not, ``plateau`` is the single resolved step whose
            derivative changes least with respect to its neighbours, and no step can be trusted to ``rtol``.
        rtol: the largest relative change accepted between neighbours on the plateau.
        resolved: ``(K,)`` booleans: steps at which ``θ ± h`` differs from ``θ`` in θ's dtype and the
            derivative exceeds its rounding error (module docstring). Only these can agree or be chosen.
        reason: why no plateau was found (``""`` when one was).
    """

    name: str
    steps: Tensor
    mean_derivatives: Tensor
    cov_derivatives: Tensor | None
    information: Tensor
    relative_change: Tensor
    plateau: tuple[int, int]
    found: bool
    rtol: float
    resolved: Tensor
    reason: str = ""

    @property
    def step(self) -> float:
        """The chosen step: on the plateau, the step whose derivative agrees best with both neighbours.

        That is the step minimising the larger of its two neighbour changes; where round-off and
        truncation are both smallest, the derivative is steadiest. Raises a :class:`TorchfimError`
        (with :attr:`reason`) when no step of the scan is resolved: there is none to choose.
        """
        if not bool(self.resolved.any()):
            raise TorchfimError(f"no step can be chosen for parameter {self.name!r}: {self.reason}")
        lo, hi = self.plateau
        steadiness = _worst_neighbour_change(self.relative_change, self.resolved)[lo:hi + 1]
        return float(self.steps[lo + int(steadiness.argmin())])

    @property
    def round_off(self) -> Tensor:
        """``(K,)`` booleans: steps below the plateau, and unresolved steps, where round-off error dominates."""
        return (torch.arange(len(self.steps)) < self.plateau[0]) | ~self.resolved

    @property
    def truncation(self) -> Tensor:
        """``(K,)`` booleans: resolved steps above the plateau, where the stencil's truncation error dominates."""
        return (torch.arange(len(self.steps)) > self.plateau[1]) & self.resolved

    def table(self) -> str:
        """One line per step: the step, ``F_aa`` from it, the change to the next step, and its flag."""
        lines = [f"{self.name}: {'step':>10} {'F_aa':>14} {'change to next':>15}  flag"]
        chosen = self.step if bool(self.resolved.any()) else None
        for k, step in enumerate(self.steps):
            change = f"{float(self.relative_change[k]):.2e}" if k < len(self.relative_change) else ""
            flag = "round-off" if self.round_off[k] else "truncation" if self.truncation[k] else "plateau"
            mark = "  <- chosen" if float(step) == chosen else ""
            lines.append(f"{'':{len(self.name) + 1}} {float(step):>10.3e} {float(self.information[k]):>14.8g} "
                         f"{change:>15}  {flag}{mark}")
        if self.reason:
            lines.append(f"no plateau: {self.reason}")
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class StepScan:
    """The step scans of every parameter for one stencil; ``steps`` feeds :func:`forecast`'s ``step``.

    ``stencil`` names the finite-difference rule scanned (``"stencil3"`` or ``"stencil5"``), and
    ``parameters`` holds one :class:`ParameterScan` per parameter, in the order of θ.
    """

    stencil: str
    parameters: tuple[ParameterScan, ...]

    @property
    def steps(self) -> Tensor:
        """``(P,)``: the chosen step of each parameter (pass it as ``forecast(..., step=scan.steps)``).

        Raises a :class:`TorchfimError` naming the parameter when one has no resolved step (see
        :attr:`ParameterScan.reason`).
        """
        return torch.tensor([p.step for p in self.parameters], dtype=torch.float64)

    @property
    def found(self) -> bool:
        """Whether every parameter has a plateau."""
        return all(p.found for p in self.parameters)

    def __getitem__(self, key: int | str) -> ParameterScan:
        if isinstance(key, str):
            for scan in self.parameters:
                if scan.name == key:
                    return scan
            raise TorchfimError(f"unknown parameter {key!r}; the parameters are {[p.name for p in self.parameters]}")
        return self.parameters[key]

    def __str__(self) -> str:
        width = max(9, *(len(p.name) for p in self.parameters))
        header = f"{'parameter':<{width}} {'chosen step':>12} {'plateau':>23}  {'round-off':>9} {'truncation':>10}"
        rows = [f"{self.stencil} step scan", header]
        for p in self.parameters:
            lo, hi = float(p.steps[p.plateau[0]]), float(p.steps[p.plateau[1]])
            plateau = f"{lo:.1e} … {hi:.1e}" if p.found else "NONE FOUND"
            step = f"{p.step:>12.3e}" if bool(p.resolved.any()) else f"{'none':>12}"
            rows.append(f"{p.name:<{width}} {step} {plateau:>23}  {int(p.round_off.sum()):>9} "
                        f"{int(p.truncation.sum()):>10}")
        rows += [f"{p.name}: {p.reason}" for p in self.parameters if p.reason]
        return "\n".join(rows)


def scan_steps(
    mean: MeanLike,
    cov: CovLike,
    theta0: object,
    *,
    stencil: str = "stencil3",
    steps: object = None,
    rtol: float = 1e-6,
    names: Sequence[str] | None = None,
) -> StepScan:
    """Scan the stencil step of every parameter and find the plateau of stable derivatives.

    Args:
        mean, cov, theta0, names: as for :func:`torchfim.forecast.forecast`.
        stencil: ``"stencil3"`` or ``"stencil5"``.
        steps: the steps to try: a 1-D tensor of distinct positive steps (absolute, for every parameter) or
            ``(P, K)`` (one row per parameter); neighbours are compared, so a geometric grid, a factor of a few
            between steps, makes an agreement mean a stable derivative. ``None``: 25 steps, two per decade, from
            ``1e-12·s_a`` to ``s_a`` with ``s_a = max(|θ_a|, 1)``.
        rtol: neighbouring steps belong to the plateau when both are resolved (``θ ± h`` differs from
            ``θ`` in its dtype and the derivative exceeds its rounding error) and their derivatives
            differ by at most ``rtol`` (relative, in the Fisher norm); the module docstring gives the rule.

    Example:
        >>> import torch
        >>> from torchfim.forecast import scan_steps
        >>> scan = scan_steps(lambda t: torch.exp(t), torch.eye(1, dtype=torch.float64),
        ...                   torch.tensor([0.5], dtype=torch.float64))
        >>> bool(scan[0].round_off[0]), bool(scan[0].truncation[-1]), scan.found   # 1e-12 and 1.0
        (True, True, True)
        >>> 1e-9 < float(scan.steps[0]) < 1e-3
        True
    """
    check_choice("stencil", stencil, tuple(STENCILS))
    tolerance = real_number(rtol)  # a NumPy number or 0-dim tensor is as good as a float
    if tolerance is None or not 0 < tolerance < 1:
        raise TorchfimError(f"rtol must be a relative change in (0, 1) such as 1e-6, got {rtol!r}")
    model = GaussianModel(mean, cov, theta0)
    names = parameter_names(names, model.n_parameters)
    grid = _step_grid(steps, model.theta0)
    scans = tuple(_scan_parameter(model, a, names[a], grid[a], stencil, tolerance) for a in range(len(names)))
    return StepScan(stencil=stencil, parameters=scans)


def _step_grid(steps: object, theta0: Tensor) -> Tensor:
    """``(P, K)`` ascending steps per parameter."""
    n = theta0.numel()
    if steps is None:
        decades = 10.0 ** torch.linspace(-12, 0, 25, dtype=torch.float64)
        return theta0.detach().to(torch.float64).abs().clamp_min(1.0)[:, None] * decades[None, :]
    try:
        grid = torch.as_tensor(steps, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TorchfimError(
            f"steps must be a 1-D tensor of positive steps, or one row per parameter; got {steps!r}"
        ) from err
    if grid.dim() == 1:
        grid = grid.expand(n, -1)
    if grid.dim() != 2 or grid.shape[0] != n or grid.shape[1] < 3:
        raise TorchfimError(
            f"steps must be a 1-D tensor of at least 3 steps, or shape ({n}, K≥3); got shape {tuple(grid.shape)}"
        )
    if not bool((torch.isfinite(grid) & (grid > 0)).all()):
        raise TorchfimError("steps must all be positive and finite")
    grid = grid.sort(dim=1).values
    if bool((grid[:, 1:] == grid[:, :-1]).any()):  # a repeated step agrees with itself exactly: a plateau of nothing
        raise TorchfimError(
            f"steps must be distinct, got a step twice in {steps!r}; the scan compares each step with the next, so "
            "pass a geometric grid such as 10.0 ** torch.arange(-9, 0.5, 0.5)"
        )
    return grid


def _scan_parameter(
    model: GaussianModel, index: int, name: str, steps: Tensor, stencil: str, rtol: float
) -> ParameterScan:
    columns = [stencil_terms(model, index, float(h), stencil) for h in steps]
    mean_d = torch.stack([c[0] for c in columns])
    cov_d = None if model.cov_fn is None else torch.stack([c[1] for c in columns])
    information = torch.diagonal(whitened_fisher(mean_d, model.cov0, cov_d))
    mean_r = torch.stack([c[2] for c in columns])
    cov_r = None if model.cov_fn is None else torch.stack([c[3] for c in columns])
    rounding = torch.diagonal(whitened_fisher(mean_r, model.cov0, cov_r)).clamp_min(0).sqrt()
    in_dtype = torch.tensor([step_resolves(model.theta0, index, float(h), stencil) for h in steps])
    resolved = in_dtype & (information.clamp_min(0).sqrt() > rounding)  # NaN compares False: unresolved
    mean_diff = mean_d[1:] - mean_d[:-1]
    cov_diff = None if cov_d is None else cov_d[1:] - cov_d[:-1]
    distance = torch.diagonal(whitened_fisher(mean_diff, model.cov0, cov_diff)).clamp_min(0).sqrt()
    size = torch.maximum(information[1:], information[:-1]).clamp_min(0).sqrt()
    change = torch.where(size > 0, distance / size.clamp_min(torch.finfo(torch.float64).tiny), distance)
    lo, hi, found = _plateau(change, rtol, resolved)
    reason = "" if found else _no_plateau_reason(steps, change, resolved, in_dtype, model.theta0, index, rtol)
    return ParameterScan(name=name, steps=steps, mean_derivatives=mean_d, cov_derivatives=cov_d,
                         information=information, relative_change=change, plateau=(lo, hi), found=found, rtol=rtol,
                         resolved=resolved, reason=reason)


def _plateau(change: Tensor, rtol: float, resolved: Tensor) -> tuple[int, int, bool]:
    """Step indices ``(lo, hi, found)`` of the longest run of agreeing neighbours (module docstring).

    Neighbours agree when both are resolved and their change is ≤ ``rtol``; ties go to the run whose
    largest change is smaller. Without any agreeing pair: the resolved step whose larger neighbour
    change is smallest, with ``found=False`` (the last step if none is resolved).
    """
    agree = ((change <= rtol) & resolved[:-1] & resolved[1:]).tolist()
    best: tuple[int, int] | None = None
    start = None
    for k, ok in enumerate(agree + [False]):
        if ok and start is None:
            start = k
        elif not ok and start is not None:
            if best is None or _better_run((start, k - 1), best, change):
                best = (start, k - 1)
            start = None
    if best is not None:
        return best[0], best[1] + 1, True
    if not bool(resolved.any()):
        return len(resolved) - 1, len(resolved) - 1, False
    steadiness = torch.where(resolved, _worst_neighbour_change(change, resolved), torch.nan)
    k = int(torch.nan_to_num(steadiness, nan=torch.inf, posinf=torch.finfo(torch.float64).max).argmin())
    return k, k, False


def _no_plateau_reason(
    steps: Tensor, change: Tensor, resolved: Tensor, in_dtype: Tensor, theta0: Tensor, index: int, rtol: float
) -> str:
    """Why no two neighbouring steps agree: none is resolved, or the resolved ones disagree."""
    if not bool(resolved.any()):
        below = f"θ ± h rounds back to θ in {theta0.dtype} for steps up to {float(steps[~in_dtype].max()):.3g}, and " \
            if not bool(in_dtype.all()) else ""
        return (
            f"no step tried resolves the derivative at theta0[{index}] = {float(theta0[index]):.6g}: {below}the change "
            "of the mean and covariance is within their rounding error at every step; if the data depend on this "
            "parameter, try larger steps (steps=...), theta0 and the model in float64, or derivatives='autograd'"
        )
    worst = _worst_neighbour_change(change, resolved)[resolved]
    return (
        f"no two neighbouring resolved steps agree to rtol={rtol:g} (the steadiest changes by {float(worst.min()):.3g}): "
        "no step can be trusted to that tolerance (a noisy model, or too coarse a dtype); compute in float64, "
        "use derivatives='autograd', or loosen rtol"
    )


def _worst_neighbour_change(change: Tensor, resolved: Tensor) -> Tensor:
    """``(K,)``: for each step, the larger of its changes to the previous and the next step.

    A change to or from an unresolved step, or a NaN, counts as ``inf``: no agreement.
    """
    usable = resolved[:-1] & resolved[1:]
    finite = torch.where(usable, torch.nan_to_num(change, nan=torch.inf), torch.inf)
    padded = torch.cat([finite[:1], finite, finite[-1:]])
    return torch.maximum(padded[:-1], padded[1:])


def _better_run(run: tuple[int, int], best: tuple[int, int], change: Tensor) -> bool:
    length, best_length = run[1] - run[0], best[1] - best[0]
    if length != best_length:
        return length > best_length
    return float(change[run[0]:run[1] + 1].max()) < float(change[best[0]:best[1] + 1].max())
