"""The result of a Fisher forecast: the matrix, its inverse, the errors, the diagnostics, the plot."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .._words import a_or_an
from ..errors import TorchfimError
from ._model import as_theta, parameter_names
from .ellipse import ONE_SIGMA, TWO_SIGMA, draw_ellipses
from .stability import (
    InversionDiagnostics,
    check_fisher,
    coarsest_dtype,
    inversion_diagnostics,
    stable_inverse,
    symmetric_matrix,
)

__all__ = ["Forecast"]


class Forecast:
    """A Fisher matrix ``F`` (float64, ``P×P``) at the fiducial parameters ``theta0``.

    ``fisher`` may be a tensor, a NumPy array, or nested lists of numbers (read in float64); it must be
    finite and symmetric to its precision's rounding. ``theta0`` (default: zeros) is read as
    :func:`forecast` reads it, lists of numbers in float64.

    Under the Gaussian approximation of the posterior (or the Cramér–Rao bound for unbiased
    estimators), the parameter covariance is ``F⁻¹``: the *marginal* error of ``θ_a`` (all other
    parameters free) is ``√(F⁻¹)_aa`` and the *conditional* error (all others fixed at ``theta0``)
    is ``1/√F_aa``, never larger. Forecasts of independent data sets add (``a + b``); ``n * a`` is
    ``n`` independent copies of the data.

    ``F`` is kept in float64 for the arithmetic, but whether it is singular (or indefinite) is judged
    against the precision it was computed in, :attr:`precision`: the dtype of the ``fisher`` given,
    or the coarser ``precision=`` passed (:func:`forecast` passes the dtype of θ, the mean and the
    covariance). A float32 Fisher matrix singular to float32 precision is refused as
    :func:`stable_inverse` refuses it, not inverted into errors made of its rounding.

    Example:
        >>> import torch
        >>> from torchfim.forecast import Forecast
        >>> fc = Forecast(torch.tensor([[4.0, 2.0], [2.0, 4.0]], dtype=torch.float64), names=["a", "b"])
        >>> fc.conditional_errors()
        tensor([0.5000, 0.5000], dtype=torch.float64)
        >>> fc.marginal_errors()          # √(4/12): the correlation of 0.5 inflates the errors
        tensor([0.5774, 0.5774], dtype=torch.float64)
        >>> fc.fix("b").marginal_errors() # with b fixed, a's error is its conditional one
        tensor([0.5000], dtype=torch.float64)
    """

    def __init__(
        self,
        fisher: Tensor,
        *,
        theta0: Tensor | None = None,
        names: Sequence[str] | None = None,
        precision: torch.dtype | None = None,
    ) -> None:
        fisher, given = symmetric_matrix(fisher, precision)
        #: The dtype ``F`` was computed in (float64 or coarser), against whose rounding its inverse is judged.
        self.precision: torch.dtype = given
        self.fisher: Tensor = fisher
        n = fisher.shape[0]
        # as_theta reads a list of numbers in float64, as forecast() does: else a + b of the same θ₀ is refused.
        self.theta0: Tensor = torch.zeros(n, dtype=torch.float64) if theta0 is None else as_theta(theta0).double()
        if tuple(self.theta0.shape) != (n,):
            raise TorchfimError(f"theta0 must have {n} entries, one per row of the Fisher matrix")
        self.names: tuple[str, ...] = parameter_names(names, n)

    def covariance(self) -> Tensor:
        """``F⁻¹`` in float64, by the stable route of :func:`torchfim.forecast.stable_inverse` (raises if singular)."""
        return stable_inverse(self.fisher, self.names, precision=self.precision)

    def marginal_errors(self) -> Tensor:
        """``σ_a = √(F⁻¹)_aa``: the error of each parameter with all the others free."""
        return torch.diagonal(self.covariance()).sqrt()

    def conditional_errors(self) -> Tensor:
        """``1/√F_aa``: the error of each parameter with all the others fixed at ``theta0``.

        Refuses, as :meth:`marginal_errors` does, a matrix that no Fisher matrix can be (negative
        information ``F_aa < 0``, an indefinite ``F``), with a :class:`TorchfimError` naming the
        problem and the fix. A singular ``F`` is accepted: fixing the other parameters is what makes
        it invertible; a parameter without information (``F_aa = 0``) has an infinite error.
        """
        check_fisher(self.fisher, self.names, precision=self.precision)
        return torch.diagonal(self.fisher).rsqrt()

    def correlation(self) -> Tensor:
        """The correlation matrix of the forecast errors, ``(F⁻¹)_ab / (σ_a σ_b)``."""
        cov = self.covariance()
        errors = torch.diagonal(cov).sqrt()
        return cov / errors[:, None] / errors[None, :]

    def diagnostics(
        self,
        *,
        eps: float = 1e-3,
        n_trials: int = 100,
        tolerance: float = 0.01,
        generator: torch.Generator | None = None,
    ) -> InversionDiagnostics:
        """Condition numbers, eigenvalues and perturbation stability; see :func:`inversion_diagnostics`.

        ``eps`` (relative size of the perturbations of ``F``), ``n_trials`` (how many perturbed matrices),
        ``tolerance`` (the relative change of a marginal error beyond which the matrix is flagged unstable)
        and ``generator`` (for the perturbations; None: seeded with 0) are those of
        :func:`inversion_diagnostics`, applied to this forecast's Fisher matrix at its precision.
        """
        return inversion_diagnostics(
            self.fisher, eps=eps, n_trials=n_trials, tolerance=tolerance, generator=generator, precision=self.precision
        )

    def fix(self, *keys: int | str) -> Forecast:
        """The forecast with the parameters ``keys`` (names or indices) held fixed.

        That is ``F`` without their rows and columns: fixing a parameter removes its information.
        """
        drop = {self._index(k) for k in keys}
        keep = [a for a in range(len(self.names)) if a not in drop]
        if not keep:
            raise TorchfimError("fix would remove every parameter; keep at least one")
        index = torch.tensor(keep)
        return Forecast(
            self.fisher[index][:, index], theta0=self.theta0[index], names=[self.names[a] for a in keep],
            precision=self.precision,
        )

    def plot_ellipse(
        self,
        i: int | str,
        j: int | str,
        ax: Any = None,
        *,
        levels: float | Sequence[float] = (ONE_SIGMA, TWO_SIGMA),
        **plot_kwargs: Any,
    ) -> Any:
        """Draw the marginal confidence ellipses of parameters ``i`` and ``j`` (names or indices).

        The ellipse holding probability ``p`` (by default the one- and two-sigma levels, 68.3% and
        95.4%) is ``Δθᵀ S⁻¹ Δθ = −2 ln(1 − p)`` around ``theta0``, with
        ``S`` the 2×2 block of ``F⁻¹`` (see :mod:`torchfim.forecast.ellipse`); ``levels`` is one level or several.
        Draws on ``ax`` (a new matplotlib figure if ``None``) and returns it; ``plot_kwargs`` go to ``ax.plot`` and
        override the defaults, as for :func:`~torchfim.forecast.ellipse.draw_ellipses` (a ``label`` names the
        innermost ellipse). matplotlib
        is needed only here: without it this raises a :class:`TorchfimError` naming
        ``pip install matplotlib``.
        """
        a, b = self._index(i), self._index(j)
        if a == b:
            raise TorchfimError("plot_ellipse needs two different parameters")
        cov = self.covariance()
        block = cov[[a, b]][:, [a, b]]
        labels = (self.names[a], self.names[b])
        return draw_ellipses(block, self.theta0[[a, b]], levels=levels, labels=labels, ax=ax, **plot_kwargs)

    def __add__(self, other: object) -> Forecast:
        if not isinstance(other, Forecast):
            return NotImplemented
        if other.names != self.names or not torch.equal(other.theta0, self.theta0):
            raise TorchfimError("only forecasts of the same parameters (names and theta0) can be added")
        precision = coarsest_dtype(self.precision, other.precision)
        return Forecast(self.fisher + other.fisher, theta0=self.theta0, names=self.names, precision=precision)

    #: numpy defers to :meth:`__rmul__` (else ``array * forecast`` builds an array of forecasts).
    __array_ufunc__ = None

    def __mul__(self, copies: object) -> Forecast:
        """``n * forecast`` or ``forecast * n``: ``n`` independent copies of the data, the Fisher matrix times ``n``.

        ``n`` is a positive finite number: a Python or numpy scalar, or a 0-dim tensor or array
        (fractions such as a sky fraction are allowed). Anything else with a shape, and booleans,
        raise a :class:`TorchfimError`.
        """
        n = _copies(copies)
        if n is None:
            return NotImplemented
        return Forecast(n * self.fisher, theta0=self.theta0, names=self.names, precision=self.precision)

    __rmul__ = __mul__

    def __str__(self) -> str:
        try:  # refused only when F is no Fisher matrix (F_aa < 0, indefinite); then neither error exists
            conditional = [f"{float(c):.4g}" for c in self.conditional_errors()]
            refused = "singular"  # all that marginal_errors refuses beyond that
        except TorchfimError:
            conditional = ["invalid"] * len(self.names)
            refused = "invalid"
        try:
            marginal = [f"{float(s):.4g}" for s in self.marginal_errors()]
        except TorchfimError:
            marginal = [refused] * len(self.names)
        width = max(9, *(len(n) for n in self.names))
        rows = [f"{'parameter':<{width}} {'theta0':>11} {'marginal σ':>11} {'conditional σ':>14}"]
        for name, value, m, c in zip(self.names, self.theta0, marginal, conditional, strict=True):
            rows.append(f"{name:<{width}} {float(value):>11.4g} {m:>11} {c:>14}")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return f"Forecast(names={self.names!r})"

    def _index(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self.names:
                raise TorchfimError(f"unknown parameter {key!r}; the parameters are {', '.join(self.names)}")
            return self.names.index(key)
        if isinstance(key, bool) or not isinstance(key, int) or not -len(self.names) <= key < len(self.names):
            raise TorchfimError(f"parameter index {key!r} is out of range for {len(self.names)} parameters")
        return key % len(self.names)


def _copies(value: object) -> float | None:
    """``value`` as a positive finite number of copies; ``None`` for an object that is no number at all.

    Python and numpy numbers are :class:`numbers.Real`; tensors and numpy arrays must hold one real number.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, (Tensor, bool)) or hasattr(value, "__array__"):
        tensor = torch.as_tensor(value).detach()
        if tensor.dim() != 0 or tensor.dtype == torch.bool or tensor.is_complex():
            raise TorchfimError(
                "a forecast is scaled by one positive real number, the number of independent copies of the data "
                f"(3 * fc, torch.tensor(3.0) * fc); got {_describe(value)}"
            )
        number = float(tensor)
    else:
        return None
    if not (number > 0 and math.isfinite(number)):
        raise TorchfimError(f"a forecast can only be scaled by a positive number of copies, got {value!r}")
    return number


def _describe(value: object) -> str:
    shape = tuple(getattr(value, "shape", ()))
    dtype = getattr(value, "dtype", type(value).__name__)
    return f"{a_or_an(type(value).__name__)} of shape {shape} and dtype {dtype}" if shape else f"{a_or_an(dtype)} value {value!r}"
