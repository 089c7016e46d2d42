"""The matrix Fisher moments where the law is concentrated (singular values 1e10 to 1e13), against its small-angle
expansion.

With ``A = diag(s₁, s₂, s₃)`` and ``R = exp([ω]ₓ)``, ``tr(AᵀR) = Σ sᵢ − ½ Σᵢ (sⱼ + sₖ) ωᵢ² + O(ω⁴)``: to leading order
``ωᵢ ~ N(0, 1/(sⱼ + sₖ))`` independently, so ``Var R₂₃ = −Cov(R₂₃, R₃₂) = 1/(s₂ + s₃)`` and
``1 − E R₁₁ = ½ (1/(s₁ + s₃) + 1/(s₁ + s₂))``, each with a relative correction ``c/s`` (``s`` the scale of A) whose
coefficient ``c`` does not depend on ``s``. So ``(ratio − 1)·s`` must be the same at every scale: measured at 1e5,
where the quadrature is far inside its range, it fixes the covariance at 1e10…1e13 to float64's rounding. An earlier review left 1e10-1e12 unconfirmed.
"""

from __future__ import annotations

import pytest
import torch

from torchfim.families.matrix_fisher_normaliser import matrix_fisher_moments

SHAPE = (1.0, 0.7, 0.4)  # s₁ : s₂ : s₃
R23, R32 = 5, 7  # vec R row by row


def _corrections(scale: float) -> tuple[float, float, float]:
    """``(ratio − 1)·s`` of ``Var R₂₃``, of ``−Cov(R₂₃, R₃₂)`` and of ``1 − E R₁₁`` against their leading terms."""
    s1, s2, s3 = (scale * k for k in SHAPE)
    moments = matrix_fisher_moments(torch.diag(torch.tensor([s1, s2, s3], dtype=torch.float64))[None], 2)
    cov, mean = moments.cov[0], moments.mean[0].reshape(3, 3)
    angle = 1 / (s2 + s3)
    tilt = 0.5 * (1 / (s1 + s3) + 1 / (s1 + s2))
    return (float(cov[R23, R23]) / angle - 1) * scale, (-float(cov[R23, R32]) / angle - 1) * scale, \
        (float(1 - mean[0, 0]) / tilt - 1) * scale


@pytest.mark.parametrize("scale", [1e10, 1e11, 1e12, 1e13])
def test_the_concentrated_moments_follow_the_small_angle_expansion(scale: float) -> None:
    """The covariance within 5e-15 relative of the expansion with the coefficient measured at 1e5 (measured: 6e-16 at
    1e10, 1.6e-15 at 1e12); ``E R₁₁`` within 5e-16 absolute (its float64 rounding near 1)."""
    reference = _corrections(1e5)
    assert all(-1 < c < -0.5 for c in reference[:2])  # a correction of order one (−0.665, −0.896)
    got = _corrections(scale)
    assert all(abs(g - r) / scale < 5e-15 for g, r in zip(got[:2], reference[:2]))
    tilt = 0.5 * (1 / (scale * (SHAPE[0] + SHAPE[2])) + 1 / (scale * (SHAPE[0] + SHAPE[1])))
    assert abs(got[2] - reference[2]) / scale * tilt < 5e-16
