"""The Gaussian data model of a forecast: checked inputs, evaluation at any θ, the fiducial point."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._words import a_or_an
from ..errors import TorchfimError

#: A mean or covariance: a function of θ, or a fixed tensor that does not depend on θ.
MeanLike = Callable[[Tensor], Tensor] | Tensor
CovLike = Callable[[Tensor], Tensor] | Tensor


def as_theta(theta0: object) -> Tensor:
    """``theta0`` as a 1-D floating tensor (a sequence of numbers becomes float64)."""
    if not isinstance(theta0, Tensor):
        try:
            theta0 = torch.as_tensor(theta0, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise TorchfimError(
                f"theta0 must be a 1-D tensor of parameter values, got {type(theta0).__name__}; "
                "pass e.g. torch.tensor([0.3, 1.0], dtype=torch.float64)"
            ) from err
    if theta0.dim() != 1 or theta0.numel() == 0:
        raise TorchfimError(
            f"theta0 must be a non-empty 1-D tensor (one entry per parameter), got shape {tuple(theta0.shape)}; "
            "reshape it with theta0.reshape(-1)"
        )
    if not theta0.is_floating_point():
        raise TorchfimError(f"theta0 must be a floating-point tensor, got {theta0.dtype}; use theta0.double()")
    if not bool(torch.isfinite(theta0).all()):
        raise TorchfimError("theta0 has non-finite entries; pass finite parameter values")
    return theta0.detach()


def parameter_names(names: Sequence[str] | None, n_parameters: int) -> tuple[str, ...]:
    """``names`` checked against the number of parameters, or ``θ[0], θ[1], …``."""
    if names is None:
        return tuple(f"θ[{i}]" for i in range(n_parameters))
    if isinstance(names, str):  # tuple("ab") would name the parameters 'a' and 'b'
        raise TorchfimError(f"names must be a sequence of {n_parameters} strings, got the string {names!r}; pass "
                            f"e.g. names=[{', '.join(repr(f'p{i}') for i in range(n_parameters))}]")
    names = tuple(names)
    if len(names) != n_parameters or not all(isinstance(n, str) for n in names):
        raise TorchfimError(
            f"names must be {n_parameters} strings, one per parameter, got {names!r}"
        )
    if len(set(names)) != len(names):
        raise TorchfimError(f"names must be distinct, got {names!r}")
    return names


class GaussianModel:
    """A data vector ``x ~ N(μ(θ), C(θ))``, checked at the fiducial point ``theta0``.

    ``mean`` and ``cov`` are functions of θ or fixed tensors. Construction evaluates both at
    ``theta0``, checks the shapes (``μ`` of shape ``(d,)``, ``C`` of shape ``(d, d)``) and that ``C``
    is symmetric positive definite, and keeps its float64 Cholesky factor for the whitening.
    """

    def __init__(self, mean: MeanLike, cov: CovLike, theta0: object) -> None:
        self.theta0 = as_theta(theta0)
        self.mean_fn = _function_or_none(mean, "mean")
        self.cov_fn = _function_or_none(cov, "cov")
        self._mean_fixed = mean.detach() if self.mean_fn is None else None
        self._cov_fixed = cov.detach() if self.cov_fn is None else None
        with torch.no_grad():
            mean0 = self._mean_fixed if self.mean_fn is None else _first_call(self.mean_fn, "mean", self.theta0)
            cov0 = self._cov_fixed if self.cov_fn is None else _first_call(self.cov_fn, "cov", self.theta0)
        self.mean0, self.cov0 = self._checked(mean0, cov0)
        if not bool(torch.isfinite(self.mean0).all()):
            raise TorchfimError("the mean at theta0 has non-finite entries; check mean(theta0)")
        self.cov_cholesky = covariance_cholesky(self.cov0)

    @property
    def n_parameters(self) -> int:
        return self.theta0.numel()

    @property
    def size(self) -> int:
        """Length ``d`` of the data vector."""
        return self.mean0.numel()

    def evaluate(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """``(μ(θ), C(θ))`` with their shapes checked, without autograd (nothing here is differentiated backwards:
        an emulator's parameters need no graph, and one made under ``torch.inference_mode()`` can have none)."""
        with torch.no_grad():
            mean = self._mean_fixed if self.mean_fn is None else self.mean_fn(theta)
            cov = self._cov_fixed if self.cov_fn is None else self.cov_fn(theta)
        return self._checked(mean, cov)

    @staticmethod
    def _checked(mean: object, cov: object) -> tuple[Tensor, Tensor]:
        """``(mean, cov)`` as float tensors, or a :class:`TorchfimError` naming the one of the wrong shape."""
        if not isinstance(mean, Tensor) or mean.dim() != 1 or mean.numel() == 0:
            raise TorchfimError(
                "mean must be (or return) a non-empty 1-D tensor, the data vector's mean; got "
                f"{_describe(mean)}; reshape it with .reshape(-1)"
            )
        d = mean.numel()
        if not isinstance(cov, Tensor) or tuple(cov.shape) != (d, d):
            raise TorchfimError(
                f"cov must be (or return) a ({d}, {d}) tensor to match the mean's length {d}; got {_describe(cov)}"
            )
        for name, value in (("mean", mean), ("cov", cov)):
            if value.is_complex():  # the Fisher matrix is assembled in float64: the imaginary part was dropped
                raise TorchfimError(f"{name} must be (or return) a real tensor, got {value.dtype}; a Gaussian data "
                                    "vector here is real: pass its real and imaginary parts as entries of its own")
        # Integer (or bool) values are exact: float64 holds them, and the stencils and tolerances need a float dtype.
        mean = mean if mean.is_floating_point() else mean.to(torch.float64)
        cov = cov if cov.is_floating_point() else cov.to(torch.float64)
        return mean, cov


def covariance_cholesky(cov: Tensor) -> Tensor:
    """The float64 Cholesky factor ``L`` of ``C = L Lᵀ``; raise unless ``C`` is symmetric positive definite."""
    cov64 = cov.detach().to(torch.float64)
    if not bool(torch.isfinite(cov64).all()):
        raise TorchfimError("the covariance at theta0 has non-finite entries; check cov(theta0)")
    scale = float(cov64.abs().max())
    # An integer covariance is exact: judge its symmetry at float64's rounding, the dtype it is factored in.
    tolerance = 100 * torch.finfo(cov.dtype if cov.is_floating_point() else torch.float64).eps * scale
    if float((cov64 - cov64.T).abs().max()) > tolerance:
        raise TorchfimError("the covariance at theta0 is not symmetric; return (C + C.T) / 2 from cov")
    factor, info = torch.linalg.cholesky_ex((cov64 + cov64.T) / 2)
    if int(info) != 0:
        raise TorchfimError(
            "the covariance at theta0 is not positive definite (Cholesky failed); every data vector "
            "needs a strictly positive noise variance: add the noise term to cov"
        )
    return factor


_ROLE = {"mean": "mean", "cov": "covariance"}


def _first_call(function: Callable[[Tensor], Tensor], what: str, theta0: Tensor) -> object:
    """``function(theta0)``; whatever it raises becomes a :class:`TorchfimError` naming the call, the cause chained.

    Only the first call is wrapped: an error there is almost always a mismatch between the function and ``theta0``
    (a wrong parameter count, dtype or device), which a bare ``IndexError`` from inside the user's code does not say.
    Later calls (the stencils' points, forward mode) raise as they are, for what they are.
    """
    try:
        return function(theta0)
    except Exception as err:
        raise TorchfimError(
            f"the {_ROLE[what]} function {what}(theta0) raised {type(err).__name__}: {err}; it was called with theta0 "
            f"of shape {tuple(theta0.shape)} ({theta0.numel()} parameters, {theta0.dtype}): fix {what}, or theta0 if "
            f"{what} reads another number of parameters, so that {what}(theta0) runs"
        ) from err


def _function_or_none(value: object, what: str) -> Callable[[Tensor], Tensor] | None:
    if isinstance(value, Tensor):
        return None
    if callable(value):
        return value
    raise TorchfimError(
        f"{what} must be a function of theta returning a tensor, or a fixed tensor; got {type(value).__name__}"
    )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    return a_or_an(type(value).__name__)
