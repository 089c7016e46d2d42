"""The Gaussian family with fixed variance, parametrised by its mean."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .._identity import identity_like
from ..errors import TorchfimError, real_number, warn_user
from .base import (
    Family,
    _integers,
    _isserlis,
    _isserlis_moment4,
    _isserlis_pairwise,
    _isserlis_quadratic,
    _work_dtype,
)

#: The noise scales σ a Gaussian takes: its Fisher scales as 1/σ² and its variances as 1/σ⁴, and beyond these σ⁴ or
#: 1/σ⁴ leave float64 (σ = 1e300 ended the variances in Python's OverflowError).
SIGMA_RANGE = (1e-75, 1e75)


def _constant(value: float, o: Tensor) -> Tensor:
    """``value`` once per input of ``o`` in its dtype, ``inf`` where it overflows: ``torch.full`` raised a bare
    RuntimeError instead (σ = 1e-30 with float32 outputs, whose Fisher 1/σ² is beyond float32)."""
    return torch.tensor(value, dtype=torch.float64).to(o.dtype).to(o.device).repeat(o.shape[0])


class Gaussian(Family):
    """Gaussian ``N(o, σ² I)`` with fixed ``σ`` and mean ``o``.

    ``u = (y − o)/σ²``; ``Λ = λI`` with ``λ = 1/σ²``; fourth moments by Isserlis' theorem
    (``E[u_a u_b u_c u_d] = λ²(δ_ab δ_cd + δ_ac δ_bd + δ_ad δ_bc)``); odd moments vanish.
    Labels (sampled or checked) are in the output's dtype, float32 for half-precision outputs.

    Args:
        sigma: the fixed noise standard deviation ``σ`` (from 1e-75 to 1e75, :data:`SIGMA_RANGE`; default 1,
            which is what ``family="gaussian"`` means). The Fisher scales as ``1/σ²``.

    Example:
        >>> import torch
        >>> from torchfim.families import Gaussian
        >>> Gaussian(sigma=0.5).fisher_output(torch.zeros(1, 2, dtype=torch.float64))  # Λ = I/σ²
        tensor([[[4., 0.],
                 [0., 4.]]], dtype=torch.float64)
        >>> o, y = torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.0]])
        >>> Gaussian(sigma=0.5).output_score(y, o)  # u = (y − o)/σ²
        tensor([[ 2., -4.]])
    """

    name = "gaussian"

    def __init__(self, sigma: float = 1.0) -> None:
        value = real_number(sigma)
        if value is None or not (math.isfinite(value) and value > 0):
            raise TorchfimError(f"Gaussian sigma must be a positive finite number, got {sigma!r}")
        low, high = SIGMA_RANGE
        if not low <= value <= high:
            raise TorchfimError(f"Gaussian sigma must be a positive number from {low:g} to {high:g}, got {sigma!r}: the "
                                "Fisher scales as 1/σ² and its variances as 1/σ⁴, which leave float64 beyond; rescale "
                                "the outputs and targets so that σ is nearer 1")
        self.sigma = value

    def __repr__(self) -> str:
        return f"Gaussian(sigma={self.sigma})"

    def _filler_label(self, o: Tensor) -> Tensor:
        return o.detach().to(_work_dtype(o)[0])

    def check_output(self, o: Tensor) -> None:
        """The base checks, and a warning where the variances' scale ``1/σ⁴`` leaves the normal range of the outputs'
        (work) dtype, float32 for σ beyond about 3e-10 … 3e9: the Î1 and Î2 variances, their bounds and
        ``samples_needed`` carry that factor and come out 0 or inf there, even where the Fisher (``1/σ²``) fits (σ =
        1e15 with float32 outputs: every variance 0, and ``samples_needed`` 1 where 21 labels were needed, silently)."""
        super().check_output(o)
        info = torch.finfo(_work_dtype(o)[0])
        if not info.tiny <= self.sigma**-4 <= info.max:
            name = str(info.dtype).removeprefix("torch.")
            fate = "are refused as non-finite" if self.sigma < 1 else "come out 0 (samples_needed then 1)"
            warn_user(f"torchfim: Gaussian(sigma={self.sigma:g}) with {name} outputs: the variances of the Fisher's "
                      f"estimators scale as 1/σ⁴ = {self.sigma**-4:.3g}, outside {name}'s range, so fisher_variance, "
                      f"the bounds and samples_needed {fate}; rescale the targets so that σ is nearer 1, or compute in "
                      "float64 (model.double())")

    def check_targets(self, y: Tensor, o: Tensor) -> Tensor:
        """The base checks (shape ``(B, C)``, finite), and a warning where the targets are integers: read as real
        numbers they are valid, but class labels (an integer tensor, as classification has) belong to another
        family, whose Fisher differs."""
        checked = super().check_targets(y, o)
        if _integers(y):
            warn_user(
                f"torchfim: the targets for family {self.name!r} are {y.dtype} integers, which it reads as real "
                "numbers; if they are class labels, pass family='categorical' (one class index per input) or "
                "family='bernoulli' (0/1 per output), else pass them as floats (y.float()) to say they are values"
            )
        return checked

    def _noise(self, o: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
        """Standard normal ``z`` (B, k, C) in the working dtype, drawn on the generator's device."""
        noise = torch.randn(
            (o.shape[0], k, o.shape[1]),
            generator=generator,
            dtype=_work_dtype(o)[0],
            device=generator.device if generator is not None else o.device,
        )
        return noise.to(o.device)

    def sample(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        noise = self._noise(o, k, generator)
        return o.detach().to(noise.dtype).unsqueeze(1) + self.sigma * noise

    def sample_scores(self, o: Tensor, k: int, generator: torch.Generator | None = None) -> Tensor:
        """``u = σz/σ² = z/σ`` from the noise ``z`` of :meth:`sample` (``y − o`` cancels when ``|o| ≫ σ/ε``)."""
        return (self._noise(o, k, generator) / self.sigma).to(o.dtype)

    def output_score(self, y: Tensor, o: Tensor) -> Tensor:
        work = _work_dtype(o, y)[0]
        return ((y.to(work) - self._align(y, o).to(work)) / self.sigma**2).to(o.dtype)

    def fisher_output(self, o: Tensor) -> Tensor:
        eye = identity_like(o.shape[-1], o)
        return (eye / self.sigma**2).expand(o.shape[0], -1, -1)

    def fisher_output_sqrt(self, o: Tensor) -> Tensor:
        eye = identity_like(o.shape[-1], o)
        return (eye / self.sigma).expand(o.shape[0], -1, -1)

    def fisher_output_bilinear(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        """``vᵀw / σ²``."""
        work, out = _work_dtype(o, v, w)
        return ((v.to(work) * w.to(work)).sum(-1) / self.sigma**2).to(out)

    def fisher_output_gram(self, o: Tensor, v: Tensor) -> Tensor:
        """``v_pᵀv_q / σ²``."""
        work, out = _work_dtype(o, v)
        v = v.to(work)
        return (torch.bmm(v, v.transpose(1, 2)) / self.sigma**2).to(out)

    def fourth_moment(self, o: Tensor) -> Tensor:
        return _isserlis(self.fisher_output(o))

    def _lam_diag(self, o: Tensor, work: torch.dtype) -> Tensor:
        return torch.full(o.shape, 1 / self.sigma**2, dtype=work, device=o.device)

    def moment4(self, o: Tensor, v: Tensor, w: Tensor) -> Tensor:
        work, out = _work_dtype(o, v, w)
        return _isserlis_moment4(self._lam_diag(o, work), v.to(work), w.to(work)).to(out)

    def pairwise_moment4(self, o: Tensor, v: Tensor) -> Tensor:
        """Isserlis: ``λ²[(v_pᵀv_p)(v_qᵀv_q) + 2(v_pᵀv_q)²]``."""
        work, out = _work_dtype(o, v)
        return _isserlis_pairwise(self._lam_diag(o, work), v.to(work)).to(out)

    def moments_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``λ‖v‖²`` and ``3λ²‖v‖⁴``."""
        work, out = _work_dtype(o, v)
        second = (v.to(work) ** 2).sum(-1) / self.sigma**2
        return second.to(out), (3 * second**2).to(out)

    def quadratic_moment(self, o: Tensor, k: Tensor) -> Tensor:
        work, out = _work_dtype(o, k)
        return _isserlis_quadratic(self._lam_diag(o, work), k.to(work)).to(out)

    # The Î1 variances in closed form (Isserlis, with the squared means taken out by hand), not as a fourth moment
    # less a square: the trace's, (tr ΛK)² + 2 tr(ΛKΛK) − (tr ΛK)², lost about C/2 of its digits to rounding.
    def spread_along(self, o: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """``λ‖v‖²`` and ``Var[(uᵀv)²] = 2λ²‖v‖⁴``."""
        second = self.moments_along(o, v)[0]
        return second, 2 * second**2

    def pairwise_spread(self, o: Tensor, v: Tensor) -> Tensor:
        """``Var[(uᵀv_p)(uᵀv_q)] = G_pp G_qq + G_pq²`` with ``G = λ V Vᵀ``."""
        gram = self.fisher_output_gram(o, v)
        along = torch.diagonal(gram, dim1=-2, dim2=-1)
        return along.unsqueeze(-1) * along.unsqueeze(-2) + gram.square()

    def score_quadratic_spread(self, o: Tensor, k: Tensor) -> Tensor:
        """``Var[uᵀKu] = 2 tr(ΛKΛK) = 2λ²‖K‖²_F`` for symmetric ``K``."""
        work, out = _work_dtype(o, k)
        return (2 * k.to(work).square().sum((-2, -1)) / self.sigma**4).to(out)

    def third_moment(self, o: Tensor) -> Tensor:
        """Zero: a centred Gaussian has no odd moments."""
        c = o.shape[-1]
        return torch.zeros(o.shape[0], c, c, c, dtype=o.dtype, device=o.device)

    def moment3(self, o: Tensor, a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        """Zero, without forming the C³ tensor."""
        out = _work_dtype(o, a, b, c)[1]
        return torch.zeros(a.shape[:-1], dtype=out, device=o.device)

    def fisher_output_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``1/σ²``, ``inf`` where it overflows ``o``'s dtype (the result's check then says so)."""
        return _constant(1 / self.sigma**2, o)

    def fourth_moment_top_eigenvalue(self, o: Tensor) -> Tensor:
        """``λ²(C + 2)``, ``λ = 1/σ²``: ``M X = λ²(tr(X) I + X + Xᵀ)`` has eigenvalue ``λ²(C + 2)`` on
        ``X = I``, ``2λ²`` on traceless symmetric ``X`` and 0 on antisymmetric ``X``."""
        return _constant((o.shape[-1] + 2) / self.sigma**4, o)

    def log_prob(self, o: Tensor, y: Tensor) -> Tensor:
        work = _work_dtype(o, y)[0]
        diff = y.to(work) - self._align(y, o).to(work)
        c = o.shape[-1]
        log_p = -0.5 * (diff**2).sum(-1) / self.sigma**2 - 0.5 * c * math.log(2 * math.pi * self.sigma**2)
        return log_p.to(o.dtype)
