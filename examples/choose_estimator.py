"""Choose between the score (Î1) and Hessian (Î2) estimators, and how many labels to draw.

``torchfim.compare_estimators`` reports, per parameter tensor, the summed variance of each
estimator's diagonal; ``torchfim.samples_needed`` gives the labels per input for a target relative
error of Tr(F). Both use the closed-form variances, so no sampling is needed to decide. For a ReLU
network Î2 is exact on every diagonal entry (the outputs are piecewise linear in each layer's
weights); with tanh it is not, and the better estimator depends on the layer.

Run: python examples/choose_estimator.py   (a few seconds)
"""

import torch
from torch import nn

import torchfim

torch.manual_seed(0)
x = torch.randn(64, 10)
for act in (nn.ReLU, nn.Tanh):
    model = nn.Sequential(nn.Linear(10, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 4))
    print(f"--- MLP 10-16-16-4 with {act.__name__}, {len(x)} inputs")
    print(torchfim.compare_estimators(model, x))
    for estimator in ("score", "hessian"):
        k10 = torchfim.samples_needed(model, x, estimator=estimator, rel_error=0.1)
        k1 = torchfim.samples_needed(model, x, estimator=estimator, rel_error=0.01)
        labels = "1 label" if k10 == 1 else f"{k10} labels"
        print(f"{estimator:>8}: {labels} per input for a 10% relative standard error of Tr(F), "
              f"{k1} for 1%")
    print()
