"""A Fisher forecast for counts in cells of two galaxy tracers (torchfim.forecast).

Two tracers of one Gaussian field: in each cell the field δ ~ N(0, P) sets Poisson rates
n̄_α (1 + b_α δ). The counts' covariance is C_αβ = n̄_α n̄_β b_α b_β P + δ_αβ n̄_α (clustering plus
shot noise), checked here on simulated cells. The forecast for θ = (ln b1, ln b2, ln P) is computed
by autograd and by a 5-point stencil whose step comes from a step-size scan, compared with the
closed form (Abramo 2012), diagnosed (the full matrix is singular: only b²P is measured), and
reduced to the FKP formula in the single-tracer limit.

Run: python examples/forecast_counts_in_cells.py [--plot ellipse.png]   (a few seconds; writes the
figure only when --plot is given, and then needs matplotlib)
"""

import argparse

import torch

from torchfim.forecast import CountsInCells, fkp_fisher, multi_tracer_fisher, scan_steps

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--plot", metavar="PATH", help="write the ln b1 – ln b2 confidence ellipses to PATH")
args = parser.parse_args()

N_CELLS = 1000  # independent cells in the survey: the total Fisher matrix is N_CELLS times one cell's
cells = CountsInCells(densities=[500.0, 100.0], biases=[1.0, 2.0], power=0.01)
x = cells.densities * cells.biases**2 * cells.power
print(f"two tracers: mean counts {cells.densities.tolist()}, biases {cells.biases.tolist()}, P = {cells.power}; "
      f"n̄b²P = {x.tolist()}")

# 1. The covariance model against 200,000 simulated cells (Poisson noise on a Gaussian field).
counts = cells.sample(200_000, generator=torch.Generator().manual_seed(0))
centred = counts - counts.mean(0)
products = centred[:, :, None] * centred[:, None, :]
simulated, stderr = products.mean(0), products.std(0) / len(counts) ** 0.5
model = cells.covariance(cells.theta0)
print("\ncovariance of the counts: model vs 200,000 simulated cells")
for a in range(2):
    for b in range(a, 2):
        pull = (simulated[a, b] - model[a, b]) / stderr[a, b]
        print(f"  C[{a + 1},{b + 1}] model {model[a, b]:9.2f}   simulated {simulated[a, b]:9.2f} ± {stderr[a, b]:.2f}"
              f"   ({pull:+.1f} s.e.)")

# 2. The Fisher matrix of one cell, by autograd and by a 5-point stencil with scanned steps.
scan = scan_steps(torch.zeros(2, dtype=torch.float64), cells.covariance, cells.theta0, stencil="stencil5",
                  names=cells.names)
print(f"\n{scan}")
closed_form = multi_tracer_fisher(cells.densities, cells.biases, cells.power)
for method, step in (("autograd", None), ("stencil5", scan.steps)):
    fisher = cells.forecast(derivatives=method, step=step).fisher
    error = float((fisher - closed_form).abs().max() / closed_form.abs().max())
    print(f"Fisher matrix by {method:<8}: largest relative difference from the closed form {error:.1e}")

# 3. Diagnostics: with every bias and the amplitude free, only the products b²P are measured.
survey = N_CELLS * cells.forecast()
print(f"\nall three parameters free: {survey.diagnostics()}")
biases_only = survey.fix("ln P")
print(f"with ln P fixed:            {biases_only.diagnostics()}\n\n{biases_only}")

# The multi-tracer gain: more galaxies shrink the error on the bias ratio without limit, while the
# error on a bias alone stops at the cosmic-variance floor of the one field both tracers sample.
# (ln(b1/b2) is unchanged by the b²P degeneracy, so fixing ln P costs it nothing.)
ratio = torch.tensor([1.0, -1.0], dtype=torch.float64)
print(f"\n{'densities ×':>11} {'σ(ln b1)':>9} {'σ(ln b1/b2)':>12}   ({N_CELLS} cells, ln P fixed)")
for scale in (1.0, 10.0, 100.0, 1000.0):
    more = (N_CELLS * CountsInCells(cells.densities * scale, cells.biases, cells.power).forecast()).fix("ln P")
    ratio_error = float(ratio @ more.covariance() @ ratio) ** 0.5
    print(f"{scale:>11g} {float(more.marginal_errors()[0]):>9.5f} {ratio_error:>12.6f}")

# 4. The single-tracer limit: tracer 2 made negligible, then tracer 1 alone, against FKP.
for label, dens, bias in (("tracer 2 with 1e-12 counts", [500.0, 1e-12], [1.0, 2.0]), ("one tracer", [500.0], [1.0])):
    limit = CountsInCells(dens, bias, power=0.01).forecast().fix(*[f"ln b{a + 1}" for a in range(len(dens))])
    fkp = fkp_fisher(500.0 * 0.01)
    print(f"F[ln P] with the biases fixed, {label:<27}: {float(limit.fisher):.15f}; FKP ½(n̄P/(1+n̄P))² = "
          f"{float(fkp):.15f}; relative difference {abs(float(limit.fisher / fkp) - 1):.1e}")

if args.plot:
    import matplotlib

    matplotlib.use("Agg")
    ax = biases_only.plot_ellipse("ln b1", "ln b2")
    ax.legend(title=f"{N_CELLS} cells, ln P fixed")
    ax.figure.savefig(args.plot, dpi=120)
    print(f"\nwrote {args.plot}")
