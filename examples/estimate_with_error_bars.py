"""Estimate the Fisher information of a model, with error bars.

torchfim gives the exact Fisher (here Tr(F) and its diagonal) and two unbiased Monte-Carlo
estimators, the score form Î1 and the Hessian form Î2, together with their exact standard errors
(``return_stderr=True``: the square root of ``torchfim.fisher_variance``, in closed form, given the
inputs). This script draws the score estimate of Tr(F) 200 times and checks that their spread is the standard
error and that about 95% of them fall within two standard errors of the exact value (within four of the Monte Carlo
errors of that fraction, 4·√(0.95·0.05/200) ≈ 5.9 points). With 128 inputs and 4 labels each the estimate is
close to normal; with a handful of inputs, or heavy-tailed ones, it is skewed and fewer fall within (docs/accuracy.md,
"What a standard error covers").

Run: python examples/estimate_with_error_bars.py   (a few seconds)
"""

import torch
from torch import nn

import torchfim

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))  # 5-class classifier
x = torch.randn(128, 20)  # inputs; labels are drawn from the model's own distribution

exact = torchfim.fisher(model, x, structure="trace")
g = torch.Generator().manual_seed(0)
est, se = torchfim.fisher(model, x, estimator="score", structure="trace", n_samples=4,
                          generator=g, return_stderr=True)
print(f"Tr(F): exact {exact:.4f}; score estimate (4 labels per input) {est:.4f} ± {se:.4f} (1 s.e.)")

est2, se2 = torchfim.fisher(model, x, estimator="hessian", structure="trace", n_samples=4,
                            generator=g, return_stderr=True)
print(f"       hessian estimate (4 labels per input) {est2:.4f} ± {se2:.4f} (1 s.e.)")

# Error bars on every diagonal entry: the per-entry standard errors of Î1.
diag, diag_se = torchfim.fisher(model, x, estimator="score", structure="diag", n_samples=4,
                                generator=g, return_stderr=True)
exact_diag = torchfim.fisher(model, x, structure="diag")
within = ((diag - exact_diag).abs() <= 2 * diag_se).float().mean()
print(f"diagonal: {diag.numel()} entries, {100 * within:.0f}% within 2 s.e. of the exact diagonal")

# The standard error is exact: repeated draws scatter around Tr(F) with that spread.
draws = torch.stack([
    torchfim.fisher(model, x, estimator="score", structure="trace", n_samples=4, generator=g)
    for _ in range(200)
])
coverage = float(((draws - exact).abs() <= 2 * se).float().mean())
print(f"200 draws: mean {draws.mean():.4f}, std {draws.std():.4f} (predicted {se:.4f}); "
      f"{100 * coverage:.1f}% within 2 s.e. of the exact value (95.4% expected)")
assert abs(float(draws.std()) / float(se) - 1) < 0.15, "the spread should match the standard error"
assert abs(coverage - 0.9545) < 4 * (0.9545 * 0.0455 / 200) ** 0.5, "about 95% should fall within 2 s.e."
